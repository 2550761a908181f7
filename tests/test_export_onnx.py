"""ONNX export (``dinotune export RUN --format onnx``): onnxruntime against PyTorch on the same
preprocessed input for every task, real images from ``$DINOTUNE_SHARED`` (hymenoptera, coco_tiny) and
images the tests make; merged LoRA / DoRA equal to the unmerged model; no bicubic interpolation left
in the graph; dynamic batch; both exporters; fp16; TorchScript; refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dinotune
from dinotune.cli import main
from dinotune.errors import ConfigError, ExportError
from dinotune.runtime import ExportInfo
from dinotune.runtime.inputs import read_image
from dinotune.runtime.session import OnnxSession
from dinotune.tasks.classify.runtime import classify_input
from dinotune.tasks.detect.runtime import detect_input
from dinotune.tasks.segment.runtime import segment_input
from tests.conftest import shared_data
from tests.export_runs import data_folder, exported, trained_run

onnx = pytest.importorskip("onnx", reason="the export extra (onnx, onnxscript, onnxruntime) is not installed")
pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxscript, onnxruntime) is not installed")
pytestmark = pytest.mark.usefixtures("one_thread")


def _images(source: str, kind: str, factory: pytest.TempPathFactory, n: int) -> list[Path]:
    """``n`` images: made by the tests (``made``) or real ones from the shared data."""
    if source == "made":
        folder = data_folder(kind, factory)
    else:
        folder = shared_data(source) / ("val" if source == "hymenoptera" else "val2017")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    return files[:: max(1, len(files) // n)][:n]


def _session(folder: Path) -> tuple[OnnxSession, ExportInfo]:
    return OnnxSession(folder / "model.onnx", device="cpu"), ExportInfo.read(folder)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = float(np.prod(np.clip(rb - lt, 0, None)))
    union = float(np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter)
    return inter / union if union > 0 else float(np.allclose(a, b, atol=1e-3))


# ------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("source", ["made", "hymenoptera"])
def test_classification_logits_match_pytorch(source, tmp_path_factory):
    folder = exported("classify", tmp_path_factory)
    session, info = _session(folder)
    run = dinotune.load(trained_run("classify", tmp_path_factory), device="cpu")
    x = np.stack([classify_input(read_image(p, info.input, 0), info.image_size, info.input)
                  for p in _images(source, "classify", tmp_path_factory, 8)])
    got = session.run(images=x)["logits"]
    with torch.no_grad():
        want = run.model(images=torch.from_numpy(x)).numpy()
    assert np.abs(got - want).max() < 1e-4
    assert (got.argmax(1) == want.argmax(1)).all()


@pytest.mark.parametrize("kind,source", [("detect", "made"), ("detect", "coco_tiny"), ("single", "made")])
def test_detections_match_pytorch(kind, source, tmp_path_factory):
    """Every PyTorch detection (after the run's post-processing) has an onnxruntime detection of the
    same class with IoU > 0.99 and the same score, boxes in original pixels."""
    folder = exported(kind, tmp_path_factory)
    session, info = _session(folder)
    run = dinotune.load(trained_run(kind, tmp_path_factory), device="cpu")
    arrays = [read_image(p, info.input, 0) for p in _images(source, "detect", tmp_path_factory, 4)]
    canvases, factors = zip(*(detect_input(a, info.image_size, info.input) for a in arrays))
    sizes = np.asarray([a.shape[:2] for a in arrays], dtype=np.float32)
    got = session.run(images=np.stack(canvases), orig_sizes=sizes)
    with torch.no_grad():
        want = run.bundle.postprocess(run.model(torch.from_numpy(np.stack(canvases))), list(factors),
                                      torch.from_numpy(sizes).long())
    matched = 0
    for i, dets in enumerate(want):
        assert len(got["scores"][i]) == len(dets["scores"])
        for box, label, score in zip(dets["boxes"].numpy(), dets["labels"].tolist(), dets["scores"].tolist()):
            close = [j for j in range(len(got["scores"][i]))
                     if got["labels"][i][j] == label and abs(got["scores"][i][j] - score) < 1e-4]
            assert close, f"image {i}: no onnxruntime detection of class {label} scoring {score:.5f}"
            assert max(_iou(box, got["boxes"][i][j]) for j in close) > 0.99
            matched += 1
    assert matched


@pytest.mark.parametrize("source", ["made", "coco_tiny"])
def test_segmentation_labels_match_pytorch(source, tmp_path_factory):
    """The same input tensor through both, logits resized to the image (PyTorch's own resize for
    both): the same label on at least 99.9% of the pixels."""
    folder = exported("segment", tmp_path_factory)
    session, info = _session(folder)
    run = dinotune.load(trained_run("segment", tmp_path_factory), device="cpu")
    s, p = info.image_size, info.patch_size
    same = total = 0
    for path in _images(source, "segment", tmp_path_factory, 3):
        image = read_image(path, info.input, 0)
        x, _ = segment_input(image, (s, s), p, info.input)  # the graph's fixed square input
        with torch.no_grad():
            want = run.model(torch.from_numpy(x[None])).float()
        got = torch.from_numpy(session.run(images=x[None])["logits"])
        assert got.shape == want.shape and got.shape[1] == len(info.class_names)
        resize = lambda t: torch.nn.functional.interpolate(t, size=image.shape[:2], mode="bilinear")  # noqa: E731
        a, b = resize(want).argmax(1), resize(got).argmax(1)
        same += int((a == b).sum())
        total += a.numel()
    assert same / total >= 0.999


def test_merged_lora_and_dora_graphs_equal_the_unmerged_models(tmp_path_factory, tmp_path):
    """The export merges the adapter into the weights; with LoRA / DoRA B matrices made non-zero
    first (the merge is then not trivially the base model) the graph equals the unmerged model."""
    for kind in ("classify", "single"):  # LoRA and DoRA
        run = dinotune.load(trained_run(kind, tmp_path_factory), device="cpu", merge=False)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in run.model.backbone.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=g) * 0.1)
        x = torch.randn(2, 3, 56, 56, generator=g)
        with torch.no_grad():
            want = run.model(images=x) if kind == "classify" else run.model(x)
        want = want if kind == "classify" else want["logits"]
        folder = dinotune.export(run, tmp_path / kind, exporter="legacy")
        assert not any("lora" in n for n, _ in run.model.backbone.named_parameters())
        session, _ = _session(folder)
        if kind == "classify":
            got = session.run(images=x.numpy())["logits"]
            assert np.abs(got - want.numpy()).max() < 1e-4
        else:  # the single-object graph's score is the softmax of the class logits
            got = session.run(images=x.numpy(), orig_sizes=np.full((2, 2), 56, np.float32))
            probs = want.softmax(-1)
            assert np.abs(got["scores"][:, 0] - probs.max(-1).values.numpy()).max() < 1e-4
            assert (got["labels"][:, 0] == probs.argmax(-1).numpy()).all()


@pytest.mark.parametrize("kind", ["dinov3", "segment"])
def test_frozen_dinov3_and_full_fine_tuned_runs_export(kind, tmp_path_factory):
    """A frozen DINOv3 backbone (RoPE: nothing to interpolate) and a fully fine-tuned DINOv2 export
    with the graph's own check against PyTorch recorded."""
    folder = exported(kind, tmp_path_factory)
    info = ExportInfo.read(folder)
    assert info.source["adapter"] == {"dinov3": "none", "segment": "full"}[kind]
    assert info.verification["max_abs_diff"] < 1e-4
    ops = {n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node}
    assert "Conv" in ops


def test_no_bicubic_interpolation_and_a_dynamic_batch(tmp_path_factory):
    folder = exported("classify", tmp_path_factory)
    graph = onnx.load(str(folder / "model.onnx"))
    modes = [a.s for n in graph.graph.node if n.op_type == "Resize" for a in n.attribute if a.name == "mode"]
    assert b"cubic" not in modes
    session, info = _session(folder)
    x = np.random.default_rng(0).normal(size=(3, 3, info.image_size, info.image_size)).astype(np.float32)
    batch = session.run(images=x)["logits"]
    one = np.concatenate([session.run(images=x[i: i + 1])["logits"] for i in range(3)])
    assert batch.shape == (3, 2) and np.abs(batch - one).max() < 1e-5


def test_cli_export_at_another_size_interpolates_once(tmp_path_factory, tmp_path, capsys):
    """``--image-size`` other than the training size: the position table is interpolated at export,
    and the graph equals PyTorch interpolating at every forward."""
    run = trained_run("classify", tmp_path_factory)
    out = tmp_path / "at84"
    assert main(["export", str(run), "--format", "onnx", "--out", str(out), "--image-size", "84", "--opset", "18",
                 "--exporter", "legacy"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    info = json.loads((out / "dinotune_export.json").read_text())
    assert info["image_size"] == 84 and info["opset"] == 18 and info["source"]["trained_image_size"] == 56
    session, _ = _session(out)
    x = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        want = dinotune.load(run, device="cpu").model(images=x).numpy()
    assert np.abs(session.run(images=x.numpy())["logits"] - want).max() < 1e-4


def test_dynamo_exporter_gives_the_legacy_exporters_outputs(tmp_path_factory):
    dynamo, legacy = exported("classify", tmp_path_factory, "dynamo"), exported("classify", tmp_path_factory)
    assert ExportInfo.read(dynamo).exporter == "dynamo"
    x = np.random.default_rng(1).normal(size=(2, 3, 56, 56)).astype(np.float32)
    a, b = _session(dynamo)[0].run(images=x)["logits"], _session(legacy)[0].run(images=x)["logits"]
    assert np.abs(a - b).max() < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["detect", "single", "segment", "dinov3"])
def test_dynamo_exporter_for_every_head(kind, tmp_path_factory):
    folder = exported(kind, tmp_path_factory, "dynamo")
    assert ExportInfo.read(folder).verification["max_abs_diff"] < 1e-3


def test_half_precision_graph_keeps_float32_inputs_and_the_top1(tmp_path_factory, tmp_path):
    run = trained_run("classify", tmp_path_factory)
    half = dinotune.export(run, tmp_path / "half", half=True, exporter="legacy")
    info = ExportInfo.read(half)
    assert info.dtype == "float16"
    x = np.stack([classify_input(read_image(p, info.input, 0), 56, info.input)
                  for p in _images("made", "classify", tmp_path_factory, 4)])
    a = _session(half)[0].run(images=x)["logits"]
    b = _session(exported("classify", tmp_path_factory))[0].run(images=x)["logits"]
    assert a.dtype == np.float32 and np.abs(a - b).max() < 0.05 and (a.argmax(1) == b.argmax(1)).all()


def test_torchscript_export_loads_with_torch_jit(tmp_path_factory, tmp_path):
    run = trained_run("detect", tmp_path_factory)
    folder = dinotune.export(run, tmp_path / "ts", format="torchscript")
    info = ExportInfo.read(folder)
    assert info.format == "torchscript" and info.model_file == "model.pt"
    traced = torch.jit.load(str(folder / "model.pt"))
    x, sizes = torch.randn(3, 3, 56, 56), torch.tensor([[52.0, 70.0], [70.0, 40.0], [56.0, 56.0]])
    with torch.no_grad():
        scores, labels, boxes = traced(x, sizes)
    got = _session(exported("detect", tmp_path_factory))[0].run(images=x.numpy(), orig_sizes=sizes.numpy())
    assert np.abs(scores.numpy() - got["scores"]).max() < 1e-4 and (labels.numpy() == got["labels"]).all()
    assert np.abs(boxes.numpy() - got["boxes"]).max() < 1e-2
    with pytest.raises(ConfigError, match="torchscript export"):
        dinotune.runtime.load_predictor(folder)


def test_refusals_name_the_problem(tmp_path_factory, tmp_path, capsys):
    run = trained_run("classify", tmp_path_factory)
    with pytest.raises(ConfigError, match="not a multiple of the patch size 14; try 56 or 70"):
        dinotune.export(run, tmp_path / "a", image_size=60)
    with pytest.raises(ConfigError, match="opset 17 or later"):
        dinotune.export(run, tmp_path / "b", opset=16)
    with pytest.raises(ConfigError, match="not an option of --format onnx"):
        dinotune.export(run, tmp_path / "c", push_to_hub="me/model")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ExportError, match="not empty"):
        dinotune.export(run, tmp_path / "full")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert main(["export", str(run), "--format", "torchscript", "--out", str(tmp_path / "d"), "--opset", "18"]) == 2
    assert "--opset does not apply to --format torchscript" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "e"), "--half"]) == 2
    assert "--half does not apply to --format hf" in capsys.readouterr().err
