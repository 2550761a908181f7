"""Detection end to end on real COCO data (coco_tiny), single-object heads, presets, and the
comparison harness."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import dinotune
from dinotune.cli import main
from dinotune.config import build_config
from dinotune.engine.logging import read_metrics
from dinotune.tasks.detect.compare import Detections, compare, score
from dinotune.tasks.detect.data import find_detection_data
from tests.conftest import shared_data

TINY_DETR = ["--model", "random:tiny", "--image-size", "112", "--batch-size", "8", "--workers", "0",
             "--no-progress", "--device", "cpu", "--hidden-dim", "32", "--num-heads", "2", "--ffn-dim", "64",
             "--decoder-layers", "2", "--num-queries", "20", "--sampling-points", "2"]


def tiny_detect_options(out: Path, **extra) -> dict:
    opts = dict(model="random:tiny", image_size=112, batch_size=8, workers=0, progress=False, device="cpu",
                hidden_dim=32, num_heads=2, ffn_dim=64, decoder_layers=2, num_queries=20, sampling_points=2,
                epochs=1, out=str(out))
    opts.update(extra)
    return opts


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory):
    """One small DETR run on coco_tiny through the CLI, shared by the tests below."""
    coco = shared_data("coco_tiny")
    out = tmp_path_factory.mktemp("det") / "run"
    code = main(["train", "detect", "--data", str(coco), "--out", str(out), "--epochs", "2", "--subset", "16",
                 "--subset-seed", "3", "--val-subset", "12", "--adapter", "lora", *TINY_DETR])
    assert code == 0
    return coco, out


def test_train_writes_run_folder(coco_run):
    coco, run = coco_run
    subset = json.loads((run / "subset.json").read_text())
    assert len(subset["image_ids"]) == 16 and subset["seed"] == 3
    assert len(json.loads((run / "val_subset.json").read_text())["image_ids"]) == 12
    history = read_metrics(run)
    assert [r["epoch"] for r in history] == [1, 2]
    assert {"train/loss", "train/loss_ce", "train/loss_bbox", "train/loss_giou", "val/AP", "val/AP50"} <= history[0].keys()
    best = json.loads((run / "best_metrics.json").read_text())
    assert len(best["per_class_AP"]) == 80 and len(best["precision_recall"]["recall"]) == 101
    # a DETR run is judged by COCO's metrics alone: a single-object "accuracy" beside AP read as the detector's
    single = {"accuracy", "precision", "recall", "f1", "mean_iou", "map50"}
    assert not single & best.keys() and not {f"val/{k}" for k in single} & history[0].keys()
    assert best["monitor"]["key"] == "val/AP" and best["monitor"]["mode"] == "max"
    assert json.loads((run / "results.json").read_text())["monitor"] == best["monitor"]
    meta = json.loads((run / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["categories"][-1] == {"id": 90, "name": "toothbrush"} and meta["num_classes"] == 80
    for f in ("training_curves.png", "per_class_ap.png", "precision_recall.png"):
        assert (run / f).stat().st_size > 1000


def test_eval_prints_coco_metrics(coco_run, capsys):
    coco, run = coco_run
    assert main(["eval", str(run), "--data", str(coco), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    metrics = json.loads(captured.out)
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"} <= metrics.keys()
    # the per-class table on the terminal: one row per category with its AP, then the overall row
    full = json.loads((run / "eval" / "coco_tiny-val" / "metrics.json").read_text())
    table = [line.split() for line in captured.err.splitlines() if line.split()[:1] in (["all"], *[[n] for n in full["per_class_AP"]])]
    assert table[-1][0] == "all" and len(table) == 1 + sum(" " not in n for n in full["per_class_AP"])
    assert float(table[-1][1]) == pytest.approx(100 * metrics["AP"], abs=0.006)
    assert not {"accuracy", "precision", "recall", "f1", "mean_iou", "map50"} & metrics.keys()  # single-object only
    assert 0.0 <= metrics["AP"] <= 1.0
    assert (run / "eval" / "coco_tiny-val" / "metrics.json").is_file()


def test_predict_writes_coco_results_with_original_ids(coco_run, tmp_path):
    coco, run = coco_run
    out = tmp_path / "results.json"
    draw = tmp_path / "drawn"
    assert main(["predict", str(run), str(coco / "val2017"), "--out", str(out), "--format", "coco", "--draw", str(draw),
                 "--draw-threshold", "0.0", "--top-k", "10", "--device", "cpu"]) == 0
    results = json.loads(out.read_text())
    gt = json.loads((coco / "annotations" / "instances_val2017.json").read_text())
    valid_cats = {c["id"] for c in gt["categories"]}
    sizes = {im["id"]: (im["width"], im["height"]) for im in gt["images"]}
    assert len(results) == 80 * 10
    assert {r["image_id"] for r in results} == set(sizes)  # COCO file names give the image ids
    for r in results:
        assert r["category_id"] in valid_cats
        x, y, w, h = r["bbox"]
        W, H = sizes[r["image_id"]]
        assert 0 <= x and 0 <= y and w >= 0 and h >= 0 and x + w <= W + 0.01 and y + h <= H + 0.01
    assert len(list(draw.glob("*.jpg"))) == 80  # straight into --draw DIR, as segmentation
    # the same through CSV, every row shown (--draw-threshold 0); by default only those a person should read
    assert main(["predict", str(run), str(coco / "val2017" / "000000005001.jpg"), "--format", "csv",
                 "--out", str(tmp_path / "r.csv"), "--top-k", "5", "--draw-threshold", "0", "--device", "cpu"]) == 0
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert len(rows) == 5 and rows[0]["image_id"] == "5001"
    assert main(["predict", str(run), str(coco / "val2017" / "000000005001.jpg"), "--format", "csv",
                 "--out", str(tmp_path / "shown.csv"), "--top-k", "5", "--device", "cpu"]) == 0
    shown = list(csv.DictReader((tmp_path / "shown.csv").open()))
    assert [r for r in rows if float(r["score"]) >= 0.3] == shown  # the run's draw_threshold
    # --image-info JSON: the ids of test-dev style image info, read by the task (the CLI passes the path on)
    info = tmp_path / "image_info.json"
    info.write_text(json.dumps({"images": [{"file_name": "000000005001.jpg", "id": 42}]}))
    assert main(["predict", str(run), str(coco / "val2017" / "000000005001.jpg"), "--format", "csv", "--image-info",
                 str(info), "--out", str(tmp_path / "i.csv"), "--top-k", "1", "--draw-threshold", "0",
                 "--device", "cpu"]) == 0
    assert [r["image_id"] for r in csv.DictReader((tmp_path / "i.csv").open())] == ["42"]


def test_analyze_writes_charts(coco_run, capsys):
    coco, run = coco_run
    assert main(["analyze", str(run), "--samples", "2", "--device", "cpu"]) == 0
    names = {Path(line.split(" ", 1)[1]).name for line in capsys.readouterr().out.splitlines()}
    assert {"training_curves.png", "per_class_ap.png", "precision_recall.png", "confidence_histogram.png"} <= names
    assert len(list((run / "analysis" / "samples").glob("*.jpg"))) == 2


def test_corruption_robustness_for_detection(coco_run, tmp_path, capsys, monkeypatch):
    import dinotune.robustness as robustness

    coco, run = coco_run
    made = []
    real = robustness.Corruption

    def spy(name, severity, seed, dense):
        made.append((name, severity, dense))
        return real(name, severity, seed, dense=dense)

    monkeypatch.setattr(robustness, "Corruption", spy)
    out = tmp_path / "robust"
    assert main(["eval", str(run), "--data", str(coco), "--corruptions", "--corruption-names", "fog",
                 "elastic_transform", "--severities", "2", "--out", str(out), "--device", "cpu",
                 "--subset", "3"]) == 0
    result = json.loads((out / "corruptions.json").read_text())
    assert result["metric"] == "AP" and len(result["rows"]) == 2
    assert all(0.0 <= r["AP"] <= 1.0 for r in result["rows"])
    # boxes are tied to pixel positions: the elastic transform must be the dense (no affine) variant
    assert made == [("fog", 2, True), ("elastic_transform", 2, True)]
    assert "| fog | weather |" in capsys.readouterr().out


def test_subset_file_is_reused(coco_run, tmp_path):
    coco, run = coco_run
    out = tmp_path / "again"
    assert main(["train", "detect", "--data", str(coco), "--out", str(out), "--epochs", "1",
                 "--subset-file", str(run / "subset.json"), "--val-subset", "4", *TINY_DETR]) == 0
    assert (json.loads((out / "subset.json").read_text())["image_ids"]
            == json.loads((run / "subset.json").read_text())["image_ids"])


@pytest.mark.parametrize("head", ["simple", "improved"])
def test_single_object_heads(head, tmp_path):
    coco = shared_data("coco_tiny")
    opts = tiny_detect_options(tmp_path / head, head=head, subset=12, val_subset=8, adapter="lora")
    if head == "improved":  # the improved head trains in two stages; keep each stage one epoch
        opts.update(stage1_epochs=1, stage2_epochs=1)
    result = dinotune.train(task="detect", data=str(coco), **opts)
    cfg = build_config("detect", Path(result["run_dir"]) / "config.yaml")
    assert cfg.train.two_stage is (head == "improved")
    m = result["metrics"]
    assert {"accuracy", "precision", "recall", "f1", "mean_iou", "map50", "AP", "AP50"} <= m.keys()
    assert result["monitor"]["key"] == "val/map50"
    assert 0.0 <= m["mean_iou"] <= 1.0
    history = read_metrics(Path(result["run_dir"]))
    assert [r["phase"] for r in history] == (["stage1", "stage2"] if head == "improved" else ["train"])
    preds = dinotune.predict(result["run_dir"], coco / "val2017" / "000000005001.jpg")
    assert len(preds[0]["detections"]) == 1  # one object per image


def test_lightweight_preset_and_explicit_flags_win(tmp_path, monkeypatch):
    captured = {}

    def fake_train(cfg):
        captured["cfg"] = cfg
        return {"run_dir": str(tmp_path), "best": {}, "last": {}, "metrics": {}, "files": []}

    monkeypatch.setattr(dinotune.api, "train", fake_train)
    assert main(["train", "detect", "--data", "x", "--lightweight", "--decoder-layers", "3"]) == 0
    cfg = captured["cfg"]
    assert cfg.model.decoder_layers == 3  # explicit flag beats the preset
    assert (cfg.model.num_queries, cfg.model.hidden_dim, cfg.adapter.kind, cfg.adapter.last_n_blocks) == (25, 128, "lora", 4)
    assert cfg.backbone.model == "facebook/dinov2-small"
    assert build_config("detect").model.num_queries == 100  # no preset without the flag


class _Oracle:
    """Returns the ground truth itself, larger objects scored higher (so an image's top detection is
    its largest object): every metric must be perfect."""

    name = "oracle"

    def __init__(self, source):
        self.source = source

    def detect(self, paths):
        by_path = {im.path: im for im in self.source.images}
        out = []
        for p in paths:
            objs = self.source.targets(by_path[p].id)
            boxes = torch.tensor([a.bbox for a in objs]).reshape(-1, 4)
            area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
            scores = 0.5 + 0.5 * area / area.max() if len(objs) else torch.zeros(0)
            out.append(Detections(boxes, scores, torch.tensor([a.category_id for a in objs], dtype=torch.int64)))
        return out


class _Blind:
    name = "blind"

    def detect(self, paths):
        return [Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64)) for _ in paths]


def test_compare_harness_on_known_detectors(tmp_path):
    source = find_detection_data(shared_data("coco_tiny"), "val", min_box_size=1.0)
    source = source.with_images(source.images[:12])
    result = compare([_Oracle(source), _Blind()], source, tmp_path)
    oracle, blind = result["rows"]["oracle"], result["rows"]["blind"]
    # crowd regions are ignored by COCO AP, so the oracle (which skips them) is perfect
    assert oracle["AP"] == pytest.approx(1.0) and oracle["AP50"] == pytest.approx(1.0)
    assert oracle["accuracy"] == 1.0 and oracle["mean_iou"] == pytest.approx(1.0)
    assert oracle["map50"] == pytest.approx(1.0)
    assert blind["AP"] == 0.0 and blind["accuracy"] == 0.0 and blind["mean_iou"] == 0.0
    table = (tmp_path / "compare.md").read_text()
    assert "| oracle | 1.000 | 1.000" in table and "| blind | 0.000" in table
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert set(saved["detectors"]) == {"oracle", "blind"} and saved["images"] == 12
    assert (tmp_path / "compare_coco.png").is_file() and (tmp_path / "compare_single_object.png").is_file()


def test_compare_shifted_boxes_score_as_expected(tmp_path):
    """Every box shifted right by a quarter of its width: IoU (3/4) / (5/4) = 0.6, so AP50 stays
    perfect and AP75 collapses; the single-object mean IoU is 0.6. (A shift of a third gives IoU
    0.5 exactly, where float rounding decides each match: no test can promise AP50 there.)"""
    source = find_detection_data(shared_data("coco_tiny"), "val", min_box_size=1.0)
    source = source.with_images([im for im in source.images if not any(
        a.iscrowd for a in source.annotations.get(im.id, ()))][:6])

    class Shifted(_Oracle):
        name = "shifted"

        def detect(self, paths):
            out = super().detect(paths)
            for d in out:
                w = d.boxes[:, 2] - d.boxes[:, 0]
                d.boxes[:, 0] += w / 4
                d.boxes[:, 2] += w / 4
            return out

    m = score(source, Shifted(source).detect([im.path for im in source.images]))
    # boxes pushed past the image edge are not clipped here, so every IoU is 0.6
    assert m["mean_iou"] == pytest.approx(0.6, abs=1e-3)
    assert m["AP50"] == pytest.approx(1.0) and m["AP75"] == 0.0


def test_compare_cli_with_a_run_and_yolo(coco_run, tmp_path, capsys):
    pytest.importorskip("ultralytics")
    coco, run = coco_run
    out = tmp_path / "cmp"
    # a model built from a YAML names its classes '0'..'79': refused without a class map
    assert main(["compare", "--data", str(coco), "--runs", str(run), "--yolo", "yolov8n.yaml", "--subset", "4",
                 "--yolo-image-size", "160", "--out", str(out), "--device", "cpu"]) == 2
    assert "--class-map" in capsys.readouterr().err
    assert main(["compare", "--data", str(coco), "--runs", str(run), "--yolo", "yolov8n.yaml", "--subset", "4",
                 "--yolo-image-size", "160", "--out", str(out), "--device", "cpu", "--class-map", "0=person"]) == 0
    saved = json.loads((out / "compare.json").read_text())
    assert saved["images"] == 4
    names = list(saved["detectors"])
    assert names[0].startswith("dinotune:run") and names[1] == "yolo:yolov8n.yaml (random weights)"
    assert "AP50" in capsys.readouterr().out


@pytest.mark.slow
def test_detr_overfits_a_few_real_images(tmp_path):
    """The DETR-style detector fits 4 real COCO images: AP50 on them above 0.9 (about 2 minutes on
    2 CPU cores; benchmarks/bench_overfit.py records the numbers)."""
    result = dinotune.train(task="detect", data=str(shared_data("coco_tiny")), **tiny_detect_options(
        tmp_path / "ovf", adapter="full", image_size=224, overfit=4, epochs=300, eval_every=50, batch_size=4,
        hidden_dim=128, num_heads=4, ffn_dim=256, decoder_layers=3, num_queries=50, sampling_points=4,
        lr=5e-4, backbone_lr=2e-4, warmup_epochs=10))
    assert result["metrics"]["AP50"] > 0.9
