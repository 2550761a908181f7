"""Segmentation end to end on coco_tiny rasterised to semantic masks: train, eval, predict,
analyze, corruption robustness, PCA pictures; plus sliding-window / FPN runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dinotune
from dinotune.cli import main
from dinotune.engine.logging import read_metrics
from tests.conftest import shared_data, tiny_options

TINY_SEG = ["--model", "random:tiny", "--image-size", "84", "--batch-size", "4", "--workers", "0", "--no-progress",
            "--device", "cpu"]


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    coco = shared_data("coco_tiny")
    out = tmp_path_factory.mktemp("seg") / "run"
    code = main(["train", "segment", "--data", str(coco), "--out", str(out), "--epochs", "2", "--subset", "8",
                 "--val-subset", "4", "--adapter", "lora", *TINY_SEG])
    assert code == 0
    return coco, out


def test_train_writes_run_folder(seg_run):
    coco, run = seg_run
    history = read_metrics(run)
    assert [r["epoch"] for r in history] == [1, 2]
    assert {"train/loss", "val/loss", "val/mIoU", "val/pixel_accuracy", "val/mean_class_accuracy"} <= history[0].keys()
    best = json.loads((run / "best_metrics.json").read_text())
    assert len(best["per_class_IoU"]) == 81 and best["pixels"] > 0
    meta = json.loads((run / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["num_classes"] == 81 and meta["class_names"][0] == "background"
    assert len(json.loads((run / "subset.json").read_text())["images"]) == 8
    assert (run / "per_class_iou.png").stat().st_size > 1000


def test_eval_prints_miou(seg_run, capsys):
    coco, run = seg_run
    assert main(["eval", str(run), "--data", str(coco), "--device", "cpu", "--batch-size", "8", "--subset", "12"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert {"mIoU", "pixel_accuracy", "mean_class_accuracy", "loss"} <= metrics.keys()
    assert 0.0 <= metrics["mIoU"] <= 1.0


def test_predict_writes_label_pngs_and_overlays(seg_run, tmp_path):
    coco, run = seg_run
    images = sorted((coco / "val2017").glob("*.jpg"))[:3]
    out = tmp_path / "pred.json"
    assert main(["predict", str(run), *map(str, images), "--masks", str(tmp_path / "masks"), "--draw",
                 str(tmp_path / "overlays"), "--out", str(out), "--device", "cpu"]) == 0
    results = json.loads(out.read_text())
    assert [r["image"] for r in results] == [str(p) for p in images]
    for r, path in zip(results, images):
        mask = Image.open(r["mask"])
        assert mask.mode == "P" and mask.size == Image.open(path).size  # original resolution
        assert np.asarray(mask).max() < 81
        assert sum(r["classes"].values()) == pytest.approx(1.0, abs=1e-3)
        assert (tmp_path / "overlays" / f"{path.stem}.jpg").is_file()


def test_analyze_draws_comparisons(seg_run):
    coco, run = seg_run
    files = dinotune.api.analyze(run, samples=2, device="cpu")
    names = [f.name for f in files]
    assert "training_curves.png" in names and "per_class_iou.png" in names
    assert len(list((run / "analysis" / "samples").glob("*.png"))) == 2


def test_corruption_robustness_table_and_chart(seg_run, tmp_path, capsys):
    coco, run = seg_run
    out = tmp_path / "robust"
    assert main(["eval", str(run), "--data", str(coco), "--corruptions", "--corruption-names", "gaussian_noise",
                 "elastic_transform", "--severities", "1", "5", "--out", str(out), "--device", "cpu",
                 "--subset", "4"]) == 0
    result = json.loads((out / "corruptions.json").read_text())
    assert result["metric"] == "mIoU" and len(result["rows"]) == 4
    assert {(r["corruption"], r["severity"]) for r in result["rows"]} == {
        ("gaussian_noise", 1), ("gaussian_noise", 5), ("elastic_transform", 1), ("elastic_transform", 5)}
    assert set(result["mean_by_severity"]) == {"1", "5"}
    assert "| gaussian_noise | noise |" in capsys.readouterr().out
    assert (out / "corruptions.png").stat().st_size > 1000


def test_pca_pictures_for_a_run_and_a_backbone(seg_run, tmp_path):
    coco, run = seg_run
    images = [str(p) for p in sorted((coco / "val2017").glob("*.jpg"))[:2]]
    assert main(["pca", *images, "--model", str(run), "--out", str(tmp_path / "run.png")]) == 0
    assert main(["pca", *images, "--model", "random:tiny", "--image-size", "56", "--out",
                 str(tmp_path / "bb.png")]) == 0
    for f in ("run.png", "bb.png"):
        assert Image.open(tmp_path / f).size[0] > 100


def test_fpn_decoder_with_sliding_windows(tmp_path):
    coco = shared_data("coco_tiny")
    result = dinotune.train(task="segment", data=str(coco), **tiny_options(
        tmp_path / "fpn", image_size=56, decoder="fpn", fpn_dim=32, inference="slide", subset=4, val_subset=2,
        epochs=1, adapter="none", check_images="fast"))
    m = result["metrics"]
    assert 0.0 <= m["mIoU"] <= 1.0 and m["pixels"] > 0


def test_classification_runs_get_corruption_robustness_too(tiny_folder, tmp_path):
    from dinotune.robustness import evaluate_corruptions

    result = dinotune.train(task="classify", data=str(tiny_folder), **tiny_options(tmp_path / "cls", epochs=1))
    loaded = dinotune.load(result["run_dir"])
    table = evaluate_corruptions(loaded, str(tiny_folder), names=["contrast"], severities=[1, 5],
                                 out_dir=tmp_path / "robust")
    assert table["metric"] == "top1" and len(table["rows"]) == 2
    assert Path(tmp_path / "robust" / "corruptions.md").is_file()
