"""Segmentation data: VOC / ADE20K / folder / COCO layouts -> SegmentationSource -> dataset items per
the contract in dinotune/tasks/segment/__init__.py; bad input refused with messages naming the file."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinotune.data.transforms import denormalize
from dinotune.tasks.segment.data import (
    ADE20K_CLASSES,
    VOC_CLASSES,
    CocoShapes,
    DataError,
    SegmentationDataset,
    SegmentationSource,
    find_segmentation_data,
    load_mask,
    rasterize_coco,
    read_ade20k,
    read_coco_semantic,
    read_folders,
    read_voc,
    scan_source,
    segmentation_collate,
)
from tests.conftest import shared_data

S = 56


def voc_palette() -> list[int]:
    """The standard Pascal VOC colour map (bit-interleaved), 256 entries."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def save_palette_png(labels: np.ndarray, path: Path) -> None:
    im = Image.fromarray(labels.astype(np.uint8), mode="P")
    im.putpalette(voc_palette())
    im.save(path)


def random_image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def voc_mask(h: int, w: int) -> np.ndarray:
    """Background, a class-1 block and a class-20 block (Pascal's top label: a real VOC split reaches it),
    each outlined by 255 boundaries."""
    m = np.zeros((h, w), np.uint8)
    m[5:25, 5:25] = 255
    m[6:24, 6:24] = 1
    m[h - 25:h - 5, w - 30:w - 5] = 255
    m[h - 24:h - 6, w - 29:w - 6] = 20
    return m


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    sizes = {"2007_000001": (60, 80), "2007_000002": (70, 50), "2007_000003": (64, 64)}
    for k, (name, (h, w)) in enumerate(sizes.items()):
        random_image(h, w, k).save(root / "JPEGImages" / f"{name}.jpg")
        save_palette_png(voc_mask(h, w), root / "SegmentationClass" / f"{name}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("2007_000001\n2007_000002\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("2007_000003\n2007_000002\n")
    return tmp_path / "VOCdevkit"


def make_folders(root: Path, masks: dict[str, np.ndarray], images: dict[str, Image.Image] | None = None) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for k, (name, m) in enumerate(masks.items()):
        image = (images or {}).get(name) or random_image(m.shape[0], m.shape[1], k)
        image.save(root / "images" / f"{name}.png")
        Image.fromarray(m.astype(np.uint8), mode="L").save(root / "masks" / f"{name}.png")
    return root


# ------------------------------------------------------------------------------------------ VOC
def test_voc_palette_masks_read_as_indices_with_255_kept(voc_root):
    src = find_segmentation_data(voc_root, "train")
    assert src.mask_kind == "index" and src.class_names == VOC_CLASSES and len(src.class_names) == 21
    assert [p[0].stem for p in src.pairs] == ["2007_000001", "2007_000002"]
    for i in range(len(src)):
        m = load_mask(src, i)
        assert m.ndim == 2  # indices, not RGB colours
        assert set(np.unique(m).tolist()) == {0, 1, 20, 255}
        h, w = m.shape
        np.testing.assert_array_equal(m, voc_mask(h, w))
    val = find_segmentation_data(voc_root, "val")
    assert [p[0].stem for p in val.pairs] == ["2007_000003", "2007_000002"]


def test_voc_missing_mask_named(voc_root):
    mask = voc_root / "VOC2012" / "SegmentationClass" / "2007_000002.png"
    mask.unlink()
    with pytest.raises(DataError, match=re.escape(str(mask))):
        read_voc(voc_root, "train")


# --------------------------------------------------------------------------------------- ADE20K
def test_ade20k_zero_is_ignore_and_values_shift(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
    raw = np.array([[0, 1, 150, 2]] * 4, np.uint8).repeat(8, 0).repeat(8, 1)
    random_image(32, 32, 0).save(root / "images" / "training" / "ADE_train_00000001.jpg")
    Image.fromarray(raw, mode="L").save(root / "annotations" / "training" / "ADE_train_00000001.png")
    random_image(32, 32, 1).save(root / "images" / "validation" / "ADE_val_00000001.jpg")
    Image.fromarray(raw, mode="L").save(root / "annotations" / "validation" / "ADE_val_00000001.png")

    src = find_segmentation_data(tmp_path, "train")  # finds ADEChallengeData2016/ inside
    assert src.mask_kind == "ade20k" and len(src.class_names) == 150 and src.class_names == ADE20K_CLASSES
    assert src.class_names[0] == "wall" and src.class_names[-1] == "flag"
    m = load_mask(src, 0)
    expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
    np.testing.assert_array_equal(m, expected)
    assert m[0, 0] == 255 and m[0, 8] == 0 and m[0, 16] == 149
    val = read_ade20k(root, "val")
    assert val.pairs[0][0].name == "ADE_val_00000001.jpg"

    Image.fromarray(np.full((32, 32), 151, np.uint8), mode="L").save(
        root / "annotations" / "training" / "ADE_train_00000001.png")
    with pytest.raises(DataError, match=r"ADE_train_00000001\.png.*151"):
        load_mask(src, 0)


# -------------------------------------------------------------------------------------- folders
def test_folders_num_classes_inferred_and_split_layout(tmp_path):
    masks = {"a": np.full((20, 30), 0, np.uint8), "b": np.full((20, 30), 4, np.uint8)}
    masks["a"][:5] = 255  # ignore does not count as a class
    src = read_folders(make_folders(tmp_path / "flat", masks), "train")
    assert src.num_classes == 5 and src.class_names == [f"class_{i}" for i in range(5)]
    assert [p[0].stem for p in src.pairs] == ["a", "b"] and [p[1].name for p in src.pairs] == ["a.png", "b.png"]

    make_folders(tmp_path / "split" / "train", masks)
    make_folders(tmp_path / "split" / "val", {"c": np.full((20, 30), 2, np.uint8)})
    named = find_segmentation_data(tmp_path / "split", "train", class_names=["bg", "x", "y", "z", "w"])
    assert named.class_names == ["bg", "x", "y", "z", "w"]
    val = find_segmentation_data(tmp_path / "split", "val", num_classes=5)
    assert [p[0].stem for p in val.pairs] == ["c"] and val.num_classes == 5


def test_folders_image_without_mask_or_mask_without_image(tmp_path):
    root = make_folders(tmp_path / "d", {"a": np.zeros((10, 10)), "b": np.ones((10, 10))})
    (root / "masks" / "b.png").unlink()
    with pytest.raises(DataError, match=r"no mask.*b\.png"):
        read_folders(root, "train", num_classes=2)
    random_image(10, 10, 5).save(root / "images" / "b.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "b.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "masks" / "orphan.png")
    with pytest.raises(DataError, match=r"no image.*orphan\.png"):
        read_folders(root, "train", num_classes=2)


# ----------------------------------------------------------------------------------------- COCO
@pytest.fixture(scope="module")
def coco_val():
    root = shared_data("coco_tiny")
    data = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    return find_segmentation_data(root, "val"), data


def _index_of(src: SegmentationSource, data: dict, image_id: int) -> int:
    name = next(e["file_name"] for e in data["images"] if e["id"] == image_id)
    return next(i for i, (p, _) in enumerate(src.pairs) if p.name == name)


def test_coco_rasterised_labels(coco_val):
    src, data = coco_val
    assert src.mask_kind == "coco" and src.num_classes == 81
    assert src.class_names[0] == "background" and src.class_names[80] == "toothbrush"
    assert src.class_names[1] == "person" and [c["id"] for c in src.categories][-1] == 90
    # category id 90 (toothbrush) -> label 80
    ann = next(a for a in data["annotations"] if a["category_id"] == 90 and not a["iscrowd"])
    i = _index_of(src, data, ann["image_id"])
    m = load_mask(src, i)
    assert m.shape == (src.coco[i].height, src.coco[i].width) and m.dtype == np.uint8
    assert (m == 80).sum() > 0.5 * ann["area"]
    assert (m == 0).sum() > 0  # background
    assert set(np.unique(m).tolist()) <= set(range(81)) | {255}


def test_coco_crowd_pixels_are_ignored(coco_val):
    from pycocotools import mask as mask_utils

    src, data = coco_val
    crowd = next(a for a in data["annotations"] if a["iscrowd"])
    i = _index_of(src, data, crowd["image_id"])
    m = load_mask(src, i)
    h, w = m.shape
    seg = crowd["segmentation"]
    region = mask_utils.decode(mask_utils.frPyObjects(seg, h, w) if isinstance(seg["counts"], list) else seg)
    region = region.astype(bool)
    assert (m == 255).sum() > 0 and (m[region] == 255).mean() > 0.3
    # crowd pixels are ignore unless an individually annotated object covers them
    assert ((m[region] == 255) | (m[region] > 0)).all()
    assert set(np.unique(m).tolist()) <= set(range(81)) | {255}


def test_coco_large_polygon_area_matches(coco_val):
    src, data = coco_val
    best = max((a for a in data["annotations"] if not a["iscrowd"] and isinstance(a["segmentation"], list)),
               key=lambda a: a["area"])
    i = _index_of(src, data, best["image_id"])
    shapes = src.coco[i]
    label, shape = shapes.shapes[0]  # drawing order: largest object first
    assert label == 1 + [c["id"] for c in src.categories].index(best["category_id"])
    alone = rasterize_coco(CocoShapes(shapes.height, shapes.width, [(label, shape)]))
    assert abs((alone == label).sum() - best["area"]) < 0.1 * best["area"]


def test_coco_overlap_rule_small_on_top_and_crowd_only_background(tmp_path):
    (tmp_path / "images").mkdir()
    random_image(40, 40, 0).save(tmp_path / "images" / "x.jpg")
    def square(x0, y0, x1, y1):
        return [[x0, y0, x1, y0, x1, y1, x0, y1]]
    data = {
        "images": [{"id": 1, "file_name": "x.jpg", "width": 40, "height": 40}],
        "categories": [{"id": 3, "name": "small"}, {"id": 7, "name": "big"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "segmentation": square(10, 10, 20, 20), "area": 100,
             "bbox": [10, 10, 10, 10], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "segmentation": square(0, 0, 30, 30), "area": 900,
             "bbox": [0, 0, 30, 30], "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 7, "iscrowd": 1, "area": 400, "bbox": [20, 20, 20, 20],
             "segmentation": {"size": [40, 40], "counts": [20 * 40 + 20] + [20, 20] * 19 + [20]}},
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(data))
    src = read_coco_semantic(tmp_path / "instances.json", tmp_path / "images")
    assert src.class_names == ["background", "small", "big"]
    m = load_mask(src, 0)
    assert m[15, 15] == 1  # the small object stays visible on the big one
    assert m[5, 5] == 2 and m[35, 35] == 255  # crowd where nothing else is
    assert m[25, 25] == 2  # an annotated object inside the crowd region keeps its label
    assert m[5, 35] == 0


# ---------------------------------------------------------------------------------------- items
def test_training_items_square_and_valid(voc_root):
    torch.manual_seed(0)
    src = find_segmentation_data(voc_root, "train")
    ds = SegmentationDataset(src, train=True, image_size=S, patch_size=14)
    for k in range(8):
        item = ds[k % len(ds)]
        assert item["image"].shape == (3, S, S) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (S, S) and item["mask"].dtype == torch.int64
        values = set(item["mask"].unique().tolist())
        assert values <= {0, 1, 20, 255}, values  # nearest neighbour: no blended labels
        assert item["index"] == k % len(ds)
    assert abs(float(ds[0]["image"].mean())) < 3  # normalised, not 0..255 / 0..1
    batch = segmentation_collate(patch_size=14, batch=[ds[0], ds[1]])
    assert batch["images"].shape == (2, 3, S, S) and batch["masks"].shape == (2, S, S)
    # without augmentation the whole image is trained on, at the evaluation size (short side S)
    plain = SegmentationDataset(src, train=True, image_size=S, patch_size=14, augment=False)
    evaluated = SegmentationDataset(src, train=False, image_size=S, patch_size=14)[0]
    item = plain[0]
    assert item["image"].shape == evaluated["image"].shape and min(item["image"].shape[-2:]) == S
    assert item["mask"].shape == item["image"].shape[-2:]
    assert set(item["mask"].unique().tolist()) <= {0, 1, 20, 255}
    # items of different sizes are padded by the training collate: image 0, mask ignore
    small = {"image": torch.zeros(3, S, S), "mask": torch.zeros(S, S, dtype=torch.int64), "index": 9}
    batch = segmentation_collate(patch_size=14, batch=[item, small], train=True)
    assert batch["images"].shape[-2:] == item["image"].shape[-2:]
    h, w = batch["images"].shape[-2:]
    assert (h, w) != (S, S), "the VOC fixture images are not square"
    pad = torch.ones(h, w, dtype=torch.bool)
    pad[:S, :S] = False
    assert (batch["masks"][1][pad] == 255).all() and (batch["images"][1][:, pad] == 0).all()


def test_flip_and_crop_keep_image_and_mask_aligned(tmp_path):
    h, w = 60, 80
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[:, : w // 2] = (220, 30, 30)  # class 1: red, left half
    pixels[:, w // 2:] = (30, 30, 220)  # class 2: blue, right half
    labels = np.full((h, w), 2, np.uint8)
    labels[:, : w // 2] = 1
    src = read_folders(make_folders(tmp_path / "d", {"a": labels}, {"a": Image.fromarray(pixels)}), "train",
                       num_classes=3)
    ds = SegmentationDataset(src, train=True, image_size=S, patch_size=14)
    torch.manual_seed(1)
    flipped = padded = 0
    for _ in range(30):
        item = ds[0]
        rgb = denormalize(item["image"][None])[0]
        mask = item["mask"]
        red, blue = rgb[0] > rgb[2] + 0.3, rgb[2] > rgb[0] + 0.3
        # away from the colour edge (bilinear blur), every labelled pixel shows its class colour
        edge = torch.zeros_like(mask, dtype=torch.bool)
        edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
        edge[:, :-1] |= mask[:, 1:] != mask[:, :-1]
        for _ in range(2):
            edge = edge | torch.roll(edge, 1, 1) | torch.roll(edge, -1, 1)
        ones, twos = (mask == 1) & ~edge, (mask == 2) & ~edge
        assert red[ones].float().mean() > 0.97 if ones.any() else True
        assert blue[twos].float().mean() > 0.97 if twos.any() else True
        pad = mask == 255
        if pad.any():
            padded += 1
            assert rgb[:, pad].max() < 0.02  # padding: black image, ignore mask
        cols = torch.arange(S).float()
        if ones.any() and twos.any() and cols[ones.any(0)].mean() > cols[twos.any(0)].mean():
            flipped += 1  # red (class 1) ended up right of blue
    assert flipped > 0 and padded > 0


def test_eval_items_and_collate_padding(voc_root):
    src = find_segmentation_data(voc_root, "train")  # 60x80 (h x w) and 70x50
    ds = SegmentationDataset(src, train=False, image_size=S, patch_size=14)
    a, b = ds[0], ds[1]
    assert a["mask"].shape == (60, 80) and b["mask"].shape == (70, 50)  # original resolution
    assert a["mask"].dtype == torch.int64
    for item in (a, b):
        hh, ww = item["image"].shape[-2:]
        assert min(hh, ww) == S and hh % 14 == 0 and ww % 14 == 0
    assert tuple(a["image"].shape[-2:]) == (56, 70)  # 80 * 56/60 = 74.7 -> 70
    batch = segmentation_collate(patch_size=14, batch=[a, b], train=False)
    assert batch["sizes"] == [(56, 70), (84, 56)]  # 70 * 56/50 = 78.4 -> 84
    assert batch["images"].shape == (2, 3, 84, 70)
    assert isinstance(batch["masks"], list) and batch["masks"][1].shape == (70, 50)
    h0, w0 = batch["sizes"][0]
    assert (batch["images"][0, :, h0:] == 0).all()
    assert torch.equal(batch["images"][0, :, :h0, :w0], a["image"])
    assert batch["index"].tolist() == [0, 1]
    assert segmentation_collate(patch_size=14, batch=[a, b])["masks"][0].shape == (60, 80)  # auto-detected as evaluation
    full = SegmentationDataset(src, train=False, image_size=S, patch_size=14, keep_full_resolution=True)[1]
    assert full["image"].shape == (3, 70, 50) and full["mask"].shape == (70, 50)
    padded = segmentation_collate(patch_size=14, batch=[full], train=False)
    assert padded["images"].shape == (1, 3, 70, 56) and padded["sizes"] == [(70, 50)]


def test_unreadable_image_skipped_at_runtime_and_by_scan(voc_root):
    src = find_segmentation_data(voc_root, "train")
    bad = src.pairs[0][0]
    bad.write_bytes(b"\xff\xd8\xff garbage")
    ds = SegmentationDataset(src, train=False, image_size=S, patch_size=14)
    assert ds[0]["index"] == 1  # replaced by the next pair
    scanned = scan_source(src, "fast")
    assert len(scanned) == 1 and str(bad) in scanned.report.skipped[0][0]


# ------------------------------------------------------------------------------------ bad input
def test_mask_size_differs_from_image(tmp_path):
    root = make_folders(tmp_path / "d", {"a": np.zeros((20, 30)), "b": np.ones((20, 30))})
    Image.fromarray(np.zeros((21, 30), np.uint8)).save(root / "masks" / "b.png")
    src = read_folders(root, "train", num_classes=2)
    for call in (lambda: load_mask(src, 1), lambda: SegmentationDataset(src, True, S, 14)[1],
                 lambda: scan_source(src, "fast")):
        with pytest.raises(DataError, match=r"masks/b\.png.*30x21.*images/b\.png.*30x20"):
            call()


def test_label_out_of_range_named(tmp_path):
    m = np.zeros((20, 30), np.uint8)
    m[3, 4] = 7
    root = make_folders(tmp_path / "d", {"a": np.zeros((20, 30)), "b": m})
    src = read_folders(root, "train", num_classes=3)
    with pytest.raises(DataError, match=r"masks/b\.png: label values 7 are outside 0\.\.2"):
        load_mask(src, 1)
    with pytest.raises(DataError, match=r"b\.png.*7"):
        scan_source(src, "full")
    with pytest.raises(DataError, match=r"b\.png.*7"):
        SegmentationDataset(src, False, S, 14)[1]


def test_missing_mask_file_named(tmp_path):
    root = make_folders(tmp_path / "d", {"a": np.zeros((20, 30)), "b": np.ones((20, 30))})
    src = read_folders(root, "train", num_classes=2)
    (root / "masks" / "b.png").unlink()
    with pytest.raises(DataError, match=r"masks/b\.png: mask file not found"):
        load_mask(src, 1)
    with pytest.raises(DataError, match=r"masks/b\.png"):
        SegmentationDataset(src, True, S, 14)[1]


def test_rgb_mask_refused(tmp_path):
    root = make_folders(tmp_path / "d", {"a": np.zeros((20, 30))})
    src = read_folders(root, "train", num_classes=21)
    Image.new("RGB", (30, 20), (128, 0, 0)).save(root / "masks" / "a.png")  # RGB among index masks
    with pytest.raises(DataError, match=r"a\.png: mask has image mode 'RGB'.*do not convert.*--mask-colors"):
        load_mask(src, 0)
    # a set of colour masks is refused when read, with its colours (tests/test_segment_colour_masks.py)
    with pytest.raises(DataError, match=r"masks are colour images .*#800000 \(128, 0, 0\) 100\.0 %"):
        read_folders(root, "train", num_classes=21)


def test_layout_not_found_lists_what_was_looked_for(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hi")
    with pytest.raises(DataError) as err:
        find_segmentation_data(tmp_path / "stuff", "train")
    text = str(err.value)
    for what in ("JPEGImages", "SegmentationClass", "images/training", "instances_train", "masks"):
        assert what in text
    with pytest.raises(DataError, match="not found"):
        find_segmentation_data(tmp_path / "missing", "train")


def test_ignore_index_must_not_be_a_label(tmp_path):
    root = make_folders(tmp_path / "d", {"a": np.zeros((20, 30))})
    with pytest.raises(DataError, match="ignore_index 2 is a class label"):
        read_folders(root, "train", num_classes=3, ignore_index=2)
