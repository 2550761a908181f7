"""First-day frictions of detection on real datasets: Roboflow's data.yaml, YOLO models whose
classes are not the dataset's, blank drawings, more objects than queries, file names in predict's
JSON, YOLO class indices, and where drawings go."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinotune
from dinotune import api
from dinotune.config import build_config
from dinotune.errors import ConfigError, DataError
from dinotune.tasks.detect import compare as cmp
from dinotune.tasks.detect.data import find_detection_data
from dinotune.tasks.detect.task import DetectTask
from tests.conftest import make_coco_dataset

MIN = 1.0
W, H = 64, 48
COLOURS = [(220, 40, 40), (40, 60, 220)]
# per split, per image: (class, x0, y0, x1, y1) in pixels; "poly" marks objects written as polygons
OBJECTS = {
    "train": [[(0, 4, 4, 24, 20), (1, 30, 10, 60, 40, "poly")], [(1, 10, 8, 40, 30)],
              [(0, 2, 2, 20, 16, "poly"), (0, 30, 4, 50, 20), (1, 8, 24, 40, 44)], [(0, 20, 10, 44, 38)]],
    "valid": [[(1, 6, 6, 30, 30), (0, 34, 20, 60, 44, "poly")], [(0, 10, 10, 40, 40)]],
}


def _label_line(obj: tuple) -> str:
    cls, x0, y0, x1, y1 = obj[:5]
    if len(obj) > 5:  # a YOLO-seg polygon: the four corners, clockwise
        pts = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        return f"{cls} " + " ".join(f"{x / W:.6f} {y / H:.6f}" for x, y in pts)
    return f"{cls} {(x0 + x1) / 2 / W:.6f} {(y0 + y1) / 2 / H:.6f} {(x1 - x0) / W:.6f} {(y1 - y0) / H:.6f}"


def make_roboflow(root: Path, seed: int = 0) -> Path:
    """A Roboflow YOLO export: ``data.yaml`` whose splits read ``../train/images`` (relative to
    the yaml's parent, as Roboflow writes them), ``train/images``, ``train/labels``,
    ``valid/images``, ``valid/labels``; labels mix box and polygon lines."""
    rng = np.random.default_rng(seed)
    for split, images in OBJECTS.items():
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for i, objs in enumerate(images):
            pixels = rng.integers(90, 160, (H, W, 3)).astype(np.uint8)
            for obj in objs:
                cls, x0, y0, x1, y1 = obj[:5]
                pixels[y0:y1, x0:x1] = COLOURS[cls]
            Image.fromarray(pixels).save(root / split / "images" / f"{split}_{i}_jpg.rf.abc{i}.jpg")
            (root / split / "labels" / f"{split}_{i}_jpg.rf.abc{i}.txt").write_text(
                "\n".join(_label_line(o) for o in objs) + "\n")
    (root / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\ntest: ../test/images\n\n"
                                    "nc: 2\nnames: ['cat', 'dog']\n\nroboflow:\n  workspace: me\n  version: 1\n")
    return root


# ----------------------------------------------------------------------------- 1. Roboflow yaml
def test_roboflow_data_yaml_is_read(tmp_path):
    root = make_roboflow(tmp_path / "rf")
    train = find_detection_data(root, "train", min_box_size=MIN)
    assert len(train) == 4 and train.class_names == ["cat", "dog"]
    assert all(im.path.parent == root / "train" / "images" for im in train.images)
    first = train.targets(train.images[0].id)  # a box line and a polygon line
    assert [a.category_id for a in first] == [1, 2]
    assert first[0].bbox == pytest.approx((4, 4, 24, 20), abs=1e-3)
    assert first[1].bbox == pytest.approx((30, 10, 60, 40), abs=1e-3)
    val = find_detection_data(root / "data.yaml", "val", min_box_size=MIN)
    assert [im.path.parent for im in val.images] == [root / "valid" / "images"] * 2
    assert val.num_boxes() == 3


def test_missing_split_folder_names_both_places_tried(tmp_path):
    root = make_roboflow(tmp_path / "rf")
    (root / "data.yaml").write_text("train: ../training/images\nval: ../valid/images\nnames: [cat, dog]\n")
    with pytest.raises(DataError) as e:
        find_detection_data(root, "train", min_box_size=MIN)
    assert str(tmp_path / "training" / "images") in str(e.value)
    assert str(root / "training" / "images") in str(e.value)


# ------------------------------------------------------ 5. more objects than the detector's queries
def test_more_objects_than_queries_warns_at_build_data(tmp_path, capsys):
    root = make_roboflow(tmp_path / "rf")
    cfg = build_config("detect", data=str(root), num_queries=2, image_size=56, check_images="off")
    DetectTask(cfg).build_data(None, 14)
    err = capsys.readouterr().err
    assert "up to 3 objects in one image" in err and "1 of 4 images" in err
    assert "2 object queries" in err and "--num-queries to at least 3" in err
    DetectTask(build_config("detect", data=str(root), num_queries=3, image_size=56)).build_data(None, 14)
    assert "object queries" not in capsys.readouterr().err


def test_crowded_warning_names_the_lightweight_preset(tmp_path, capsys):
    from dinotune.tasks.detect.coco import Annotation, DetectionSource, ImageRecord
    from dinotune.tasks.detect.task import _warn_if_crowded

    objects = [Annotation((i, 0, i + 1, 1), 0, 1) for i in range(33)]
    source = DetectionSource("busy.json", [ImageRecord(1, tmp_path / "a.jpg", 40, 40)], {1: objects},
                             [{"id": 1, "name": "bird"}])
    _warn_if_crowded(source, 25, lightweight=True)
    err = capsys.readouterr().err
    assert "up to 33 objects" in err and "25 object queries (set by --lightweight)" in err


# ------------------------------------------------- a tiny run on the Roboflow data (items 4, 9, 12)
@pytest.fixture(scope="module")
def rf_run(tmp_path_factory):
    root = make_roboflow(tmp_path_factory.mktemp("rf") / "data")
    result = dinotune.train(task="detect", data=str(root), model="random:tiny", image_size=56, batch_size=4,
                            workers=0, progress=False, device="cpu", hidden_dim=32, num_heads=2, ffn_dim=64,
                            decoder_layers=1, num_queries=5, sampling_points=1, epochs=1,
                            out=str(tmp_path_factory.mktemp("rf") / "run"))
    return root, Path(result["run_dir"])


def test_evaluation_metrics_count_images(rf_run):
    root, run = rf_run
    metrics = dinotune.load(run, device="cpu").evaluate(str(root))
    assert metrics["images"] == 2 and isinstance(metrics["images"], int)
    assert json.loads((run / "best_metrics.json").read_text())["images"] == 2


def test_predict_json_keeps_file_names_and_loads_in_pycocotools(rf_run):
    from pycocotools.coco import COCO

    root, run = rf_run
    loaded = dinotune.load(run, device="cpu")
    results = loaded.predict(root / "valid" / "images", top_k=3)
    flat = json.loads(loaded.task.format_predictions(results, "coco"))
    assert len(flat) == 6
    by_id = {r["image_id"]: r["image"] for r in results}
    assert all(r["file_name"] == by_id[r["image_id"]] for r in flat)
    assert {Path(r["file_name"]).name for r in flat} == {p.name for p in (root / "valid" / "images").iterdir()}
    gt = COCO()
    gt.dataset = {"images": [{"id": i, "width": W, "height": H} for i in by_id], "annotations": [],
                  "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]}
    gt.createIndex()
    assert len(gt.loadRes(flat).getAnnIds()) == 6


def test_class_map_without_yolo_is_refused(rf_run, tmp_path):
    root, run = rf_run
    with pytest.raises(ConfigError, match="needs --yolo"):
        api.compare(data=str(root), runs=[run], out=tmp_path / "c", device="cpu", class_map="1=dog")


def test_category_ids_yolo_gives_class_indices(rf_run):
    root, run = rf_run
    loaded = dinotune.load(run, device="cpu")
    coco = loaded.predict(root / "valid" / "images", top_k=5)
    yolo = loaded.predict(root / "valid" / "images", top_k=5, category_ids="yolo")
    ids = [[d["category_id"] for d in r["detections"]] for r in coco]
    assert [[d["category_id"] + 1 for d in r["detections"]] for r in yolo] == ids
    assert {i for row in ids for i in row} <= {1, 2}
    with pytest.raises(ConfigError, match="--category-ids"):
        loaded.predict(root / "valid" / "images", category_ids="voc")
    # compare scores with the dataset's ids whatever the run's own setting
    loaded.cfg.inference.category_ids = "yolo"
    found = cmp.RunDetector(loaded, "r").detect(sorted((root / "valid" / "images").iterdir()))
    assert [d.category_ids.tolist()[:5] for d in found] == ids  # its own top-k is 100


def test_predict_draw_writes_into_the_folder_and_says_when_nothing_is_drawn(rf_run, tmp_path, capsys):
    root, run = rf_run
    loaded = dinotune.load(run, device="cpu")
    capsys.readouterr()
    draw = tmp_path / "drawn"
    loaded.predict(root / "valid" / "images", draw=draw, draw_threshold=1.0)
    assert sorted(p.suffix for p in draw.iterdir()) == [".jpg", ".jpg", ".png"]  # 2 images + the histogram
    assert (draw / "confidence_histogram.png").is_file() and not (draw / "samples").exists()
    err = capsys.readouterr().err
    assert "no detection at or above 1 in 2 images (highest score 0." in err and "lower --draw-threshold" in err
    loaded.predict(root / "valid" / "images", draw=draw, draw_threshold=0.0)
    assert "no detection" not in capsys.readouterr().err


def test_analyze_draws_ground_truth_beside_predictions(rf_run, tmp_path, capsys, monkeypatch):
    import dinotune.tasks.detect.analysis as analysis

    root, run = rf_run
    calls = []
    real = analysis.draw_detections

    def spy(image, boxes, labels, names, scores=None, **kw):
        calls.append((len(boxes), scores is None))
        return real(image, boxes, labels, names, scores, **kw)

    monkeypatch.setattr(analysis, "draw_detections", spy)
    loaded = dinotune.load(run, device="cpu")
    out = tmp_path / "analysis"
    files = loaded.task.sample_charts(loaded, str(root), "val", out, 2)
    samples = sorted((out / "samples").glob("*.jpg"))
    assert len(samples) == 2 and (out / "confidence_histogram.png") in files
    assert all(Image.open(p).width > 2 * W for p in samples)  # ground truth | prediction
    assert [c for c in calls if c[1]] == [(2, True), (1, True)]  # the ground truth of both images
    # the run's draw threshold (0.3) leaves a random model blank, and says so; an override draws
    assert "analyze: no detection at or above 0.3" in capsys.readouterr().err
    settings = dataclasses.replace(loaded.cfg.inference, draw_threshold=0.0)
    loaded.task.sample_charts(loaded, str(root), "val", out, 2, settings=settings)
    assert "no detection" not in capsys.readouterr().err


# --------------------------------------------------------------- 3. YOLO classes vs the dataset
def test_class_map_forms(tmp_path):
    assert cmp.parse_class_map("0=person, 1 = bicycle") == {"0": "person", "1": "bicycle"}
    assert cmp.parse_class_map({0: "red"}) == {"0": "red"}
    assert cmp.parse_class_map(None) == {} and cmp.parse_class_map("") == {}
    f = tmp_path / "map.json"
    f.write_text(json.dumps({"0": "red", "car": "blue"}))
    assert cmp.parse_class_map(str(f)) == {"0": "red", "car": "blue"}
    with pytest.raises(ConfigError, match="MODEL_CLASS=DATASET_CATEGORY"):
        cmp.parse_class_map("0:person")


def test_model_without_a_common_class_is_refused():
    cats = [{"id": 3, "name": "red"}, {"id": 7, "name": "blue"}]
    numbered = {i: str(i) for i in range(80)}
    with pytest.raises(DataError) as e:
        cmp.match_classes(numbered, cats, {}, "yolo:yolov8n.yaml (random weights)", random_weights=True)
    msg = str(e.value)
    assert "yolo:yolov8n.yaml (random weights)" in msg and "'0', '1'" in msg and "'red', 'blue'" in msg
    assert "--class-map" in msg and "random weights" in msg
    mapping = cmp.match_classes(numbered, cats, {"0": "red", "1": "BLUE"}, "m")
    assert mapping[0] == 3 and mapping[1] == 7 and mapping[2] is None
    with pytest.raises(ConfigError, match="'green' is not a category"):
        cmp.match_classes(numbered, cats, {"0": "green"}, "m")
    with pytest.raises(ConfigError, match="neither a class index nor a class name"):
        cmp.match_classes(numbered, cats, {"car": "red"}, "m")


class _FakeBoxes:
    def __init__(self, cls: list[int]):
        self.cls = torch.tensor(cls, dtype=torch.float32)
        self.xyxy = torch.tensor([[2.0, 2.0, 20.0, 20.0]] * len(cls)).reshape(-1, 4)
        self.conf = torch.linspace(0.9, 0.5, len(cls))


class _FakeYOLO:
    """Stands in for ``ultralytics.YOLO``: classes 'red' and 'unicorn', one detection of each per image."""

    names = {0: "red", 1: "unicorn"}

    def __init__(self, weights: str):
        self.weights = weights

    def predict(self, path, **kw):
        return [types.SimpleNamespace(boxes=_FakeBoxes([0, 1, 1]))]


def test_compare_counts_dropped_detections_and_marks_random_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ultralytics", types.SimpleNamespace(YOLO=_FakeYOLO))
    source = find_detection_data(make_coco_dataset(tmp_path / "coco", {"val": [1, 2, 1]}), "val", min_box_size=MIN)
    det = cmp.YoloDetector("yolov8n.yaml", source.categories, 64)
    assert det.name == "yolo:yolov8n.yaml (random weights)"
    result = cmp.compare([det], source, tmp_path / "out")
    row = result["rows"]["yolo:yolov8n.yaml (random weights)"]
    assert row["dropped_detections"] == 6
    err = capsys.readouterr().err
    assert "dropped 6 of 9 detections" in err and "'unicorn' 6" in err and "--class-map" in err
    table = (tmp_path / "out" / "compare.md").read_text()
    assert "| yolo:yolov8n.yaml (random weights) |" in table and "dropped 6 of 9" in table and "untrained" in table
    mapped = cmp.YoloDetector("w.pt", source.categories, 64, class_map={"unicorn": "blue"})
    assert mapped.name == "yolo:w.pt" and mapped.class_to_category == {0: 3, 1: 7}
    mapped.detect([im.path for im in source.images])
    assert mapped.dropped == 0 and mapped.notes == []


class _NumberedYOLO(_FakeYOLO):
    """A model built from a YAML: classes named '0'..'79'."""

    names = {i: str(i) for i in range(80)}


def test_api_compare_refuses_unmatched_yolo_unless_class_map(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ultralytics", types.SimpleNamespace(YOLO=_NumberedYOLO))
    data = make_coco_dataset(tmp_path / "coco", {"val": [1, 2]})
    with pytest.raises(DataError, match=r"yolo:yolov8n.yaml \(random weights\): none of its 80 classes"):
        api.compare(data=str(data), yolo=["yolov8n.yaml"], out=tmp_path / "a", device="cpu")
    table = api.compare(data=str(data), yolo=["yolov8n.yaml"], out=tmp_path / "b", device="cpu",
                             class_map="1=blue")
    assert "| yolo:yolov8n.yaml (random weights) |" in table
    saved = json.loads((tmp_path / "b" / "compare.json").read_text())
    assert saved["detectors"]["yolo:yolov8n.yaml (random weights)"]["dropped_detections"] == 2  # class 0
