"""``--head fasterrcnn``: torchvision's Faster R-CNN on the DINOv2 pyramid, with every adapter kind,
through the engine, evaluation, prediction, save / load and ``compare``."""

from __future__ import annotations

import json

import pytest
import torch

import dinotune
from dinotune.cli import main
from dinotune.config import build_config
from dinotune.tasks import build_backbone
from dinotune.tasks.detect.detectors import DETECTORS
from dinotune.tasks.detect.fasterrcnn import anchor_sizes
from tests.conftest import make_coco_dataset, make_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 56
TINY = dict(model="random:tiny", image_size=SIZE, batch_size=2, workers=0, progress=False, device="cpu",
            head="fasterrcnn", hidden_dim=32, rcnn_rpn_batch=32, rcnn_roi_batch=32)
TINY_FLAGS = ["--model", "random:tiny", "--image-size", str(SIZE), "--batch-size", "2", "--workers", "0",
              "--no-progress", "--device", "cpu", "--head", "fasterrcnn", "--hidden-dim", "32",
              "--rcnn-rpn-batch", "32", "--rcnn-roi-batch", "32"]


def _targets(n: int) -> list[dict]:
    """dinotune-style targets: one box (cxcywh normalised to the canvas) per image, 2 classes."""
    boxes = torch.tensor([[0.4, 0.5, 0.3, 0.4], [0.6, 0.3, 0.5, 0.2]])
    return [{"boxes": boxes[i % 2: i % 2 + 1], "labels": torch.tensor([i % 2])} for i in range(n)]


@pytest.mark.parametrize("kind", ["none", "lora", "dora", "full"])
def test_builds_trains_and_detects_with_every_adapter(kind, tmp_path):
    cfg = build_config("detect", data="unused", adapter=kind, **TINY)
    backbone, _ = build_backbone(cfg)
    bundle = DETECTORS["fasterrcnn"].build(backbone, 2, cfg, ["a", "b"], [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
    model = bundle.model.train()
    images = torch.randn(2, 3, SIZE, SIZE)
    losses = bundle.criterion(model(images, _targets(2)), _targets(2))
    assert {"loss", "loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"} <= losses.keys()
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    trained = [(n, p) for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert bool(trained) == (kind != "none")
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trained) or kind == "none"
    assert all(p.grad is not None for p in model.head.rpn.parameters())

    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert "losses" not in outputs
    # a 100 x 60 original image shown at scale 56 / 100 on the canvas
    dets = bundle.postprocess(outputs, [SIZE / 100, SIZE / 100], torch.tensor([[60, 100], [60, 100]]))
    for d in dets:
        assert d["boxes"].shape[1:] == (4,) and len(d["boxes"]) == len(d["scores"]) == len(d["labels"])
        assert (d["boxes"][:, 2] <= 100).all() and (d["boxes"][:, 3] <= 60).all() and (d["boxes"] >= 0).all()
        assert (d["scores"][:-1] >= d["scores"][1:]).all() and set(d["labels"].tolist()) <= {0, 1}
    # boxes go back to original pixels: the same detections on the canvas, divided by the scale
    canvas = outputs["boxes"][0][outputs["scores"][0] >= 0]
    if len(canvas):
        top = canvas[outputs["scores"][0][outputs["scores"][0] >= 0].argmax()] / (SIZE / 100)
        top = torch.minimum(top, torch.tensor([100.0, 60, 100, 60]))
        torch.testing.assert_close(dets[0]["boxes"][0], top)


def test_eval_mode_with_targets_gives_a_reproducible_loss():
    cfg = build_config("detect", data="unused", adapter="none", **TINY)
    backbone, _ = build_backbone(cfg)
    bundle = DETECTORS["fasterrcnn"].build(backbone, 2, cfg, ["a", "b"], [])
    model = bundle.model.eval()
    images = torch.randn(3, 3, SIZE, SIZE)
    torch.manual_seed(5)
    with torch.no_grad():
        a = model(images, _targets(3))
        after = torch.rand(1)
        b = model(images, _targets(3))
    torch.manual_seed(5)
    assert torch.equal(torch.rand(1), after), "the evaluation loss must not consume the global random stream"
    assert a["losses"]["loss_classifier"].shape == (3,)
    assert torch.equal(bundle.criterion(a, None)["loss"], bundle.criterion(b, None)["loss"])
    assert not model.head.rpn.training and not model.head.roi_heads.training


def test_anchor_sizes_follow_the_pyramid_strides():
    assert anchor_sizes([7.0, 14.0, 28.0], [4, 8]) == ((28.0, 56.0), (56.0, 112.0), (112.0, 224.0))


def test_targets_become_torchvision_boxes_in_canvas_pixels():
    from dinotune.tasks.detect.fasterrcnn import rcnn_targets

    t = rcnn_targets([{"boxes": torch.tensor([[0.5, 0.5, 0.5, 0.25]]), "labels": torch.tensor([0])}], 56)[0]
    torch.testing.assert_close(t["boxes"], torch.tensor([[14.0, 21.0, 42.0, 35.0]]))
    assert t["labels"].tolist() == [1]  # 0 is torchvision's background


@pytest.fixture(scope="module")
def frcnn_run(tmp_path_factory):
    """One short Faster R-CNN run on a small COCO folder through the engine, its model kept."""
    root = tmp_path_factory.mktemp("frcnn")
    coco = make_coco_dataset(root / "coco", {"train": [1, 2, 1, 2], "val": [1, 2]}, size=(70, 52))
    cfg = build_config("detect", data=str(coco), adapter="lora", epochs=1, **TINY)
    trainer = make_trainer(cfg, root / "run")
    trainer.fit()
    return coco, root / "run", trainer.model.eval()


def test_training_records_faster_rcnn_losses_and_coco_metrics(frcnn_run):
    _, run, _ = frcnn_run
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train/loss_objectness", "train/loss_classifier", "val/AP", "val/AP50", "val/loss"} <= record.keys()
    assert record["val/loss"] == record["val/loss"] and record["val/loss"] > 0  # finite, computed
    meta = json.loads((run / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["head"] == "fasterrcnn"


def test_save_load_gives_the_trained_models_outputs(frcnn_run):
    _, run, trained = frcnn_run
    loaded = dinotune.load(run, checkpoint_name="last", device="cpu", merge=False)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b = trained(x), loaded.model.eval()(x)
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(a[key], b[key])


def test_eval_predict_and_compare_through_the_cli(frcnn_run, tmp_path, capsys):
    coco, run, _ = frcnn_run
    assert main(["eval", str(run), "--data", str(coco), "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0.0 <= metrics["AP"] <= 1.0 and metrics["images"] == 2
    out = tmp_path / "pred.json"
    assert main(["predict", str(run), str(coco / "val"), "--out", str(out), "--format", "coco", "--device", "cpu",
                 "--top-k", "5"]) == 0
    results = json.loads(out.read_text())
    assert results and all(r["category_id"] in (3, 7) for r in results)
    assert all(0 <= r["bbox"][0] <= 70 and 0 <= r["bbox"][1] <= 52 for r in results)
    assert max(sum(1 for r in results if r["image_id"] == i) for i in (1, 2)) <= 5
    cmp = tmp_path / "cmp"
    assert main(["compare", "--data", str(coco), "--runs", str(run), "--out", str(cmp), "--device", "cpu"]) == 0
    table = json.loads((cmp / "compare.json").read_text())
    (name, row), = table["detectors"].items()
    assert "fasterrcnn" in name
    # one metric code: compare scores the run exactly as eval does
    assert row["AP"] == pytest.approx(metrics["AP"]) and row["AP50"] == pytest.approx(metrics["AP50"])


def test_cli_trains_the_head(tmp_path):
    coco = make_coco_dataset(tmp_path / "coco", {"train": [1, 2], "val": [1]}, size=(70, 52))
    assert main(["train", "detect", "--data", str(coco), "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--adapter", "dora", "--rcnn-anchor-scales", "2", "4", *TINY_FLAGS]) == 0
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "rcnn_anchor_scales" in saved and "fasterrcnn" in saved


# ---------------------------------------------------------------------------------- --baseline
BASELINE = "fasterrcnn_mobilenet_v3_large_fpn"  # the smaller of the two; both go through one builder


def test_baseline_sets_its_preset_and_refuses_dino_options():
    cfg = build_config("detect", data="unused", baseline=BASELINE)
    assert (cfg.model.head, cfg.adapter.kind, cfg.backbone.model) == ("fasterrcnn", "none", "random:tiny")
    from dinotune.errors import ConfigError

    cfg.validate()
    with pytest.raises(ConfigError, match="--adapter lora"):
        build_config("detect", data="unused", baseline=BASELINE, adapter="lora").validate()
    with pytest.raises(ConfigError, match="--model facebook/dinov2-small"):
        build_config("detect", data="unused", baseline=BASELINE, model="facebook/dinov2-small").validate()
    with pytest.raises(ConfigError, match="only used with --baseline"):
        build_config("detect", data="unused", baseline_weights="x.pth").validate()


def _baseline(weights: str = "", num_classes: int = 2):
    from dinotune.tasks.detect.baseline import build_baseline

    backbone, _ = build_backbone(build_config("detect", data="unused", baseline=BASELINE))
    return build_baseline(backbone, num_classes, BASELINE, weights, 10, 0.05)


def test_baseline_reads_a_state_dict_and_skips_another_class_count(tmp_path):
    torch.manual_seed(1)
    source = _baseline(num_classes=5).head
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    model = _baseline(str(path)).head
    mine, theirs = model.state_dict(), source.state_dict()
    assert torch.equal(mine["backbone.body.0.0.weight"], theirs["backbone.body.0.0.weight"])
    # the class predictor has 3 outputs here (2 classes + background), 6 there: kept random
    assert mine["roi_heads.box_predictor.cls_score.weight"].shape[0] == 3
    from dinotune.errors import ConfigError

    with pytest.raises(ConfigError, match="no such file"):
        _baseline(str(tmp_path / "missing.pth"))


def test_baseline_default_weights_offline_say_what_to_do(monkeypatch):
    from torchvision.models._api import WeightsEnum

    from dinotune.errors import ConfigError

    def offline(self, *a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(ConfigError, match="--baseline-weights DEFAULT: could not download.*network unreachable"):
        _baseline("DEFAULT")


def test_baseline_trains_loads_and_compares_beside_the_dinov2_head(frcnn_run, tmp_path):
    coco, dino_run, _ = frcnn_run
    run = tmp_path / "baseline"
    assert main(["train", "detect", "--data", str(coco), "--out", str(run), "--epochs", "1", "--baseline", BASELINE,
                 "--image-size", str(SIZE), "--batch-size", "2", "--workers", "0", "--no-progress", "--device", "cpu",
                 "--rcnn-rpn-batch", "32", "--rcnn-roi-batch", "32"]) == 0
    names = {p.name for p in (run / "checkpoints" / "last").iterdir()}
    assert "head.safetensors" in names and "adapter_model.safetensors" not in names
    loaded = dinotune.load(run, checkpoint_name="last", device="cpu")
    assert type(loaded.model.head).__name__ == "FasterRCNN" and loaded.model.head.roi_heads.fg_bg_sampler.batch_size_per_image == 32
    # the trained weights come back, not a fresh random init
    from safetensors.torch import load_file

    saved = load_file(run / "checkpoints" / "last" / "head.safetensors")
    key = next(k for k in saved if k.endswith("box_predictor.cls_score.weight"))
    torch.testing.assert_close(loaded.model.head.state_dict()[key], saved[key])
    cmp = tmp_path / "cmp"
    assert main(["compare", "--data", str(coco), "--runs", str(run), str(dino_run), "--out", str(cmp),
                 "--device", "cpu"]) == 0
    rows = json.loads((cmp / "compare.json").read_text())["detectors"]
    assert {f"dinotune:baseline ({BASELINE})", "dinotune:run (fasterrcnn)"} == set(rows)
    assert all(0 <= r["AP"] <= 1 for r in rows.values())
