"""Instance segmentation end to end through the CLI, on data the tests make (COCO polygons and
YOLO-seg): train, eval (box and mask AP, equal to pycocotools on predict's JSON), predict (COCO
results with RLE, CSV, drawings), analyze, corruptions, Mask R-CNN, and ONNX export with the same
instances as the PyTorch path."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dinotune.cli import main
from tests.conftest import make_instance_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model", "random:tiny", "--image-size", "56", "--batch-size", "2", "--workers", "0", "--no-progress",
        "--device", "cpu", "--hidden-dim", "32", "--num-heads", "2", "--ffn-dim", "64", "--decoder-layers", "1",
        "--num-queries", "10", "--sampling-points", "2", "--mask-dim", "16", "--mask-scale", "2",
        "--pyramid-scales", "2", "1", "--mask-points", "256"]


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("inst")
    data = make_instance_dataset(root / "data", {"train": [2, 1, 2, 1], "val": [2, 1]})
    run = root / "run"
    assert main(["train", "instance", "--data", str(data), "--out", str(run), "--epochs", "2", "--adapter", "full",
                 "--lr", "1e-3", *TINY]) == 0
    return data, run


def _pycocotools_segm(gt_file: Path, results: list[dict]) -> dict[str, float]:
    gt = COCO(str(gt_file))
    if not results:
        return {"AP": 0.0, "AP50": 0.0}
    evaluator = COCOeval(gt, gt.loadRes(results), "segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return {"AP": float(evaluator.stats[0]), "AP50": float(evaluator.stats[1])}


def test_train_records_box_and_mask_metrics(coco_run):
    data, run = coco_run
    best = json.loads((run / "best_metrics.json").read_text())
    assert best["monitor"]["key"] == "val/segm/AP"
    assert {"AP", "AP50", "segm", "segm/AP", "segm/AP50"} <= best.keys()
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "per_class_AP"} <= best["segm"].keys()
    assert best["segm/AP"] == best["segm"]["AP"] and set(best["segm"]["per_class_AP"]) == {"red", "blue"}
    meta = json.loads((run / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["task"] == "instance" and meta["class_names"] == ["red", "blue"]


def test_eval_mask_ap_equals_pycocotools_on_predicts_json(coco_run, tmp_path, capsys):
    data, run = coco_run
    assert main(["eval", str(run), "--data", str(data), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out)
    assert "segm/AP" in metrics and "mask AP" in captured.err  # the per-class table on the terminal
    full = json.loads((run / "eval" / "data-val" / "metrics.json").read_text())
    out = tmp_path / "preds.json"
    info = data / "annotations" / "instances_val.json"
    assert main(["predict", str(run), str(data / "val"), "--out", str(out), "--format", "coco",
                 "--image-info", str(info), "--device", "cpu"]) == 0
    results = json.loads(out.read_text())
    assert results and all(isinstance(r["segmentation"]["counts"], str) for r in results)
    reference = _pycocotools_segm(info, results)
    assert full["segm"]["AP"] == pytest.approx(reference["AP"], abs=0.02)
    assert full["segm"]["AP50"] == pytest.approx(reference["AP50"], abs=0.02)


def test_predict_records_csv_and_drawings(coco_run, tmp_path, capsys):
    data, run = coco_run
    draw = tmp_path / "drawn"
    capsys.readouterr()
    assert main(["predict", str(run), str(data / "val"), "--draw", str(draw), "--draw-threshold", "0",
                 "--device", "cpu"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 2
    for r in records:
        for d in r["detections"]:
            mask = mask_utils.decode(d["segmentation"])
            assert mask.shape == (r["height"], r["width"]) and int(mask.sum()) == d["area"]
    assert sorted(p.name for p in draw.glob("*.jpg")) == ["val_000.jpg", "val_001.jpg"]
    assert main(["predict", str(run), str(data / "val"), "--format", "csv", "--draw-threshold", "0",
                 "--device", "cpu"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0][-1] == "rle" and len(rows) == 1 + sum(len(r["detections"]) for r in records)


def test_analyze_draws_truth_beside_predictions(coco_run, capsys):
    data, run = coco_run
    assert main(["analyze", str(run), "--data", str(data), "--device", "cpu"]) == 0
    written = [Path(line.split(" ", 1)[1]) for line in capsys.readouterr().out.splitlines() if line.startswith("wrote")]
    assert any(p.parent.name == "samples" for p in written) and all(p.is_file() for p in written)


def test_onnx_export_gives_the_torch_instances(coco_run, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    data, run = coco_run
    export = tmp_path / "export"
    assert main(["export", str(run), "--format", "onnx", "--exporter", "legacy", "--out", str(export)]) == 0
    capsys.readouterr()
    assert main(["predict", str(run), str(data / "val"), "--draw-threshold", "0", "--device", "cpu"]) == 0
    torch_records = json.loads(capsys.readouterr().out)
    assert main(["predict", str(export), str(data / "val"), "--draw-threshold", "0",
                 "--draw", str(tmp_path / "drawn")]) == 0
    onnx_records = json.loads(capsys.readouterr().out)
    assert (tmp_path / "drawn" / "val_000.jpg").is_file()
    for a, b in zip(torch_records, onnx_records):
        assert len(a["detections"]) == len(b["detections"]) > 0
        for da, db in zip(a["detections"], b["detections"]):
            assert da["category_id"] == db["category_id"] and abs(da["score"] - db["score"]) <= 1e-3
            ma, mb = mask_utils.decode(da["segmentation"]), mask_utils.decode(db["segmentation"])
            union = np.logical_or(ma, mb).sum()
            assert union == 0 or np.logical_and(ma, mb).sum() / union >= 0.98


def test_corruption_robustness_for_instances(coco_run, capsys):
    data, run = coco_run
    assert main(["eval", str(run), "--data", str(data), "--corruptions", "--corruption-names", "fog",
                 "--severities", "1", "--device", "cpu"]) == 0
    assert "| fog |" in capsys.readouterr().out


def test_yolo_seg_trains_evaluates_and_predicts(tmp_path, capsys):
    data = make_instance_dataset(tmp_path / "yolo", {"train": [2, 1], "val": [1, 2]}, layout="yolo", seed=1)
    run = tmp_path / "run"
    assert main(["train", "instance", "--data", str(data), "--out", str(run), "--epochs", "1", *TINY]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(data), "--device", "cpu"]) == 0
    assert "segm/AP" in json.loads(capsys.readouterr().out)
    assert main(["predict", str(run), str(data / "images" / "val"), "--device", "cpu", "--draw-threshold", "0"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 2 and all("segmentation" in d for r in records for d in r["detections"])


def test_mask_rcnn_trains_and_evaluates(tmp_path, capsys):
    data = make_instance_dataset(tmp_path / "data", {"train": [2, 1], "val": [1, 1]})
    run = tmp_path / "run"
    flags = ["--model", "random:tiny", "--image-size", "56", "--batch-size", "2", "--workers", "0", "--no-progress",
             "--device", "cpu", "--head", "maskrcnn", "--hidden-dim", "32", "--rcnn-rpn-batch", "32",
             "--rcnn-roi-batch", "32", "--top-k", "10"]  # the mask head runs on every kept detection
    assert main(["train", "instance", "--data", str(data), "--out", str(run), "--epochs", "1", *flags]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(data), "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0.0 <= metrics["segm/AP"] <= 1.0 or metrics["segm/AP"] == -1.0
