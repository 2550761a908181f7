"""Hostile and odd data, for every task's readers: paths that leave the dataset, 16-bit PNGs,
decompression bombs and impossible annotation sizes, EXIF-rotated photos, broken symlinks, CSVs
with repeated or contradicting rows, and masks whose bad labels would only surface mid-training.
Each case is refused or skipped with a message naming the file (and the entry / line)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import dinotune.tasks.segment.sources as seg_sources
from dinotune.config import (
    ClassifyDataConfig,
    DetectDataConfig,
    SegmentDataConfig,
    build_config,
)
from dinotune.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    PixelLimitError,
    SkipReport,
    _pillow_turns_tiffs,
    check_image,
    header_size,
    list_image_files,
    load_image,
)
from dinotune.data.transforms import classify_eval_transform
from dinotune.errors import DataError
from dinotune.tasks import get_task
from dinotune.tasks.classify.data import build_classification_data
from dinotune.tasks.detect.data import (
    DetectionDataset,
    find_detection_data,
    read_coco,
    scan_source,
)
from dinotune.tasks.detect.transforms import eval_transforms
from dinotune.tasks.segment.data import (
    SegmentationDataset,
    load_mask,
    mask_summary,
    read_coco_semantic,
    read_folders,
    read_voc,
)
from dinotune.tasks.segment.data import scan_source as scan_pairs
from tests.conftest import make_class_folders, make_image

S = 64
ORIENTATION = 0x0112  # the EXIF tag


# --------------------------------------------------------------------------------------- helpers
def _build(data: str, **kw):
    t = classify_eval_transform(28)
    return build_classification_data(data=data, train_transform=t, eval_transform=t, **kw)


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def _coco(root: Path, images: list[dict], annotations: list[dict] | None = None) -> Path:
    """``root/annotations/instances_val.json`` + ``root/val/``; ``images``: COCO image entries."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "val").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / "instances_val.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations or [],
                                "categories": [{"id": 1, "name": "thing"}]}))
    return path


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif.tobytes()


def _sideways(path: Path) -> np.ndarray:
    """A photo stored 100 wide x 40 high, tagged "rotate 90 clockwise" (EXIF 6), so it shows 40
    wide x 100 high; its stored left strip is white and shows as the top strip. Returns the upright
    pixels a viewer shows."""
    stored = np.zeros((40, 100, 3), np.uint8)
    stored[:, :10] = 255
    Image.fromarray(stored).save(path, exif=_exif(6))
    return np.rot90(stored, k=-1)  # 90 degrees clockwise


# ============================================================ 2. paths that leave the dataset
@pytest.mark.parametrize("reader", ["detect", "segment"])
@pytest.mark.parametrize("kind", ["parent", "deep", "absolute"])
def test_coco_file_name_leaving_the_image_folder_is_refused(tmp_path, reader, kind):
    """Each of these names a file that exists (and decodes, but for /etc/passwd): without the check
    it is opened and trained on."""
    root = tmp_path / "coco"
    outside = tmp_path / "outside.png"
    _noise(32, 24).save(outside)
    name = {"parent": "../../outside.png", "deep": "../../../../../../../../etc/passwd",
            "absolute": str(outside)}[kind]
    if kind == "deep" and not Path("/etc/passwd").is_file():
        pytest.skip("no /etc/passwd on this system")
    (root / "val").mkdir(parents=True)
    _noise(32, 24).save(root / "val" / "ok.png")
    path = _coco(root, [{"id": 1, "file_name": "ok.png", "width": 32, "height": 24},
                        {"id": 7, "file_name": name, "width": 32, "height": 24}])
    read = (lambda: read_coco(path, None, None, 1.0)) if reader == "detect" else (lambda: read_coco_semantic(path))
    with pytest.raises(DataError) as err:
        read()
    text = str(err.value)
    assert str(path) in text and "images[1] (id 7)" in text and repr(name) in text
    assert "outside the image folder" in text


def test_csv_relative_path_must_stay_in_its_folder_absolute_paths_are_allowed(tmp_path):
    make_class_folders(tmp_path / "lists" / "imgs", ["red", "blue"], 2, size=16)
    make_class_folders(tmp_path / "elsewhere", ["red", "blue"], 1, size=16)
    rows = [f"imgs/{c}/{c}_{i}.png,{c}" for c in ("red", "blue") for i in range(2)]
    csv_path = tmp_path / "lists" / "train.csv"
    csv_path.write_text("\n".join(["path,label", *rows, "../elsewhere/red/red_0.png,red"]) + "\n")
    with pytest.raises(DataError) as err:
        _build(str(csv_path))
    text = str(err.value)
    assert str(csv_path) in text and "line 6" in text and "../elsewhere/red/red_0.png" in text
    # the same file written as an absolute path is the user's explicit choice: used
    csv_path.write_text("\n".join(["path,label", *rows, f"{tmp_path / 'elsewhere/red/red_0.png'},red"]) + "\n")
    data = _build(str(csv_path))
    assert len(data.train) == 5 and any(p.parent.parent.name == "elsewhere" for p, _ in data.train.items)


def test_yolo_image_list_line_leaving_the_dataset_is_refused(tmp_path):
    root = tmp_path / "yolo"
    (root / "images").mkdir(parents=True)
    _noise(32, 24).save(root / "images" / "a.png")
    _noise(32, 24).save(tmp_path / "outside.png")
    (root / "data.yaml").write_text("names: [thing]\ntrain: train.txt\n")
    (root / "train.txt").write_text("./images/a.png\n../outside.png\n")
    with pytest.raises(DataError) as err:
        find_detection_data(root, "train", min_box_size=1.0)
    text = str(err.value)
    assert str(root / "train.txt") in text and "line 2" in text and "'../outside.png'" in text


def test_voc_split_list_id_leaving_the_dataset_is_refused(tmp_path):
    root = tmp_path / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True)
    _noise(32, 24).save(root / "JPEGImages" / "a.jpg")
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(root / "SegmentationClass" / "a.png")
    _noise(32, 24).save(tmp_path / "b.jpg")
    Image.fromarray(np.zeros((24, 32), np.uint8)).save(tmp_path / "b.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("a\n../../b\n")
    with pytest.raises(DataError, match=r"train\.txt, line 2: image id '\.\./\.\./b' leads outside"):
        read_voc(root, "train")


def test_symlinks_inside_the_dataset_are_followed_wherever_they_point(tmp_path):
    """The decision: what annotations *write* must stay inside; symlinks are the user's file system
    (Hugging Face hub caches, DVC and git-annex store every file as a link to elsewhere)."""
    root = tmp_path / "coco"
    (root / "val").mkdir(parents=True)
    _noise(32, 24).save(tmp_path / "blob.png")
    (root / "val" / "a.png").symlink_to(tmp_path / "blob.png")
    path = _coco(root, [{"id": 1, "file_name": "a.png", "width": 32, "height": 24}])
    source = scan_source(read_coco(path, None, None, 1.0), "full")
    assert len(source) == 1 and not len(source.report.skipped)


# ============================================================================ 3. 16-bit PNGs
def test_16_bit_grayscale_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    values = np.array([[0, 257, 32896], [40000, 65280, 65535]], np.uint16)
    expected = np.array([[0, 1, 128], [156, 254, 255]], np.uint8)  # round(v / 257)
    Image.fromarray(values).save(tmp_path / "g16.png")
    Image.fromarray(values).save(tmp_path / "g16.pgm")  # Pillow reads 16-bit PGMs as mode "I"
    assert Image.open(tmp_path / "g16.png").mode == "I;16" and Image.open(tmp_path / "g16.pgm").mode == "I"
    for name in ("g16.png", "g16.pgm"):
        rgb = np.asarray(load_image(tmp_path / name))
        assert rgb.shape == (2, 3, 3)
        for channel in range(3):
            np.testing.assert_array_equal(rgb[..., channel], expected, err_msg=name)


# ============================================================= 4. decompression bombs, sizes
@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    """A 12000 x 12000 PNG of a few KB (1-bit, all black): 144 M pixels, gigabytes once decoded."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (12000, 12000)).save(path)
    assert path.stat().st_size < 100_000
    return path


@pytest.fixture
def no_decoding_of(monkeypatch):
    """Fail the test if Pillow decodes an image of the given sizes."""
    sizes: set[tuple[int, int]] = set()
    original = ImageFile.ImageFile.load

    def load(self):
        assert self.size not in sizes, f"an image of {self.size} was decoded"
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return sizes


def test_pixel_bomb_is_skipped_by_scan_and_loader_without_decoding(tmp_path, bomb, no_decoding_of):
    no_decoding_of.add((12000, 12000))
    root = make_class_folders(tmp_path / "d", ["red", "blue"], 3, size=16)
    os.symlink(bomb, root / "red" / "huge.png")
    for mode in ("full", "fast"):
        assert "12000x12000" in check_image(bomb, mode) and "over the limit" in check_image(bomb, mode)
        data = _build(str(root), check_images=mode)
        assert len(data.train) == 6
        [(path, reason)] = data.report.skipped
        assert path.endswith("huge.png") and "144,000,000 pixels" in reason and "--max-image-pixels" in reason
    with pytest.raises(PixelLimitError, match=r"bomb\.png: image is 12000x12000"):
        load_image(bomb)
    data = _build(str(root), check_images="off")  # no scan: the run-time loader still refuses it
    huge = next(i for i, (p, _) in enumerate(data.train.items) if p.name == "huge.png")
    assert data.train[huge]["index"] != huge  # replaced by the next sample


def test_max_image_pixels_is_honoured_by_every_task_reader(tmp_path):
    """32x24 = 768 pixels: over a limit of 700, within 800."""
    make_class_folders(tmp_path / "c", ["red", "blue"], 2, size=32)
    with pytest.raises(DataError, match="no readable images"):
        _build(str(tmp_path / "c"), max_image_pixels=700)
    assert len(_build(str(tmp_path / "c"), max_image_pixels=1024).train) == 4
    root = tmp_path / "coco"
    (root / "val").mkdir(parents=True)
    _noise(32, 24).save(root / "val" / "a.png")
    _noise(16, 12).save(root / "val" / "b.png")
    path = _coco(root, [{"id": 1, "file_name": "a.png", "width": 32, "height": 24},
                        {"id": 2, "file_name": "b.png", "width": 16, "height": 12}])
    source = scan_source(read_coco(path, None, None, 1.0), "fast", max_pixels=700)
    assert [im.path.name for im in source.images] == ["b.png"] and "768 pixels" in source.report.skipped.skipped[0][1]
    ds = DetectionDataset(read_coco(path, None, None, 1.0), eval_transforms(), S, max_image_pixels=700)
    assert ds[0][1]["image_id"] == 2
    seg = tmp_path / "seg"
    for sub in ("images", "masks"):
        (seg / sub).mkdir(parents=True)
    for name, (w, h) in (("a", (32, 24)), ("b", (16, 12))):
        _noise(w, h).save(seg / "images" / f"{name}.png")
        Image.fromarray(np.zeros((h, w), np.uint8)).save(seg / "masks" / f"{name}.png")
    pairs = scan_pairs(read_folders(seg, "train", num_classes=2), "fast", max_pixels=700)
    assert [p.name for p, _ in pairs.pairs] == ["b.png"] and "768 pixels" in pairs.report.skipped[0][1]
    assert SegmentationDataset(read_folders(seg, "train", num_classes=2), False, S, 14,
                               max_image_pixels=700)[0]["index"] == 1
    for cfg in (ClassifyDataConfig(), DetectDataConfig(), SegmentDataConfig()):
        assert cfg.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS == 89_478_485  # Pillow's default


def test_annotation_claiming_20000x20000_is_skipped_never_resized(tmp_path, no_decoding_of, capsys):
    """A 64x48 image annotated as 20000x20000 (scan) or 4000x4000 (loader without scan) used to be
    resized to the annotation's size: 1.2 GB of RGB for one entry. Now it is skipped, with why."""
    root = tmp_path / "coco"
    (root / "val").mkdir(parents=True)
    _noise(64, 48).save(root / "val" / "a.png")
    _noise(64, 48).save(root / "val" / "b.png")
    box = {"bbox": [10, 10, 20, 20], "category_id": 1, "iscrowd": 0}
    path = _coco(root, [{"id": 1, "file_name": "a.png", "width": 20000, "height": 20000},
                        {"id": 2, "file_name": "b.png", "width": 64, "height": 48}],
                 [{"id": 1, "image_id": 1, **box}, {"id": 2, "image_id": 2, **box}])
    source = scan_source(read_coco(path, None, None, 1.0), "fast")
    assert [im.id for im in source.images] == [2]
    [(skipped, reason)] = source.report.skipped.skipped
    assert skipped.endswith("a.png") and "64x48" in reason and "20000x20000" in reason
    entries = json.loads(path.read_text())
    entries["images"][0].update(width=4000, height=4000)
    path.write_text(json.dumps(entries))
    ds = DetectionDataset(read_coco(path, None, None, 1.0), eval_transforms(), S)
    no_decoding_of.add((4000, 4000))
    _, target = ds[0]
    assert target["image_id"] == 2  # replaced by the next image
    assert "a.png" in capsys.readouterr().err


def test_annotation_claiming_twice_the_size_rescales_the_boxes(tmp_path, capsys):
    """b.png is 32x24, annotated as 64x48 (a plausible 2x): kept, its boxes rescaled to the file,
    its targets the same as those of a.png, which really is 64x48 with the same annotation."""
    root = tmp_path / "coco"
    (root / "val").mkdir(parents=True)
    _noise(64, 48).save(root / "val" / "a.png")
    _noise(64, 48).resize((32, 24)).save(root / "val" / "b.png")
    box = {"bbox": [10, 8, 20, 16], "category_id": 1, "iscrowd": 0}
    path = _coco(root, [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
                        {"id": 2, "file_name": "b.png", "width": 64, "height": 48}],
                 [{"id": 1, "image_id": 1, **box}, {"id": 2, "image_id": 2, **box}])
    source = scan_source(read_coco(path, None, None, 1.0), "fast")
    assert len(source) == 2 and not len(source.report.skipped)
    assert "b.png (32x24, annotated as 64x48)" in capsys.readouterr().err
    ds = DetectionDataset(source, eval_transforms(), S)
    (image_a, real), (image_b, rescaled) = ds[0], ds[1]
    torch.testing.assert_close(rescaled["boxes"], real["boxes"])
    torch.testing.assert_close(rescaled["boxes"], torch.tensor([[20 / S, 16 / S, 20 / S, 16 / S]]))
    assert rescaled["orig_size"].tolist() == [48, 64] and rescaled["scale"] == real["scale"] == S / 64
    assert image_b.shape == image_a.shape == (3, S, S)


# ======================================================================= 5. EXIF orientation
@pytest.mark.parametrize("fmt", ["jpg", "png", "webp", "tif"])
def test_exif_orientation_is_applied_to_pixels_header_size_and_checks(tmp_path, fmt):
    path = tmp_path / f"photo.{fmt}"
    upright = _sideways(path)
    image = load_image(path)
    assert image.size == (40, 100) == header_size(path)
    turned_by_pillow = fmt == "tif" and _pillow_turns_tiffs()  # newer Pillows turn TIFFs on open
    assert header_size(path, upright=False) == ((40, 100) if turned_by_pillow else (100, 40))
    pixels = np.asarray(image).astype(int)
    assert np.abs(pixels - upright).mean() < 4  # JPEG / WebP loss only
    assert pixels[:10].mean() > 240 and pixels[10:].mean() < 10
    assert check_image(path, "full") is None and check_image(path, "fast") is None


def test_yolo_boxes_are_in_the_displayed_frame_of_an_exif_photo(tmp_path):
    root = tmp_path / "yolo"
    for sub in ("images/train", "labels/train"):
        (root / sub).mkdir(parents=True)
    _sideways(root / "images" / "train" / "p.jpg")
    (root / "labels" / "train" / "p.txt").write_text("0 0.5 0.05 1.0 0.1\n")  # the white top strip
    (root / "data.yaml").write_text("names: [strip]\n")
    source = scan_source(find_detection_data(root, "train", min_box_size=1.0), "full")
    [record] = source.images
    assert (record.width, record.height) == (40, 100) and not len(source.report.skipped)
    assert source.annotations[1][0].bbox == pytest.approx((0, 0, 40, 10))
    _, target = DetectionDataset(source, eval_transforms(), S)[0]
    assert target["orig_size"].tolist() == [100, 40]


def test_coco_sizes_in_the_stored_frame_of_an_exif_photo_are_skipped_with_a_hint(tmp_path):
    root = tmp_path / "coco"
    (root / "val").mkdir(parents=True)
    _sideways(root / "val" / "p.jpg")
    _noise(64, 48).save(root / "val" / "q.png")
    path = _coco(root, [{"id": 1, "file_name": "p.jpg", "width": 100, "height": 40},
                        {"id": 2, "file_name": "q.png", "width": 64, "height": 48}])
    source = scan_source(read_coco(path, None, None, 1.0), "fast")
    [(skipped, reason)] = source.report.skipped.skipped
    assert skipped.endswith("p.jpg") and "swapped" in reason and "EXIF" in reason
    # without width / height in the JSON the header gives them, upright: nothing to skip
    entries = json.loads(path.read_text())
    for e in entries["images"]:
        e.pop("width"), e.pop("height")
    path.write_text(json.dumps(entries))
    source = scan_source(read_coco(path, None, None, 1.0), "fast")
    assert (source.images[0].width, source.images[0].height) == (40, 100) and not len(source.report.skipped)


def test_segmentation_turns_the_image_and_not_the_mask(tmp_path):
    root = tmp_path / "seg"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    _sideways(root / "images" / "p.jpg")
    mask = np.zeros((100, 40), np.uint8)
    mask[:10] = 1  # the white strip, in the displayed frame
    Image.fromarray(mask).save(root / "masks" / "p.png", exif=_exif(6))  # a stray tag must not turn it
    source = scan_pairs(read_folders(root, "train", num_classes=2), "fast")
    np.testing.assert_array_equal(load_mask(source, 0), mask)
    item = SegmentationDataset(source, False, 28, 14, keep_full_resolution=True)[0]
    assert item["image"].shape == (3, 100, 40) and item["mask"].shape == (100, 40)
    Image.fromarray(mask.T.copy()).save(root / "masks" / "p.png")  # stored frame: refused, with the hint
    with pytest.raises(DataError, match=r"p\.png: mask is 100x40 .* is 40x100 .*swapped"):
        scan_pairs(read_folders(root, "train", num_classes=2), "fast")


# ================================================================== 6. broken symlinks
def test_broken_and_looping_symlinks_are_reported_not_silently_dropped(tmp_path):
    root = make_class_folders(tmp_path / "d", ["red", "blue"], 3, size=16)
    make_class_folders(tmp_path / "more", ["red"], 2, size=16)
    (root / "red" / "gone.png").symlink_to(root / "red" / "deleted.png")
    (root / "blue" / "loop.png").symlink_to(root / "blue" / "loop.png")
    (root / "red" / "more").symlink_to(tmp_path / "more" / "red", target_is_directory=True)
    data = _build(str(root))
    reasons = {Path(p).name: r for p, r in data.report.skipped}
    assert len(data.train) == 6 and set(reasons) == {"gone.png", "loop.png", "more"}
    assert reasons["gone.png"].startswith("broken symlink") and "deleted.png" in reasons["gone.png"]
    assert reasons["loop.png"].startswith("symlink loop")
    assert reasons["more"].startswith("symlink to a folder, not followed")
    report = SkipReport()
    assert len(list_image_files(root / "blue", report)) == 3 and len(report) == 1


# ============================================================ 7. and 8. CSV rows
def test_csv_duplicate_rows_are_dropped_with_a_warning(tmp_path, capsys):
    make_class_folders(tmp_path / "imgs", ["red", "blue"], 2, size=16)
    rows = [f"imgs/{c}/{c}_{i}.png,{c}" for c in ("red", "blue") for i in range(2)]
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("\n".join(["path,label", *rows, rows[0], "./" + rows[1]]) + "\n")
    data = _build(str(csv_path))
    assert len(data.train) == 4 and len({p for p, _ in data.train.items}) == 4
    err = capsys.readouterr().err
    assert str(csv_path) in err and "2 duplicate row(s) dropped" in err and "line 6 repeats line 2" in err


def test_csv_image_with_two_labels_is_refused_naming_both(tmp_path):
    make_class_folders(tmp_path / "imgs", ["red", "blue"], 2, size=16)
    rows = [f"imgs/{c}/{c}_{i}.png,{c}" for c in ("red", "blue") for i in range(2)]
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("\n".join(["path,label", *rows, "imgs/red/red_0.png,blue"]) + "\n")
    with pytest.raises(DataError) as err:
        _build(str(csv_path))
    text = str(err.value)
    assert str(csv_path) in text and "red_0.png" in text
    assert "'red' on line 2" in text and "'blue' on line 6" in text


def test_header_only_training_csv_is_named_not_the_validation_file(tmp_path):
    make_class_folders(tmp_path / "imgs", ["red", "blue"], 2, size=16)
    train = tmp_path / "train.csv"
    train.write_text("path,label\n")
    val = tmp_path / "val.csv"
    val.write_text("path,label\nimgs/red/red_0.png,red\nimgs/blue/blue_0.png,blue\n")
    with pytest.raises(DataError) as err:
        _build(str(train), val_data=str(val))
    text = str(err.value)
    assert str(train) in text and "no rows" in text and str(val) not in text
    # rows that all point at missing files: also the training file's fault
    train.write_text("path,label\nimgs/red/nope.png,red\n")
    with pytest.raises(DataError, match=r"train\.csv: no readable images for training"):
        _build(str(train), val_data=str(val))


# ===================================================== 9. every mask validated before training
def _mask_folders(root: Path, bad_value: int, n: int = 6) -> Path:
    """``n`` image / mask pairs with labels 0..2; only the last mask (never in a first batch of
    4) holds ``bad_value`` at one pixel (a 16-bit PNG when it does not fit 8 bits)."""
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        make_image((120, 120, 120), 28, i).save(root / "images" / f"{i}.png")
        labels = np.zeros((28, 28), np.uint16 if bad_value > 255 else np.uint8)
        labels[:10] = 1
        labels[-5:] = 2
        if i == n - 1:
            labels[3, 4] = bad_value
        Image.fromarray(labels).save(root / "masks" / f"{i}.png")
    return root


@pytest.mark.parametrize("bad_value", [77, 300])
def test_a_bad_mask_anywhere_is_refused_before_training(tmp_path, bad_value):
    root = _mask_folders(tmp_path / "seg", bad_value)
    source = read_folders(root, "train", num_classes=3)
    bad = rf"masks/5\.png: label values {bad_value} are outside 0\.\.2"
    with pytest.raises(DataError, match=bad):
        scan_pairs(source, "fast")
    cfg = build_config("segment", data=str(root), num_classes=3, model="random:tiny", image_size=28,
                       batch_size=4, check_images="fast")
    with pytest.raises(DataError, match=bad):
        get_task(cfg).build_data(None, 14)


def test_masks_are_decoded_once_while_unchanged(tmp_path, monkeypatch):
    root = _mask_folders(tmp_path / "seg", 1, n=3)
    calls = []
    original = seg_sources._decode_mask
    monkeypatch.setattr(seg_sources, "_decode_mask", lambda *a, **k: calls.append(a[0]) or original(*a, **k))
    source = read_folders(root, "train")  # the class count reads every mask ...
    assert source.num_classes == 3 and len(calls) == 3
    scan_pairs(source, "fast")  # ... and the scan reuses those reads
    assert len(calls) == 3
    labels = np.zeros((28, 28), np.uint8)
    labels[0, 0] = 9
    Image.fromarray(labels).save(root / "masks" / "1.png")
    os.utime(root / "masks" / "1.png", ns=(1, 1))  # a changed file is read again, whatever its time
    with pytest.raises(DataError, match=r"masks/1\.png: label values 9"):
        scan_pairs(source, "fast")
    assert calls[3:] == [root / "masks" / "1.png"]
    assert mask_summary(root / "masks" / "0.png", root / "images" / "0.png", "index").values.tolist() == [0, 1, 2]


def test_the_max_image_pixels_option_reaches_every_task(tmp_path):
    """``--max-image-pixels`` from the config is what the task's scans, datasets and predictions
    use: 48 x 48 images (2,304 pixels) over a limit of 1,000 are all skipped."""
    import dinotune
    from dinotune.errors import DataError
    from tests.conftest import make_class_folders, make_coco_dataset, make_segmentation_folders, tiny_options

    make_class_folders(tmp_path / "cls" / "train", ["red", "blue"], 2)
    with pytest.raises(DataError, match="no readable images"):
        dinotune.train(task="classify", data=str(tmp_path / "cls"), max_image_pixels=1000,
                       **tiny_options(tmp_path / "r1"))
    coco = make_coco_dataset(tmp_path / "coco", {"train": [1, 1], "val": [1]}, size=(48, 48))
    with pytest.raises(DataError, match="no usable training images"):
        dinotune.train(task="detect", data=str(coco), max_image_pixels=1000, **tiny_options(tmp_path / "r2"))
    seg = make_segmentation_folders(tmp_path / "seg", {"train": 2, "val": 1}, size=48)
    with pytest.raises(DataError, match="none of the 2 images could be read"):
        dinotune.train(task="segment", data=str(seg), max_image_pixels=1000, **tiny_options(tmp_path / "r3"))
