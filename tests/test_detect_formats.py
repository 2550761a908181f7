"""Detection data as real exports write it: a Roboflow COCO export (its supercategory-only category,
its train/ valid/ test/ folders, a folder holding _annotations.coco.json), test splits in every
layout (``eval --split test``), Pascal VOC XML (the devkit, labelImg, CVAT) with ``difficult``
objects and ImageSets lists, and hostile XML."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dinotune
from dinotune.cli import main
from dinotune.config import build_config
from dinotune.errors import DataError
from dinotune.tasks.detect.coco_eval import coco_evaluate
from dinotune.tasks.detect.data import describe, find_detection_data, scan_source
from dinotune.tasks.detect.task import DetectTask
from dinotune.utils import set_quiet
from tests.conftest import make_coco_dataset
from tests.export_runs import DETR

pytestmark = pytest.mark.usefixtures("one_thread")

MIN = 1.0
W, H = 64, 48
COLOURS = {"rbc": (220, 40, 40), "wbc": (40, 60, 220), "cat": (220, 40, 40), "dog": (40, 60, 220)}
TINY = dict(model="random:tiny", batch_size=4, workers=0, progress=False, device="cpu", epochs=1, **DETR)
# per split, per image: (class, x0, y0, x1, y1) in 0-based pixels
BOXES = {
    "train": [[("rbc", 4, 4, 24, 20), ("wbc", 30, 10, 60, 40)], [("wbc", 10, 8, 40, 30)],
              [("rbc", 2, 2, 20, 16), ("rbc", 30, 4, 50, 20)], [("rbc", 20, 10, 44, 38)]],
    "valid": [[("wbc", 6, 6, 30, 30)], [("rbc", 10, 10, 40, 40)]],
    "test": [[("rbc", 4, 20, 30, 44)], [("wbc", 34, 4, 60, 30), ("rbc", 4, 4, 20, 20)], [("wbc", 8, 8, 28, 28)]],
}


def _picture(path: Path, boxes: list[tuple], seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(90, 160, (H, W, 3)).astype(np.uint8)
    for name, x0, y0, x1, y1 in boxes:
        pixels[y0:y1, x0:x1] = COLOURS[name]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def loud():
    """Info lines reach stderr (the suite runs quiet)."""
    set_quiet(False)
    yield
    set_quiet(True)


# ------------------------------------------------------------------------------- dataset makers
def make_roboflow_coco(root: Path, extra_categories: list[dict] = ()) -> Path:
    """A Roboflow COCO export: ``<split>/_annotations.coco.json`` + images beside it, category 0 the
    supercategory of the real classes (no boxes), ids from 0."""
    cats = [{"id": 0, "name": "cells", "supercategory": "none"}, {"id": 1, "name": "rbc", "supercategory": "cells"},
            {"id": 2, "name": "wbc", "supercategory": "cells"}, *extra_categories]
    cid = {"rbc": 1, "wbc": 2}
    for split, images in BOXES.items():
        entries, anns = [], []
        for i, boxes in enumerate(images):
            name = f"{split}_{i}_png.rf.{i}abc.png"
            _picture(root / split / name, boxes, seed=len(split) * 10 + i)
            entries.append({"id": i, "file_name": name, "width": W, "height": H})
            for c, x0, y0, x1, y1 in boxes:
                anns.append({"id": len(anns), "image_id": i, "category_id": cid[c], "bbox": [x0, y0, x1 - x0, y1 - y0],
                             "area": (x1 - x0) * (y1 - y0), "iscrowd": 0, "segmentation": []})
        (root / split / "_annotations.coco.json").write_text(json.dumps(
            {"info": {}, "images": entries, "annotations": anns, "categories": cats}))
    return root


def make_yolo(root: Path) -> Path:
    """A Roboflow YOLO export with a test split: ``data.yaml`` + ``<split>/images``, ``<split>/labels``."""
    index = {"rbc": 0, "wbc": 1}
    for split, images in BOXES.items():
        for i, boxes in enumerate(images):
            _picture(root / split / "images" / f"{split}_{i}.png", boxes, seed=i)
            (root / split / "labels").mkdir(parents=True, exist_ok=True)
            (root / split / "labels" / f"{split}_{i}.txt").write_text("".join(
                f"{index[c]} {(x0 + x1) / 2 / W:.6f} {(y0 + y1) / 2 / H:.6f} {(x1 - x0) / W:.6f} {(y1 - y0) / H:.6f}\n"
                for c, x0, y0, x1, y1 in boxes))
    (root / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\ntest: ../test/images\n"
                                    "nc: 2\nnames: ['rbc', 'wbc']\n")
    return root


def voc_xml(file_name: str, objects: list[tuple], size: tuple[int, int] = (W, H)) -> str:
    """A labelImg-style annotation; objects ``(name, xmin, ymin, xmax, ymax[, difficult])`` in VOC's
    1-based inclusive pixel indices."""
    body = "".join(
        f"<object><name>{o[0]}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{int(o[5]) if len(o) > 5 else 0}</difficult><bndbox><xmin>{o[1]}</xmin><ymin>{o[2]}</ymin>"
        f"<xmax>{o[3]}</xmax><ymax>{o[4]}</ymax></bndbox></object>" for o in objects)
    return (f"<annotation><folder>JPEGImages</folder><filename>{file_name}</filename><path>/home/me/{file_name}</path>"
            f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>{body}</annotation>")


def make_voc(root: Path, lists: bool = True) -> Path:
    """A VOC set: ``JPEGImages/*.png``, ``Annotations/*.xml`` (boxes 1-based, ``difficult`` on one
    large object of the first val image), ``ImageSets/Main/{train,val,test}.txt``."""
    (root / "Annotations").mkdir(parents=True)
    split_of = {}
    for split, images in (("train", BOXES["train"]), ("val", BOXES["valid"]), ("test", BOXES["test"])):
        for i, boxes in enumerate(images):
            stem = f"{split}_{i:03d}"
            split_of[stem] = split
            names = [("cat" if c == "rbc" else "dog", x0 + 1, y0 + 1, x1, y1) for c, x0, y0, x1, y1 in boxes]
            if split == "val" and i == 0:
                names.append(("cat", 36, 20, 62, 46, True))  # difficult: never trained, ignored by AP
            _picture(root / "JPEGImages" / f"{stem}.png", boxes, seed=i + 7)
            (root / "Annotations" / f"{stem}.xml").write_text(voc_xml(f"{stem}.png", names))
    if lists:
        (root / "ImageSets" / "Main").mkdir(parents=True)
        for split in ("train", "val", "test"):
            (root / "ImageSets" / "Main" / f"{split}.txt").write_text(
                "".join(f"{s}\n" for s, sp in split_of.items() if sp == split))
    return root


# ------------------------------------------------------------------- 1. Roboflow's supercategory
def test_roboflow_supercategory_is_left_out_and_said(tmp_path, capsys, loud):
    root = make_roboflow_coco(tmp_path / "rf")
    train = find_detection_data(root, "train", min_box_size=MIN)
    assert train.class_names == ["rbc", "wbc"] and [c["id"] for c in train.categories] == [1, 2]
    err = capsys.readouterr().err
    assert "left out 1 category" in err and "id 0 'cells' (parent of 2)" in err
    table = describe(train)
    assert table.splitlines()[0].endswith("4 images, 6 boxes, 2 classes")
    assert "rbc 4" in table and "wbc 2" in table
    # validation is read against the training categories: the same two, nothing said again
    val = find_detection_data(root, "val", categories=train.categories, min_box_size=MIN)
    assert val.categories == train.categories and "left out" not in capsys.readouterr().err
    # a checkpoint's categories win (a run trained before the parent was left out keeps it)
    old = [{"id": 0, "name": "cells"}, {"id": 1, "name": "rbc"}, {"id": 2, "name": "wbc"}]
    assert find_detection_data(root, "val", categories=old, min_box_size=MIN).class_names == ["cells", "rbc", "wbc"]


def test_unused_category_that_is_nobodys_parent_stays_a_class(tmp_path):
    root = make_roboflow_coco(tmp_path / "rf", [{"id": 3, "name": "platelet", "supercategory": "cells"}])
    train = find_detection_data(root, "train", min_box_size=MIN)
    assert train.class_names == ["rbc", "wbc", "platelet"]
    assert train.boxes_per_class() == [4, 2, 0] and "platelet 0" in describe(train)


# ------------------------------------------------------------------- 2. test splits and layouts
def test_a_folder_holding_annotations_coco_json_is_read(tmp_path):
    root = make_roboflow_coco(tmp_path / "rf")
    test = find_detection_data(root / "test", "test", min_box_size=MIN)
    assert len(test) == 3 and test.class_names == ["rbc", "wbc"]
    assert len(find_detection_data(root / "valid", "val", min_box_size=MIN)) == 2
    # the train folder read as validation would score a model on its training images: refused
    with pytest.raises(DataError) as e:
        find_detection_data(root / "train", "val", min_box_size=MIN)
    assert "the train split of an export" in str(e.value) and str(root / "valid") in str(e.value)
    assert "eval --split train too" in str(e.value)
    with pytest.raises(DataError, match="eval --split test reads this folder itself"):
        find_detection_data(root / "test", "val", min_box_size=MIN)


def test_test_split_in_every_layout(tmp_path):
    rf = make_roboflow_coco(tmp_path / "rf")
    assert len(find_detection_data(rf, "test", min_box_size=MIN)) == 3
    yolo = make_yolo(tmp_path / "yolo")
    assert len(find_detection_data(yolo, "test", min_box_size=MIN)) == 3
    coco = make_coco_dataset(tmp_path / "coco", {"train": [1, 2], "val": [1], "test": [2, 1, 1]})
    assert len(find_detection_data(coco, "test", min_box_size=MIN)) == 3
    voc = make_voc(tmp_path / "voc")
    assert len(find_detection_data(voc, "test", min_box_size=MIN)) == 3
    with pytest.raises(DataError, match="no test detection data found"):
        find_detection_data(make_coco_dataset(tmp_path / "c2", {"train": [1]}), "test", min_box_size=MIN)


def test_a_split_folder_of_an_export_points_at_the_export(tmp_path):
    yolo = make_yolo(tmp_path / "yolo")
    with pytest.raises(DataError) as e:
        find_detection_data(yolo / "train", "train", min_box_size=MIN)
    assert "data.yaml is in the folder above" in str(e.value) and f"--data {yolo}" in str(e.value)


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("formats")
    root = make_roboflow_coco(base / "rf")
    result = dinotune.train(task="detect", data=str(root), out=str(base / "run"), **TINY)
    return base, root, Path(result["run_dir"])


def test_roboflow_export_trains_with_its_real_classes(coco_run):
    _, _, run = coco_run
    loaded = dinotune.load(run, device="cpu")
    assert loaded.bundle.class_names == ["rbc", "wbc"]
    assert [c["id"] for c in loaded.bundle.categories] == [1, 2]


def test_eval_split_test(coco_run, capsys):
    base, root, run = coco_run
    loaded = dinotune.load(run, device="cpu")
    assert loaded.evaluate(str(root), split="test")["images"] == 3  # Roboflow's test/
    assert loaded.evaluate(str(root / "test"), split="test")["images"] == 3  # the folder itself
    yolo = make_yolo(base / "yolo")  # data.yaml test: entry, class index + 1 = the run's ids
    assert loaded.evaluate(str(yolo), split="test")["images"] == 3
    out = base / "test.json"
    assert main(["eval", str(run), "--data", str(root), "--split", "test", "--device", "cpu", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["images"] == 3


# ---------------------------------------------------------------------------- 3. Pascal VOC XML
def test_voc_boxes_difficult_and_classes(tmp_path):
    root = make_voc(tmp_path / "voc")
    train = find_detection_data(root, "train", min_box_size=MIN)
    assert train.class_names == ["cat", "dog"] and [c["id"] for c in train.categories] == [1, 2]
    first = train.targets(train.images[0].id)
    assert first[0].bbox == (4.0, 4.0, 24.0, 20.0)  # xmin 5 (1-based) -> 4; xmax 24 inclusive -> 24
    val = find_detection_data(root, "val", categories=train.categories, min_box_size=MIN)
    assert val.report.difficult == 1 and val.report.crowd == 1 and val.num_boxes() == 2
    assert "1 of them VOC 'difficult' objects" in val.report.summary()
    gt = val.coco_gt()
    assert sum(a["iscrowd"] for a in gt["annotations"]) == 1
    # a perfect prediction of every non-difficult box: AP 1.0, the difficult box unmatched but ignored
    results = [{"image_id": im.id, "category_id": a.category_id, "score": 0.9,
                "bbox": [a.bbox[0], a.bbox[1], a.bbox[2] - a.bbox[0], a.bbox[3] - a.bbox[1]]}
               for im in val.images for a in val.targets(im.id)]
    assert coco_evaluate(gt, results, img_ids=val.image_ids)["AP"] == pytest.approx(1.0)
    for a in gt["annotations"]:  # the same box counted as an object: the check is not trivially 1
        a["iscrowd"] = 0
    assert coco_evaluate(gt, results, img_ids=val.image_ids)["AP"] < 0.99


def test_voc_without_lists_holds_out_val_fraction(tmp_path, capsys, loud):
    root = make_voc(tmp_path / "voc", lists=False)
    with pytest.raises(DataError, match="--val-fraction"):
        find_detection_data(root, "val", min_box_size=MIN)
    train = find_detection_data(root, "train", min_box_size=MIN, val_fraction=0.25, seed=3)
    val = find_detection_data(root, "val", categories=train.categories, min_box_size=MIN, val_fraction=0.25, seed=3)
    assert len(train) + len(val) == 9 and len(val) == 2 and not set(train.image_ids) & set(val.image_ids)
    assert "2 of 9 training images held out" in capsys.readouterr().err
    # the config's data.val_fraction reaches the reader, drawn with train.seed
    cfg = build_config("detect", data=str(root), val_fraction=0.25, seed=3, image_size=56, check_images="off")
    data = DetectTask(cfg).build_data(None, 14)
    assert sorted(data.val.image_ids) == sorted(val.image_ids)


def test_voc_size_is_checked_against_the_image(tmp_path, capsys):
    root = make_voc(tmp_path / "voc")
    (root / "Annotations" / "train_000.xml").write_text(voc_xml("train_000.png", [("cat", 9, 9, 48, 40)], (128, 96)))
    (root / "Annotations" / "train_001.xml").write_text(voc_xml("train_001.png", [("cat", 9, 9, 48, 40)], (64, 64)))
    source = scan_source(find_detection_data(root, "train", min_box_size=MIN), "fast")
    assert len(source) == 3  # the 2x rescale kept, the 64x64 claim skipped with its reason
    assert "train_000.png (64x48, annotated as 128x96)" in capsys.readouterr().err
    (path, why), = source.report.skipped.skipped
    assert path.endswith("train_001.png") and "not a plausible rescale" in why


@pytest.mark.parametrize("bad, message", [
    ("<object><name>cat</name><difficult>0</difficult></object>", "object[2] ('cat'): no <bndbox>"),
    ("<object><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox>"
     "</object>", "object[2]: no <name>"),
    ("<object><name>cat</name><bndbox><xmin>30</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>",
     "object[2] ('cat'): <bndbox> is inverted"),
    ("<object><name>cat</name><bndbox><xmin>one</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object>",
     "object[2] ('cat') <bndbox>: <xmin> is not a number: 'one'"),
    ("<object><name>cat</name><bndbox><xmin>70</xmin><ymin>1</ymin><xmax>90</xmax><ymax>5</ymax></bndbox></object>",
     "object[2] ('cat'): <bndbox> (70, 1, 90, 5) lies outside the 64 x 48 image"),
    ("<object><name>cat</name><difficult>maybe</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax>"
     "<ymax>5</ymax></bndbox></object>", "object[2] ('cat'): <difficult> must be 0 or 1"),
])
def test_bad_voc_entries_are_named_with_file_and_object(tmp_path, bad, message):
    root = make_voc(tmp_path / "voc")
    xml = root / "Annotations" / "train_002.xml"
    xml.write_text(xml.read_text().replace("</annotation>", bad + "</annotation>"))
    with pytest.raises(DataError) as e:
        find_detection_data(root, "train", min_box_size=MIN)
    assert f"{xml}: {message}" in str(e.value)


@pytest.fixture(scope="module")
def voc_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("voc")
    root = make_voc(base / "voc")
    result = dinotune.train(task="detect", data=str(root), out=str(base / "run"), **TINY)
    return root, Path(result["run_dir"])


def test_voc_trains_evaluates_and_predicts(voc_run):
    root, run = voc_run
    assert json.loads((run / "best_metrics.json").read_text())["images"] == 2
    loaded = dinotune.load(run, device="cpu")
    assert loaded.bundle.class_names == ["cat", "dog"]
    metrics = loaded.evaluate(str(root), split="test")
    assert metrics["images"] == 3 and 0.0 <= metrics["AP"] <= 1.0
    preds = loaded.predict(root / "JPEGImages" / "test_000.png", top_k=3)
    assert len(preds) == 1 and len(preds[0]["detections"]) <= 3


# ------------------------------------------------------------------------------- 4. hostile XML
LAUGHS = ('<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
          + "".join(f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">' for i in range(1, 10))
          + ']><annotation><filename>&lol9;</filename></annotation>')


@pytest.mark.parametrize("text, message", [
    (LAUGHS, "refused: a <!DOCTYPE> declaration"),
    ('<?xml version="1.0"?><!DOCTYPE a SYSTEM "file:///etc/passwd"><annotation/>', "refused: a <!DOCTYPE>"),
    ('<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><annotation>&x;</annotation>',
     "refused: a <!DOCTYPE>"),
    (voc_xml("../../secret.png", []), "<filename> '../../secret.png' climbs out of the folder"),
    (voc_xml("/etc/hostname", []), "<filename> '/etc/hostname' is an absolute path"),
    ("<annotation><filename>a.png</filename>", "not well-formed XML"),
    ("<annotation>&undefined;</annotation>", "not well-formed XML"),
    ("<svg/>", "not a Pascal VOC annotation"),
])
def test_hostile_xml_is_refused_by_name(tmp_path, text, message):
    root = make_voc(tmp_path / "voc")
    xml = root / "Annotations" / "train_001.xml"
    xml.write_text(text)
    with pytest.raises(DataError) as e:
        find_detection_data(root, "train", min_box_size=MIN)
    assert f"{xml}: " in str(e.value) and message in str(e.value)


def test_oversized_xml_and_escaping_list_ids_are_refused(tmp_path):
    root = make_voc(tmp_path / "voc")
    xml = root / "Annotations" / "train_001.xml"
    xml.write_text("<annotation>" + " " * (5 << 20) + "</annotation>")
    with pytest.raises(DataError, match="larger than 4 MiB"):
        find_detection_data(root, "train", min_box_size=MIN)
    (root / "ImageSets" / "Main" / "test.txt").write_text("test_000\n../../../etc/passwd\n")
    with pytest.raises(DataError) as e:
        find_detection_data(root, "test", min_box_size=MIN)
    assert "test.txt, line 2: image id '../../../etc/passwd' leads outside Annotations/" in str(e.value)


# --------------------------------------------------------------------- 5. classification's test/
def test_classification_reads_a_test_folder_or_says_there_is_none(tmp_path):
    from dinotune.tasks.classify.data import build_eval_dataset
    from tests.conftest import make_class_folders

    make_class_folders(tmp_path / "d" / "train", ["red", "blue"], 2, size=32, seed=1)
    make_class_folders(tmp_path / "d" / "val", ["red", "blue"], 1, size=32, seed=2)
    with pytest.raises(DataError, match="no test/ folder"):
        build_eval_dataset(str(tmp_path / "d"), ["blue", "red"], lambda x: x, split="test")
    make_class_folders(tmp_path / "d" / "test", ["red", "blue"], 3, size=32, seed=3)
    assert len(build_eval_dataset(str(tmp_path / "d"), ["blue", "red"], lambda x: x, split="test")) == 6
