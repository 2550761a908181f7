"""Detection data: COCO JSON and YOLO folders -> DetectionSource -> dataset items per the contract in
dinotune/tasks/detect/__init__.py; subsets; bad input refused with messages naming file and entry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from dinotune.config import DetectDataConfig
from dinotune.data.transforms import denormalize
from dinotune.ops import box_ops
from dinotune.tasks.detect.data import (
    DataError,
    DetectionDataset,
    choose_subset,
    detection_collate,
    find_detection_data,
    read_coco,
    read_subset_file,
    read_yolo,
    restrict,
    scan_source,
    write_subset_file,
)
from dinotune.tasks.detect.transforms import eval_transforms, train_transforms
from tests.conftest import shared_data

MIN = DetectDataConfig().min_box_size

S = 112


@pytest.fixture(scope="module")
def coco_root() -> Path:
    return shared_data("coco_tiny")


@pytest.fixture(scope="module")
def val_json(coco_root) -> dict:
    return json.loads((coco_root / "annotations" / "instances_val2017.json").read_text())


@pytest.fixture(scope="module")
def val_source(coco_root):
    return find_detection_data(coco_root, "val", min_box_size=MIN)


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _small_coco(val_json: dict, n_images: int = 2, annotations=None, categories=None) -> dict:
    images = [dict(e) for e in val_json["images"][:n_images]]
    cats = categories if categories is not None else [{"id": 1, "name": "person"}, {"id": 90, "name": "toothbrush"}]
    return {"images": images, "annotations": annotations or [], "categories": cats}


# ------------------------------------------------------------------------------------------- COCO
def test_coco_categories_map_both_ways(val_source, val_json):
    cats = val_source.categories
    assert len(cats) == 80
    assert cats[-1] == {"id": 90, "name": "toothbrush"} and cats[0] == {"id": 1, "name": "person"}
    assert val_source.category_index[90] == 79 and val_source.category_index[1] == 0
    assert all(val_source.category_index[c["id"]] == i for i, c in enumerate(cats))
    for anns in val_source.annotations.values():
        for a in anns:
            assert cats[a.label]["id"] == a.category_id
    gt = val_source.coco_gt()
    assert {c["id"] for c in gt["categories"]} == {c["id"] for c in val_json["categories"]}
    assert {a["category_id"] for a in gt["annotations"]} <= {c["id"] for c in val_json["categories"]}


def test_crowd_regions_in_gt_not_in_targets(val_source, val_json):
    crowd = [a for a in val_json["annotations"] if a["iscrowd"]]
    assert crowd and val_source.report.crowd == len(crowd)
    gt = val_source.coco_gt()
    assert len(gt["annotations"]) == len(val_json["annotations"])
    assert {a["id"] for a in gt["annotations"] if a["iscrowd"]} == {a["id"] for a in crowd}
    assert {im["id"] for im in gt["images"]} == {im["id"] for im in val_json["images"]}
    image_id = crowd[0]["image_id"]
    plain = [a for a in val_json["annotations"] if a["image_id"] == image_id and not a["iscrowd"]]
    assert len(val_source.targets(image_id)) == len(plain)
    ds = DetectionDataset(val_source, eval_transforms(), S)
    _, target = ds[val_source.image_ids.index(image_id)]
    assert target["image_id"] == image_id and len(target["labels"]) == len(plain)


def test_degenerate_boxes_and_empty_images(tmp_path, coco_root, val_json):
    data = _small_coco(val_json, n_images=2)
    im0, im1 = data["images"]
    w, h = im0["width"], im0["height"]
    boxes = [
        [10, 10, 50, 40],  # fine
        [w - 20, h - 30, 60, 70],  # reaches outside: clamped to 20 x 30
        [-15, 5, 40, 40],  # negative x: clamped to 25 x 40
        [30, 30, 0, 20],  # zero width: dropped
        [40, 40, -10, 20],  # negative width: dropped
        [w + 5, 10, 30, 30],  # entirely outside: dropped
        [100, 100, 0.4, 50],  # thinner than min_box_size after clamping: dropped
    ]
    anns = [{"id": 100 + k, "image_id": im0["id"], "category_id": 1, "bbox": b, "area": 1.0, "iscrowd": 0}
            for k, b in enumerate(boxes)]
    anns.append({"id": 200, "image_id": im0["id"], "category_id": 90, "bbox": [0, 0, 30, 30], "area": 900.0,
                 "iscrowd": 1})
    data["annotations"] = anns
    path = _write(tmp_path / "small.json", data)
    src = read_coco(path, coco_root / "val2017", None, MIN)
    r = src.report
    assert (r.clamped, r.dropped, r.crowd, r.empty_images) == (2, 4, 1, 1)
    assert src.image_ids == [im0["id"], im1["id"]]  # the image without annotations is kept
    kept = [a.bbox for a in src.targets(im0["id"])]
    assert kept == [(10, 10, 60, 50), (w - 20, h - 30, w, h), (0, 5, 25, 45)]
    assert len(src.coco_gt()["annotations"]) == len(anns)  # the original annotations, untouched
    ds = DetectionDataset(src, eval_transforms(), S)
    _, t_empty = ds[1]
    assert t_empty["boxes"].shape == (0, 4) and t_empty["labels"].shape == (0,)
    assert t_empty["labels"].dtype == torch.int64
    _, t0 = ds[0]
    assert len(t0["boxes"]) == 3


def test_dataset_items_follow_contract(val_source):
    ds = DetectionDataset(val_source, eval_transforms(), S)
    assert len(ds) == 80
    for index in (0, 5):
        image, target = ds[index]
        rec = val_source.images[index]
        assert image.shape == (3, S, S) and image.dtype == torch.float32
        assert type(image) is torch.Tensor
        assert set(target) == {"boxes", "labels", "image_id", "orig_size", "scale"}
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape[1] == 4
        assert target["labels"].dtype == torch.int64 and len(target["labels"]) == len(target["boxes"])
        assert isinstance(target["image_id"], int) and target["image_id"] == rec.id
        assert target["orig_size"].dtype == torch.int64 and target["orig_size"].tolist() == [rec.height, rec.width]
        assert target["scale"] == pytest.approx(S / max(rec.height, rec.width))
        assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
        # canvas -> / scale -> original pixels, within 1 px of the annotation
        back = box_ops.cxcywh_to_xyxy(target["boxes"] * S) / target["scale"]
        want = torch.tensor([a.bbox for a in val_source.targets(rec.id)])
        assert torch.allclose(back, want, atol=1.0)
        assert target["labels"].tolist() == [a.label for a in val_source.targets(rec.id)]
        # zero padding (black before normalisation) at the bottom of landscape images
        if rec.width > rec.height:
            assert denormalize(image[None])[0, :, -1, :].abs().max() < 1e-5
    batch = detection_collate([ds[0], ds[1], ds[2]])
    assert batch["images"].shape == (3, 3, S, S) and len(batch["targets"]) == 3
    assert [t["image_id"] for t in batch["targets"]] == val_source.image_ids[:3]


def test_pre_transform_changes_pixels_not_targets(val_source):
    from dinotune.data.corruptions import Corruption

    seen = []

    def spy(pil):
        seen.append(pil.size)
        return Corruption("gaussian_noise", 5, seed=0)(pil)

    clean = DetectionDataset(val_source, eval_transforms(), S)
    noisy = DetectionDataset(val_source, eval_transforms(), S, pre_transform=spy)
    (a, ta), (b, tb) = clean[3], noisy[3]
    rec = val_source.images[3]
    assert seen == [(rec.width, rec.height)]  # on the decoded original, before resizing
    assert a.shape == b.shape and (a - b).abs().mean() > 0.1
    assert torch.equal(ta["boxes"], tb["boxes"]) and torch.equal(ta["labels"], tb["labels"])


def test_flip_mirrors_x(val_source):
    plain = DetectionDataset(val_source, eval_transforms(), S)
    flipped = DetectionDataset(val_source, v2.RandomHorizontalFlip(p=1.0), S)
    for index in (0, 3):
        (_, t), (_, f) = plain[index], flipped[index]
        width = val_source.images[index].width * t["scale"] / S  # the image's width on the canvas, normalised
        assert torch.allclose(f["boxes"][:, 0], width - t["boxes"][:, 0], atol=1e-5)
        assert torch.allclose(f["boxes"][:, 1:], t["boxes"][:, 1:], atol=1e-5)
        assert torch.equal(f["labels"], t["labels"])


def _aspect_class(box_cxcywh: torch.Tensor) -> int:
    r = float(box_cxcywh[2] / box_cxcywh[3])
    return 0 if r < 0.5 else (2 if r > 2 else 1)


def test_augmentation_keeps_boxes_valid_and_labels_aligned(tmp_path):
    """Each label has its own aspect ratio (1:4, 1:1, 4:1), which flips, zoom-out, resizes and crops
    that keep >= 60 % of a box preserve well enough to tell them apart: labels must follow boxes."""
    (tmp_path / "images" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train").mkdir(parents=True)
    Image.new("RGB", (300, 200), (90, 120, 150)).save(tmp_path / "images" / "train" / "a.png")
    (tmp_path / "data.yaml").write_text("names: [tall, square, wide]\n")
    lines = []
    for k, (x, y) in enumerate([(20, 20), (200, 30), (120, 150), (250, 150), (60, 120)]):
        cls = k % 3
        bw, bh = [(10, 40), (24, 24), (40, 10)][cls]
        lines.append(f"{cls} {(x + bw / 2) / 300} {(y + bh / 2) / 200} {bw / 300} {bh / 200}")
    (tmp_path / "labels" / "train" / "a.txt").write_text("\n".join(lines) + "\n")
    src = read_yolo(tmp_path, "train", None, MIN)
    ds = DetectionDataset(src, train_transforms(S), S)
    torch.manual_seed(0)
    counts = []
    for _ in range(60):
        image, t = ds[0]
        assert image.shape == (3, S, S)
        boxes = t["boxes"]
        assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] > 0).all()
        xyxy = box_ops.cxcywh_to_xyxy(boxes)
        assert (xyxy >= -1e-6).all() and (xyxy <= 1 + 1e-6).all()
        assert len(t["labels"]) == len(boxes) >= 1
        assert [_aspect_class(b) for b in boxes] == t["labels"].tolist()
        counts.append(len(boxes))
    assert min(counts) < 5 and max(counts) == 5  # some crops dropped boxes (and their labels)


def test_checkpoint_categories(tmp_path, coco_root, val_json):
    data = _small_coco(val_json, annotations=[
        {"id": 1, "image_id": val_json["images"][0]["id"], "category_id": 90, "bbox": [5, 5, 20, 20]},
        {"id": 2, "image_id": val_json["images"][0]["id"], "category_id": 1, "bbox": [50, 5, 20, 20]},
    ])
    path = _write(tmp_path / "a.json", data)
    ckpt = [{"id": 90, "name": "toothbrush"}, {"id": 5, "name": "airplane"}, {"id": 1, "name": "person"}]
    src = read_coco(path, coco_root / "val2017", ckpt, MIN)
    assert src.categories == ckpt
    assert [(a.label, a.category_id) for a in src.targets(val_json["images"][0]["id"])] == [(0, 90), (2, 1)]
    with pytest.raises(DataError) as e:
        read_coco(path, coco_root / "val2017", [{"id": 1, "name": "person"}], MIN)
    assert str(path) in str(e.value) and "annotations[0] (id 1)" in str(e.value) and "90" in str(e.value)


# ------------------------------------------------------------------------------------------- YOLO
def _yolo_folder(root: Path) -> Path:
    for split in ("train", "valid"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
    Image.new("RGB", (200, 100), "red").save(root / "images" / "train" / "a.jpg")
    Image.new("RGB", (50, 80), "blue").save(root / "images" / "train" / "b.png")
    Image.new("RGB", (64, 64), "green").save(root / "images" / "train" / "c.jpg")  # no label file
    Image.new("RGB", (64, 64), "green").save(root / "images" / "valid" / "d.jpg")
    (root / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.2 0.4\n2 0.1 0.2 0.1 0.2\n")
    (root / "labels" / "train" / "b.txt").write_text("\n1 0.5 0.25 1.0 0.5\n")
    (root / "data.yaml").write_text("names:\n  0: cat\n  1: dog\n  2: bird\ntrain: images/train\nval: images/valid\n")
    return root


def test_yolo_folder(tmp_path):
    root = _yolo_folder(tmp_path / "yolo")
    src = find_detection_data(root, "train", min_box_size=MIN)
    assert src.categories == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}]
    assert [im.path.name for im in src.images] == ["a.jpg", "b.png", "c.jpg"]
    assert src.image_ids == [1, 2, 3]
    assert [(im.width, im.height) for im in src.images] == [(200, 100), (50, 80), (64, 64)]
    a = src.targets(1)
    assert [(x.label, x.category_id) for x in a] == [(0, 1), (2, 3)]
    assert a[0].bbox == pytest.approx((80, 30, 120, 70))
    assert a[1].bbox == pytest.approx((10, 10, 30, 30))
    assert src.targets(2)[0].bbox == pytest.approx((0, 0, 50, 40))
    assert src.targets(3) == [] and src.report.empty_images == 1
    gt = src.coco_gt()
    assert [x["bbox"] for x in gt["annotations"] if x["image_id"] == 1] == [pytest.approx([80, 30, 40, 40]),
                                                                             pytest.approx([10, 10, 20, 20])]
    ds = DetectionDataset(src, eval_transforms(), S)
    _, t = ds[0]
    assert torch.allclose(t["boxes"], torch.tensor([[0.5, 0.25, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]), atol=1e-5)
    _, t = ds[2]
    assert t["boxes"].shape == (0, 4)
    val = find_detection_data(root, "val", min_box_size=MIN)
    assert [im.path.name for im in val.images] == ["d.jpg"]


@pytest.mark.parametrize("line, expect", [
    ("0 0.5 0.5 0.2", "5 numbers"),
    ("3 0.5 0.5 0.2 0.2", "class 3 out of range"),
    ("1 0.5 1.7 0.2 0.2", "[0, 1]"),
    ("x 0.5 0.5 0.2 0.2", "not numbers"),
])
def test_yolo_bad_label_lines(tmp_path, line, expect):
    root = _yolo_folder(tmp_path / "yolo")
    label = root / "labels" / "train" / "b.txt"
    label.write_text("1 0.5 0.25 1.0 0.5\n" + line + "\n")
    with pytest.raises(DataError) as e:
        read_yolo(root, "train", None, MIN)
    assert f"{label}, line 2" in str(e.value) and expect in str(e.value)


# ----------------------------------------------------------------------------------------- subsets
def test_subsets(tmp_path, val_source):
    a, b = choose_subset(val_source, 10, seed=1), choose_subset(val_source, 10, seed=1)
    assert a == b and len(a) == 10 and a == sorted(a)
    assert choose_subset(val_source, 10, seed=2) != a
    assert set(a) <= set(choose_subset(val_source, 20, seed=1))
    assert choose_subset(val_source, 1000, seed=1) == sorted(val_source.image_ids)
    path = tmp_path / "subset.json"
    write_subset_file(path, a, {"seed": 1, "n": 10, "source": val_source.name})
    assert read_subset_file(path) == a
    meta = json.loads(path.read_text())
    assert meta["seed"] == 1 and meta["n"] == 10 and meta["source"] == val_source.name
    sub = restrict(val_source, read_subset_file(path), where=str(path))
    assert sorted(sub.image_ids) == a and len(sub) == 10
    assert {im["id"] for im in sub.coco_gt()["images"]} == set(a)
    assert {x["image_id"] for x in sub.coco_gt()["annotations"]} <= set(a)
    write_subset_file(path, a + [123456789, 987654321], {"seed": 1})
    with pytest.raises(DataError) as e:
        restrict(val_source, read_subset_file(path), where=str(path))
    assert str(path) in str(e.value) and "123456789" in str(e.value) and "987654321" in str(e.value)


# ------------------------------------------------------------------------------------- bad input
def test_truncated_json(tmp_path, coco_root):
    text = (coco_root / "annotations" / "instances_val2017.json").read_text()
    path = tmp_path / "annotations" / "instances_val2017.json"
    path.parent.mkdir()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(DataError) as e:
        read_coco(path, coco_root / "val2017", None, MIN)
    assert str(path) in str(e.value) and re.search(r"line \d+ column \d+", str(e.value)) and "truncated" in str(e.value)


def test_missing_image_file(tmp_path, coco_root, val_json):
    data = _small_coco(val_json, n_images=3)
    data["images"][1]["file_name"] = "nope.jpg"
    path = _write(tmp_path / "x.json", data)
    with pytest.raises(DataError) as e:
        read_coco(path, coco_root / "val2017", None, MIN)
    msg = str(e.value)
    assert str(path) in msg and f"images[1] (id {data['images'][1]['id']})" in msg
    assert str(coco_root / "val2017" / "nope.jpg") in msg and "1 of 3" in msg


@pytest.mark.parametrize("change, expect", [
    ({"category_id": 999}, "category_id 999"),
    ({"bbox": [1, 2, 3]}, "bbox must be 4 numbers"),
    ({"image_id": 42}, "image_id 42"),
    ({"bbox": [1, 2, "3", 4]}, "bbox must be 4 numbers"),
])
def test_bad_annotation_named(tmp_path, coco_root, val_json, change, expect):
    image_id = val_json["images"][0]["id"]
    anns = [{"id": 10 + k, "image_id": image_id, "category_id": 1, "bbox": [5, 5, 20, 20]} for k in range(3)]
    anns[2].update(change)
    path = _write(tmp_path / "bad.json", _small_coco(val_json, annotations=anns))
    with pytest.raises(DataError) as e:
        read_coco(path, coco_root / "val2017", None, MIN)
    assert str(path) in str(e.value) and "annotations[2] (id 12)" in str(e.value) and expect in str(e.value)


def test_find_detection_data(tmp_path, coco_root):
    src = find_detection_data(coco_root, "train", min_box_size=MIN)
    assert len(src) == 80 and src.images[0].path.parent == coco_root / "train2017"
    json_src = find_detection_data(coco_root / "annotations" / "instances_val2017.json", "val", min_box_size=MIN)
    assert json_src.image_ids[:5] and len(json_src) == 80
    # 'valid' naming, images given explicitly
    text = (coco_root / "annotations" / "instances_val2017.json").read_text()
    (tmp_path / "d" / "annotations").mkdir(parents=True)
    (tmp_path / "d" / "annotations" / "instances_valid.json").write_text(text)
    assert len(find_detection_data(tmp_path / "d", "val", min_box_size=MIN, images=str(coco_root / "val2017"))) == 80
    with pytest.raises(DataError) as e:
        find_detection_data(tmp_path / "d", "train", min_box_size=MIN)
    assert str(tmp_path / "d") in str(e.value) and "instances_train*.json" in str(e.value)
    assert "data.yaml" in str(e.value)
    with pytest.raises(DataError) as e:  # image folder not found next to the JSON
        find_detection_data(tmp_path / "d", "val", min_box_size=MIN)
    assert "image folder" in str(e.value) and "--val-images" in str(e.value)


def test_bad_images_scanned_and_replaced(tmp_path, coco_root, val_json, capsys):
    data = _small_coco(val_json, n_images=3)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for e in data["images"]:
        (folder / e["file_name"]).write_bytes((coco_root / "val2017" / e["file_name"]).read_bytes())
    bad = folder / data["images"][1]["file_name"]
    bad.write_bytes(bad.read_bytes()[:2000])  # truncated download
    path = _write(tmp_path / "x.json", data)
    src = read_coco(path, folder, None, MIN)
    ds = DetectionDataset(src, eval_transforms(), S)
    _, t = ds[1]  # decode fails at run time: the next image instead, with a warning naming the file
    assert t["image_id"] == data["images"][2]["id"] and str(bad) in capsys.readouterr().err
    scanned = scan_source(src, "full")
    assert scanned.image_ids == [data["images"][0]["id"], data["images"][2]["id"]]
    assert [p for p, _ in scanned.report.skipped.skipped] == [str(bad)]
    assert len(scanned.coco_gt()["images"]) == 2


def test_train_transform_on_image_without_boxes():
    image = tv_tensors.Image(torch.zeros(3, 40, 60, dtype=torch.uint8))
    target = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(40, 60)),
              "labels": torch.zeros(0, dtype=torch.int64)}
    t = train_transforms(S)
    torch.manual_seed(0)
    for _ in range(20):
        out_image, out = t(image, target)
        assert out["boxes"].shape == (0, 4) and out["labels"].shape == (0,)
