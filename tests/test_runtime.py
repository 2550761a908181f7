"""The torch-free runtime (``dinotune.runtime``, ``dinotune predict ... --backend onnx``): its numpy
pre- and post-processing equal the torch path's transforms; it predicts the records and files
``dinotune predict`` writes for the run (every task, band arrays, sliding windows); it imports and
runs in a process where torch cannot be imported; refusals name the problem."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

import dinotune
from dinotune.cli import main
from dinotune.config import build_config
from dinotune.data.bands import InputSpec, read_input
from dinotune.data.transforms import classify_eval_transform, normalize
from dinotune.errors import ConfigError, DataError
from dinotune.runtime import InputSpec as RuntimeSpec
from dinotune.runtime import load_predictor, windows
from dinotune.runtime import postprocess as post
from dinotune.runtime import preprocess as pre
from dinotune.tasks import get_task
from dinotune.tasks.classify.runtime import classify_input
from dinotune.tasks.detect.runtime import detect_input
from dinotune.tasks.detect.transforms import resize_pad, to_input
from dinotune.tasks.segment import data as seg_data
from dinotune.tasks.segment import inference as seg_inference
from dinotune.tasks.segment.runtime import eval_size, segment_input
from tests.conftest import make_image, shared_data
from tests.export_runs import copy_run, data_folder, exported, exported_into_run, trained_run

pytest.importorskip("onnxruntime", reason="the runtime extra (onnxruntime) is not installed")
pytest.importorskip("onnx", reason="the export extra (onnx, onnxscript) is not installed")
pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def _pictures(tmp_path: Path) -> list[Path]:
    """Pictures of awkward sizes (odd, portrait, landscape, smaller than the model input)."""
    out = []
    for i, (w, h) in enumerate([(61, 47), (40, 75), (120, 90), (23, 31)]):
        path = tmp_path / f"pic{i}.png"
        make_image((200, 40 + 40 * i, 90), 1, seed=i).resize((w, h)).save(path)
        out.append(path)
    return out


def _real_or_made(tmp_path: Path) -> list[Path]:
    paths = _pictures(tmp_path)
    try:
        paths += sorted(shared_data("hymenoptera").rglob("*.jpg"))[:3]
        paths += sorted(shared_data("coco_tiny").rglob("*.jpg"))[:2]
    except pytest.skip.Exception:
        pass
    return paths


def assert_records_close(a: Any, b: Any, where: str = "", tol: float = 1e-4) -> None:
    """Records equal, numbers to ``tol`` (boxes rounded to 2 decimals: to one unit of the last)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {a.keys()} != {b.keys()}"
        for k in a:
            assert_records_close(a[k], b[k], f"{where}.{k}", 0.011 if k == "bbox" else tol)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: {len(a)} != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_records_close(x, y, f"{where}[{i}]", tol)
    elif isinstance(a, float) or isinstance(b, float):
        assert abs(a - b) <= tol, f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ------------------------------------------------------------------------------ preprocessing
def test_uint8_resize_is_bit_identical_and_float_resize_close_to_torch(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (47, 61, 3)).astype(np.uint8)
    bands = rng.normal(1000, 300, (47, 61, 5)).astype(np.float32)
    for h, w in [(56, 56), (23, 17), (100, 130), (47, 30), (31, 61), (1, 5)]:
        want = TF.resize(tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1).contiguous()), [h, w], antialias=True)
        assert np.array_equal(pre.resize(image, h, w), want.permute(1, 2, 0).numpy())
        want = TF.resize(torch.from_numpy(bands).permute(2, 0, 1).contiguous(), [h, w], antialias=True)
        np.testing.assert_allclose(pre.resize(bands, h, w), want.permute(1, 2, 0).numpy(), rtol=1e-5, atol=1e-2)


def test_model_inputs_equal_the_torch_transforms_for_every_task(tmp_path):
    spec = RuntimeSpec()
    for path in _real_or_made(tmp_path):
        pil = Image.open(path).convert("RGB")
        array = np.asarray(pil)
        for size in (56, 28):
            want = classify_eval_transform(size)(pil).numpy()
            assert np.abs(classify_input(array, size, spec) - want).max() < 1e-6
            canvas, _, factor = resize_pad(tv_tensors.Image(TF.pil_to_tensor(pil)), torch.zeros(0, 4), size)
            got, got_factor = detect_input(array, size, spec)
            assert got_factor == factor and np.abs(got - to_input()(canvas.as_subclass(torch.Tensor)).numpy()).max() < 1e-6
            hw = seg_data.eval_size(pil.height, pil.width, size, 14)
            assert eval_size(pil.height, pil.width, size, 14) == hw
            want = v2.Compose([v2.ToImage(), v2.Resize(list(hw), antialias=True), v2.ToDtype(torch.float32, scale=True),
                               normalize()])(pil)
            got, valid = segment_input(array, hw, 14, spec)
            assert valid == hw and np.abs(got[:, : hw[0], : hw[1]] - want.numpy()).max() < 1e-6


def test_band_array_inputs_equal_the_torch_transform(tmp_path):
    tile = np.random.default_rng(3).integers(800, 3000, (37, 29, 5)).astype(np.uint16)
    np.save(tmp_path / "tile.npy", tile)
    spec = InputSpec(in_channels=5, rgb_bands=[2, 1, 0], mean=[1000.0] * 5, std=[500.0, 400, 300, 200, 100], arrays=True)
    want = classify_eval_transform(28, spec)(read_input(tmp_path / "tile.npy")).numpy()
    info = RuntimeSpec.from_dict(spec.to_meta())
    got = classify_input(tile.astype(np.float32), 28, info)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- postprocessing
def test_segmentation_postprocessing_equals_the_torch_path():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 5, 7, generator=g)
    for size in [(20, 28), (3, 4), (5, 7), (41, 33)]:
        want = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).numpy()
        assert np.abs(post.resize_logits(logits.numpy(), size) - want).max() < 1e-5
    want = seg_inference.crop_and_resize(logits, (70, 98), (56, 84), (60, 90)).numpy()
    assert np.abs(post.crop_and_resize(logits.numpy(), (70, 98), (56, 84), (60, 90)) - want).max() < 1e-5
    for size, window, stride in [(100, 28, 14), (28, 28, 14), (20, 28, 14), (90, 42, 28)]:
        assert windows.window_starts(size, window, stride) == seg_inference.window_starts(size, window, stride)
        assert windows.default_stride(window, 14) == seg_inference.default_stride(window, 14)
    conv = torch.nn.Conv2d(3, 4, kernel_size=14, stride=14)  # a stand-in segmenter of stride 14
    image = torch.randn(1, 3, 70, 98, generator=g)
    with torch.no_grad():
        want = seg_inference.predict_logits(conv, image, (65, 90), mode="slide", window=28, stride=14,
                                            valid_size=(61, 90), window_batch=3, patch_size=14).numpy()[0]
        got = post.dense_logits(lambda x: conv(torch.from_numpy(x)).numpy(), image[0].numpy(), (65, 90), (61, 90),
                                  "slide", 28, 14, 3)
    assert np.abs(got - want).max() < 1e-4


def test_records_text_equals_each_tasks_format_predictions():
    records = {
        "classify": [{"image": "a.jpg", "predictions": [{"class": "ant", "index": 0, "score": 0.7},
                                                         {"class": "bee", "index": 1, "score": 0.3}]}],
        "detect": [{"image": "1.jpg", "image_id": 1, "width": 10, "height": 8, "detections": [
            {"category_id": 3, "category": "red", "bbox": [1.0, 2.5, 3.0, 4.0], "score": 0.9}]},
            {"image": "2.jpg", "image_id": 2, "width": 10, "height": 8, "detections": []}],
        "segment": [{"image": "a.png", "mask": "m/a.png", "classes": {"sky": 0.25, "road": 0.75}},
                    {"image": "b.png", "mask": None, "classes": {"sky": 1.0}}],
    }
    csv_rows = {"classify": 1, "detect": 1, "segment": 3}  # per image / per detection / per image and class
    for task, results in records.items():
        torch_task = get_task(build_config(task))
        runtime = torch_task.runtime()
        assert runtime.name == task
        for fmt in ("json", "csv"):
            assert runtime.format_predictions(results, fmt) == torch_task.format_predictions(results, fmt)
        rows = runtime.format_predictions(results, "csv").strip().splitlines()
        assert len(rows) == 1 + csv_rows[task], rows
        loaded = json.loads(runtime.format_predictions(results, "json"))
        assert loaded == results if task != "detect" else [
            {"image_id": 1, "file_name": "1.jpg", "category_id": 3, "bbox": [1.0, 2.5, 3.0, 4.0], "score": 0.9}]
        with pytest.raises(ConfigError, match="json or csv"):
            runtime.format_predictions(results, "xml")


# ----------------------------------------------------------------------- predictions, files
@pytest.mark.parametrize("kind", ["classify", "detect", "single", "segment"])
def test_predict_backend_onnx_writes_the_torch_paths_files(kind, tmp_path_factory, tmp_path):
    """``dinotune predict RUN ... --backend onnx`` (exported once into the run, then reused) writes
    the JSON / CSV records and label PNGs of ``dinotune predict RUN ...``."""
    run = trained_run(kind, tmp_path_factory)
    export = exported_into_run(kind, tmp_path_factory) / "model.onnx"
    stamp = export.stat().st_mtime_ns
    images = str(data_folder(kind, tmp_path_factory, "train"))
    texts = {}
    for backend in ("torch", "onnx"):
        extra = ["--masks", str(tmp_path / f"masks-{backend}")] if kind == "segment" else []
        for fmt in ("json", "csv") if kind in ("classify", "detect") else ("json",):
            out = tmp_path / f"{backend}.{fmt}"
            assert main(["predict", str(run), images, "--backend", backend, "--out", str(out), "--device", "cpu",
                         *extra]) == 0
            texts[backend, fmt] = out.read_text().replace(f"masks-{backend}", "masks")
    assert_records_close(json.loads(texts["torch", "json"]), json.loads(texts["onnx", "json"]))
    if ("torch", "csv") in texts:
        assert texts["torch", "csv"].splitlines()[0] == texts["onnx", "csv"].splitlines()[0]
        assert len(texts["torch", "csv"].splitlines()) == len(texts["onnx", "csv"].splitlines())
    if kind == "segment":
        for png in (tmp_path / "masks-torch").glob("*.png"):
            a, b = np.asarray(Image.open(png)), np.asarray(Image.open(tmp_path / "masks-onnx" / png.name))
            assert (a == b).mean() >= 0.999
    assert export == run / "export" / "onnx-best" / "model.onnx"
    assert export.stat().st_mtime_ns == stamp  # reused while the checkpoint is unchanged


def test_sliding_windows_equal_pytorch_on_images_of_any_shape(tmp_path_factory, tmp_path):
    """A ``slide`` run: windows of the exported size over the full-resolution image, as PyTorch."""
    run = copy_run(trained_run("segment", tmp_path_factory), tmp_path / "slide", ("inference: whole", "inference: slide"))
    folder = dinotune.export(run, tmp_path / "onnx", exporter="legacy")
    assert load_predictor(folder).info.postprocess["inference"] == "slide"
    images = _pictures(tmp_path)
    try:
        images += sorted(shared_data("coco_tiny").rglob("*.jpg"))[:2]
    except pytest.skip.Exception:
        pass
    want = dinotune.load(run, device="cpu").predict(images, masks=str(tmp_path / "a"))
    got = load_predictor(folder, device="cpu").predict(images, masks=str(tmp_path / "b"))
    for w, g in zip(want, got):
        a = np.asarray(Image.open(w["mask"]))
        b = np.asarray(Image.open(g["mask"]))
        assert a.shape == b.shape and (a == b).mean() >= 0.999
        assert_records_close(w["classes"], g["classes"], tol=1e-3)


def test_band_arrays_predict_like_the_torch_path(tmp_path_factory):
    run = trained_run("bands", tmp_path_factory)
    folder = exported("bands", tmp_path_factory)
    images = data_folder("bands", tmp_path_factory)
    assert load_predictor(folder).input_spec.in_channels == 5
    assert_records_close(dinotune.load(run, device="cpu").predict(images), load_predictor(folder).predict(images))


@pytest.mark.parametrize("kind", ["classify", "detect", "segment"])
def test_predict_array_gives_the_record_of_the_file(kind, tmp_path_factory):
    predictor = load_predictor(exported(kind, tmp_path_factory))
    path = sorted(p for p in data_folder(kind, tmp_path_factory).rglob("*.png"))[0]
    record, extras = predictor.predict_view(np.asarray(Image.open(path).convert("RGB")), str(path))
    assert_records_close(record, predictor.predict([path])[0])
    assert ("mask" in extras) == (kind == "segment")
    if kind == "segment":  # the label map the record's class shares were counted on
        mask = extras["mask"]
        assert mask.shape == np.asarray(Image.open(path)).shape[:2]
        names = predictor.class_names
        counted = {names[c]: round(float((mask == c).mean()), 5) for c in np.unique(mask)}
        assert counted == record["classes"]


def test_the_runtime_runs_where_torch_cannot_be_imported(tmp_path_factory, tmp_path):
    """The runtime modules, ``load_predictor`` and ``dinotune predict EXPORT`` in a process whose
    ``import torch`` fails: the records equal the torch path's."""
    folder = exported("classify", tmp_path_factory)
    images = data_folder("classify", tmp_path_factory)
    script = f"""
import json, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "transformers", "peft"):
            raise ImportError(f"{{name}} is blocked in this test")
sys.meta_path.insert(0, NoTorch())
from dinotune.runtime import load_predictor
records = load_predictor({str(folder)!r}, device="cpu").predict([{str(images)!r}])
from dinotune.cli import main
code = main(["predict", {str(folder)!r}, {str(images)!r}, "--out", {str(tmp_path / "cli.csv")!r}])
assert "torch" not in sys.modules, "torch was imported"
print(json.dumps({{"records": records, "code": code}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["code"] == 0 and (tmp_path / "cli.csv").read_text().startswith("image,class_1,score_1")
    want = dinotune.load(trained_run("classify", tmp_path_factory), device="cpu").predict(images)
    assert_records_close(want, result["records"])


def test_refusals_name_the_problem(tmp_path_factory, tmp_path, capsys):
    classify, detect = load_predictor(exported("classify", tmp_path_factory)), load_predictor(exported("detect", tmp_path_factory))
    images = data_folder("classify", tmp_path_factory)
    with pytest.raises(ConfigError, match="masks: not an option of classify predictions"):
        classify.predict(images, masks=str(tmp_path))
    with pytest.raises(ConfigError, match="draw: not an option of classify predictions with the ONNX backend"):
        classify.predict(images, draw=str(tmp_path))
    with pytest.raises(ConfigError, match=r"--top-k 0: must be >= 1 \(inference.top_k\)"):
        classify.predict(images, top_k=0)  # the range the task config declares
    with pytest.raises(ConfigError, match="category_ids='voc' is not one of: coco, yolo"):
        detect.predict(images, category_ids="voc")
    with pytest.raises(DataError, match="takes H x W x 3 uint8"):
        classify.predict_array(np.zeros((8, 8, 4), np.uint8), "rgba.png")
    np.save(tmp_path / "tile.npy", np.zeros((8, 8, 5), np.float32))
    with pytest.raises(DataError, match="trained on pictures"):
        classify.predict([tmp_path / "tile.npy"])
    with pytest.raises(ConfigError, match="dinotune_export.json is missing"):
        load_predictor(tmp_path)
    assert main(["predict", str(exported("classify", tmp_path_factory)), str(images), "--backend", "torch"]) == 2
    assert "predict it with --backend onnx" in capsys.readouterr().err
    assert main(["predict", str(exported("classify", tmp_path_factory)), str(images), "--score-threshold", "0.5"]) == 2
    assert "--score-threshold does not apply to classify runs" in capsys.readouterr().err


def test_detection_outputs_for_a_person_and_for_evaluation(tmp_path_factory, tmp_path, capsys):
    """JSON records and CSV rows show the detections scoring at least --draw-threshold; COCO results
    (``--format coco``, or JSON with ``--image-info``) keep every top-k detection, as COCO AP
    requires; ``--draw`` works with the ONNX backend and gives the torch path's drawings."""
    folder, images = exported("detect", tmp_path_factory), data_folder("detect", tmp_path_factory)

    def predict(*extra: str) -> str:
        capsys.readouterr()
        assert main(["predict", str(folder), str(images), *extra]) == 0
        return capsys.readouterr().out

    every = json.loads(predict("--format", "coco"))
    scores = sorted(r["score"] for r in every)
    cut = scores[len(scores) // 2]  # a threshold that keeps about half
    records = json.loads(predict("--draw-threshold", str(cut)))
    shown = [d["score"] for r in records for d in r["detections"]]
    assert shown and min(shown) >= cut and len(shown) == sum(1 for s in scores if s >= cut) < len(every)
    rows = predict("--format", "csv", "--draw-threshold", str(cut)).strip().splitlines()
    assert len(rows) == 1 + len(shown)
    info = tmp_path / "info.json"
    info.write_text(json.dumps({"images": [{"file_name": p.name, "id": 100 + i}
                                           for i, p in enumerate(sorted(images.iterdir()))]}))
    for_eval = json.loads(predict("--image-info", str(info), "--draw-threshold", str(cut)))
    assert len(for_eval) == len(every) and {r["image_id"] for r in for_eval} >= {100}

    draw = tmp_path / "drawn"
    assert main(["predict", str(folder), str(images), "--draw", str(draw), "--draw-threshold", "0"]) == 0
    drawn = sorted(p.name for p in draw.glob("*.jpg"))
    assert drawn == sorted(f"{p.stem}.jpg" for p in images.iterdir()) and (draw / "confidence_histogram.png").is_file()
    capsys.readouterr()


def test_onnx_options_are_refused_before_the_run_is_exported(tmp_path_factory, tmp_path, capsys):
    run = copy_run(trained_run("classify", tmp_path_factory), tmp_path / "run")
    shutil.rmtree(run / "export", ignore_errors=True)  # a cached export from other tests
    images = data_folder("classify", tmp_path_factory)
    for extra, message in ((["--draw", str(tmp_path / "d")], "--draw does not apply to classify runs"),
                           (["--format", "coco"], "--format coco is not an output format of this run")):
        assert main(["predict", str(run), str(images), "--backend", "onnx", *extra]) == 2
        assert message in capsys.readouterr().err
        assert not (run / "export").exists()  # refused before any export work
