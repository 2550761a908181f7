"""Cached-feature probe equals the online probe; batched predictions equal one-by-one; heads."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import dinotune
from dinotune.engine.logging import read_metrics
from dinotune.models.losses import FocalLoss
from tests.conftest import tiny_options


@pytest.mark.parametrize("pool", ["cls_mean", "last4"])
def test_cached_probe_equals_online_probe(tiny_folder, tmp_path, pool):
    common = dict(adapter="none", epochs=3, augment=False, pool=pool, head_dropout=0.1, lr=5e-2)
    online = dinotune.train(task="classify", data=str(tiny_folder), **tiny_options(tmp_path / "on", **common))
    cached = dinotune.train(task="classify", data=str(tiny_folder),
                            **tiny_options(tmp_path / "off", cache_features=True, **common))
    cache_files = list((tmp_path / "off" / "cache").glob("*.safetensors"))
    assert len(cache_files) == 2  # train and val
    on_hist, off_hist = read_metrics(tmp_path / "on"), read_metrics(tmp_path / "off")
    for a, b in zip(on_hist, off_hist):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4, abs=1e-6)
        assert a["val/loss"] == pytest.approx(b["val/loss"], rel=1e-4, abs=1e-6)
    h_on = dinotune.load(online["run_dir"]).model.head.state_dict()
    h_off = dinotune.load(cached["run_dir"]).model.head.state_dict()
    for k in h_on:
        torch.testing.assert_close(h_on[k], h_off[k], atol=1e-5, rtol=1e-4)


def test_cache_is_reused_and_backbone_not_run_again(tiny_folder, tmp_path, monkeypatch):
    cache_dir = tmp_path / "shared-cache"
    opts = dict(adapter="none", epochs=1, augment=False, cache_features=True, cache_dir=str(cache_dir))
    dinotune.train(task="classify", data=str(tiny_folder), **tiny_options(tmp_path / "a", **opts))
    files = sorted(cache_dir.iterdir())
    # a second run on the same data: the backbone must not run at all
    from dinotune.backbone.model import DinoBackbone

    def boom(*args, **kwargs):
        raise AssertionError("backbone ran although features were cached")

    monkeypatch.setattr(DinoBackbone, "forward", boom)
    dinotune.train(task="classify", data=str(tiny_folder), **tiny_options(tmp_path / "b", **opts))
    assert sorted(cache_dir.iterdir()) == files


def test_cache_features_needs_frozen_backbone(tiny_folder, tmp_path):
    from dinotune.config import ConfigError

    with pytest.raises(ConfigError, match="adapter none"):
        dinotune.train(task="classify", data=str(tiny_folder),
                       **tiny_options(tmp_path / "x", adapter="lora", cache_features=True))


def test_batched_predictions_equal_one_by_one(tiny_folder, tmp_path):
    result = dinotune.train(task="classify", data=str(tiny_folder),
                            **tiny_options(tmp_path / "r", adapter="lora", epochs=1, pool="last4"))
    run = dinotune.load(result["run_dir"])
    images = sorted((tiny_folder / "val").rglob("*.png"))
    batched = run.predict(images, top_k=2, batch_size=4)
    single = [run.predict([p], top_k=2, batch_size=1)[0] for p in images]
    assert [r["image"] for r in batched] == [str(p) for p in images]
    for a, b in zip(batched, single):
        assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]]
        for pa, pb in zip(a["predictions"], b["predictions"]):
            assert pa["score"] == pytest.approx(pb["score"], abs=1e-5)
    scores = [p["score"] for p in batched[0]["predictions"]]
    assert scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1.0, abs=1e-5)


def test_predict_reports_bad_inputs(tiny_folder, tmp_path):
    result = dinotune.train(task="classify", data=str(tiny_folder), **tiny_options(tmp_path / "r", epochs=1))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    good = next((tiny_folder / "val" / "red").iterdir())
    out = dinotune.predict(result["run_dir"], [good, bad, tmp_path / "missing.png"], top_k=1)
    assert [r["image"] for r in out] == [str(good)]


def test_focal_loss_reduces_to_cross_entropy_at_gamma_zero():
    torch.manual_seed(0)
    logits, target = torch.randn(8, 5), torch.randint(0, 5, (8,))
    ce = torch.nn.functional.cross_entropy(logits, target)
    torch.testing.assert_close(FocalLoss(gamma=0.0)(logits, target), ce)
    ce_ls = torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1)
    torch.testing.assert_close(FocalLoss(gamma=0.0, label_smoothing=0.1)(logits, target), ce_ls)
    # with gamma > 0 confident correct samples weigh less than under cross-entropy
    assert FocalLoss(gamma=2.0)(logits, target) < ce


@pytest.mark.parametrize("head,pool,loss", [("linear", "cls", "ce"), ("mlp", "cls_mean", "focal"),
                                             ("linear", "last4", "ce")])
def test_heads_and_losses_fit_the_training_images(tiny_folder, tmp_path, head, pool, loss):
    train = tiny_folder / "train"
    result = dinotune.train(task="classify", data=str(train), val_data=str(train),
                            **tiny_options(tmp_path / "r", head=head, pool=pool, loss=loss, epochs=3, lr=3e-2,
                                           augment=False, label_smoothing=0.1 if loss == "ce" else 0.0))
    last = read_metrics(Path(result["run_dir"]))[-1]
    # every pooling / head / loss combination learns the (easy) training images: all right, and a
    # loss below chance (the cross-entropy of a coin flip between 2 classes: ln 2)
    assert last["val/top1"] == 1.0
    assert last["val/loss"] < math.log(2), last["val/loss"]


def test_predict_skips_a_folders_annotation_files_quietly(tmp_path, capsys):
    """A folder of images with its annotations beside them (a COCO JSON, YOLO labels, a list): the
    images are read and the annotation files are not reported as bad images; a file named on its own
    is still reported."""
    from dinotune.data.images import SkipReport, collect_images
    from tests.conftest import make_image

    for i in range(2):
        make_image((200, 10, 10), 32, seed=i).save(tmp_path / f"{i}.png")
    for name in ("_annotations.coco.json", "labels.txt", "data.yaml", "0.xml"):
        (tmp_path / name).write_text("{}")
    report = SkipReport()
    assert [p.name for p in collect_images(tmp_path, report)] == ["0.png", "1.png"] and not report.skipped
    collect_images(tmp_path / "labels.txt", report)
    assert [Path(p).name for p, _ in report.skipped] == ["labels.txt"]
