"""The three tasks end to end on a DINOv3 backbone (``random:dinov3-tiny``: patch 16, 4 registers,
RoPE): train one epoch on 32-px images, evaluate, predict; the patch size reaches the data sizes,
the feature pyramid and the decoders from the model, and a size that suits DINOv2 is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

import dinotune
from dinotune.errors import ConfigError
from tests.conftest import make_coco_dataset, make_segmentation_folders, tiny_options

pytestmark = pytest.mark.usefixtures("one_thread")

DINOV3 = dict(model="random:dinov3-tiny", image_size=32, epochs=1, check_images="fast")


def test_classification_with_lora(tiny_folder, tmp_path):
    result = dinotune.train(task="classify", data=str(tiny_folder), **tiny_options(
        tmp_path / "cls", adapter="lora", targets=["qkv", "mlp"], pool="last4", **DINOV3))
    assert 0.0 <= result["metrics"]["top1"] <= 1.0
    run = dinotune.load(result["run_dir"], device="cpu")
    assert run.model.backbone.family == "dinov3" and run.model.patch_size == 16
    assert run.evaluate(str(tiny_folder))["images"] == 6
    preds = run.predict(str(tiny_folder / "val" / "red"), top_k=2)
    assert len(preds) == 3 and {p["class"] for p in preds[0]["predictions"]} == {"red", "blue"}


def test_a_dinov2_size_is_refused_before_any_folder(tiny_folder, tmp_path):
    with pytest.raises(ConfigError, match="patch size 16; try 16 or 32"):
        dinotune.train(task="classify", data=str(tiny_folder), **tiny_options(
            tmp_path / "run", **{**DINOV3, "image_size": 28}))
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    return make_coco_dataset(tmp_path_factory.mktemp("coco"), {"train2017": [1, 2, 1, 2], "val2017": [2, 1]},
                             size=(40, 32))


@pytest.mark.parametrize("head", ["detr", "simple"])
def test_detection(coco, tmp_path, head):
    result = dinotune.train(task="detect", data=str(coco), head=head, adapter="lora", batch_size=4, workers=0,
                            progress=False, device="cpu", out=str(tmp_path / head), hidden_dim=32, num_heads=2,
                            ffn_dim=64, decoder_layers=1, num_queries=10, sampling_points=2, **DINOV3)
    assert {"AP", "AP50"} <= result["metrics"].keys()
    run = dinotune.load(result["run_dir"], device="cpu")
    if head == "detr":  # pyramid strides follow the patch size: 16 px at scale 1
        assert run.model.head.pyramid.strides == [8.0, 16.0, 32.0]
    assert run.evaluate(str(coco))["images"] == 2
    preds = run.predict(str(coco / "val2017"))
    assert len(preds) == 2
    for p in preds:
        assert (p["width"], p["height"]) == (40, 32)
        for d in p["detections"]:  # boxes in original pixels
            x, y, w, h = d["bbox"]
            assert -1e-3 <= x and x + w <= 40 + 1e-3 and -1e-3 <= y and y + h <= 32 + 1e-3


@pytest.mark.parametrize("decoder", ["linear", "fpn"])
def test_segmentation(tmp_path, decoder):
    data = make_segmentation_folders(tmp_path / "seg", {"train": 4, "val": 2}, size=32)
    result = dinotune.train(task="segment", data=str(data), **tiny_options(
        tmp_path / decoder, adapter="lora", decoder=decoder, fpn_dim=32, **DINOV3))
    assert 0.0 <= result["metrics"]["mIoU"] <= 1.0
    run = dinotune.load(result["run_dir"], device="cpu")
    assert run.evaluate(str(data))["pixels"] > 0
    out = tmp_path / "masks"
    preds = run.predict(str(data / "val" / "images"), masks=str(out))
    assert len(preds) == 2
    for p in preds:
        assert Image.open(p["mask"]).size == Image.open(p["image"]).size
