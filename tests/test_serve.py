"""``dinotune serve``: the JSON API through FastAPI's test client for the three tasks (tiny runs
trained for one epoch here), each answer equal to what ``dinotune predict`` writes for the same
file; bad uploads refused with a 4xx and a message, the server answering the next good one; band
arrays checked against the model's bands; one inference at a time."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'dinotune[serve]')")

from fastapi.testclient import TestClient  # noqa: E402

import dinotune  # noqa: E402
from dinotune.cli import main  # noqa: E402
from dinotune.data.bands import InputSpec  # noqa: E402
from dinotune.errors import ConfigError  # noqa: E402
from dinotune.serve import RunPredictor, create_app, open_predictor  # noqa: E402
from tests.conftest import (  # noqa: E402
    make_class_folders,
    make_coco_dataset,
    make_instance_dataset,
    make_segmentation_folders,
    tiny_options,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = ("classify", "detect", "segment")
_RUNS: dict[str, tuple[Path, Path]] = {}  # task -> (run folder, a sample image); shared with the browser test


def _sample_jpeg(path: Path) -> Path:
    """A 30 x 40 JPEG stored sideways with EXIF orientation 6: the server must read it upright, as
    ``dinotune predict`` does, and its PNG copy must carry the same pixels."""
    rng = np.random.default_rng(5)
    pixels = rng.integers(60, 200, (40, 30, 3)).astype(np.uint8)
    pixels[5:20, 3:15] = (220, 40, 40)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, "JPEG", exif=exif, quality=92)
    return path


def tiny_run(task: str, root: Path) -> tuple[Path, Path]:
    """A ``random:tiny`` run of ``task`` trained for one epoch under ``root`` (once per session),
    and an image to predict."""
    if task in _RUNS:
        return _RUNS[task]
    base = root / task
    if task == "classify":
        make_class_folders(base / "data" / "train", ["red", "blue"], 4, seed=1)
        make_class_folders(base / "data" / "val", ["red", "blue"], 2, seed=2)
        result = dinotune.train(task="classify", data=str(base / "data"), **tiny_options(base / "run", epochs=1))
        sample = _sample_jpeg(base / "sample.jpg")
    elif task == "detect":
        coco = make_coco_dataset(base / "coco", {"train2017": [1, 2, 1, 2], "val2017": [2, 1]}, size=(40, 32))
        result = dinotune.train(task="detect", data=str(coco), **tiny_options(
            base / "run", epochs=1, hidden_dim=16, num_heads=2, ffn_dim=32, decoder_layers=1, num_queries=5,
            sampling_points=1, check_images="fast"))
        sample = coco / "val2017" / "val2017_000.png"
    elif task == "instance":
        data = make_instance_dataset(base / "inst", {"train": [1, 2, 1, 2], "val": [2, 1]}, size=(40, 32))
        result = dinotune.train(task="instance", data=str(data), **tiny_options(
            base / "run", epochs=1, hidden_dim=16, num_heads=2, ffn_dim=32, decoder_layers=1, num_queries=5,
            sampling_points=1, mask_dim=8, mask_scale=2.0, mask_points=256, check_images="fast"))
        sample = data / "val" / "val_000.png"
    else:
        data = make_segmentation_folders(base / "seg", {"train": 4, "val": 2}, size=28)
        result = dinotune.train(task="segment", data=str(data), **tiny_options(base / "run", epochs=1,
                                                                                check_images="fast"))
        sample = data / "val" / "images" / "000.png"
    _RUNS[task] = (Path(result["run_dir"]), sample)
    return _RUNS[task]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict[str, tuple[Path, Path, TestClient]]:
    root = tmp_path_factory.mktemp("serve")
    out = {}
    for task in TASKS:
        run, sample = tiny_run(task, root)
        out[task] = (run, sample, TestClient(create_app(RunPredictor.load(run, device="cpu"))))
    return out


def _upload(client: TestClient, path: Path, name: str | None = None, query: str = "") -> Any:
    return client.post(f"/predict{query}", files={"file": (name or path.name, path.read_bytes())})


def _cli_predict(run: Path, image: Path, capsys, *extra: str) -> Any:
    capsys.readouterr()
    assert main(["predict", str(run), str(image), "--device", "cpu", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def _decode(data_url: str) -> Image.Image:
    head, payload = data_url.split(",", 1)
    assert head in ("data:image/jpeg;base64", "data:image/png;base64")
    return Image.open(io.BytesIO(base64.b64decode(payload)))


# ------------------------------------------------------------------------------ the JSON API
@pytest.mark.parametrize("task", TASKS)
def test_health_names_the_model(served, task):
    run, _, client = served[task]
    health = client.get("/health").json()
    loaded = json.loads((run / "checkpoints" / "best" / "meta.json").read_text())
    assert health["status"] == "ok" and health["task"] == task
    assert health["classes"] == loaded["class_names"]
    assert health["model"]["backbone"] == "random:tiny" and health["model"]["run"] == run.name
    assert health["input"] == {"bands": 3, "arrays": False} and health["max_upload_mb"] == 20


@pytest.mark.parametrize("task", TASKS)
def test_predict_equals_the_cli_record(served, task, capsys, tmp_path):
    run, sample, client = served[task]
    answer = _upload(client, sample)
    assert answer.status_code == 200, answer.text
    record = answer.json()
    assert record["image"] == sample.name and "overlay" not in record
    cli = _cli_predict(run, sample, capsys, *(["--format", "coco"] if task == "detect" else []))
    if task == "detect":  # COCO results (every top-k detection, as the server's record): one flat entry per box
        assert cli == [{"image_id": record["image_id"], "file_name": str(sample), "category_id": d["category_id"],
                        "bbox": d["bbox"], "score": d["score"]} for d in record["detections"]]
        assert (record["width"], record["height"]) == Image.open(sample).size
        numbered = tmp_path / "000042.png"  # a numeric file name is the COCO image id, served or not
        numbered.write_bytes(sample.read_bytes())
        assert _upload(client, numbered).json()["image_id"] == 42 == _cli_predict(run, numbered, capsys)[0]["image_id"]
        shown = _cli_predict(run, sample, capsys, "--draw-threshold", "0")  # the records a person reads, all shown
        assert shown == [{**record, "image": str(sample)}]
    else:  # classification and segmentation write a list of these records
        assert cli == [{**record, "image": str(sample)}]
    with_overlay = _upload(client, sample, query="?overlay=1").json()
    assert {k: v for k, v in with_overlay.items() if k != "overlay"} == record


def test_classification_reads_the_jpeg_upright(served):
    _, sample, client = served["classify"]
    overlay = _upload(client, sample, query="?overlay=1").json()["overlay"]
    assert Image.open(sample).size == (30, 40)  # stored 30 wide, 40 high; EXIF orientation 6 turns it
    assert (overlay["source_width"], overlay["source_height"]) == (40, 30)
    assert _decode(overlay["image"]).size == (40, 30) and overlay["mask"] is None


def test_segmentation_overlay_is_the_predicted_mask(served, capsys, tmp_path):
    run, sample, client = served["segment"]
    overlay = _upload(client, sample, query="?overlay=1").json()["overlay"]
    _cli_predict(run, sample, capsys, "--masks", str(tmp_path))
    labels = np.asarray(Image.open(tmp_path / f"{sample.stem}.png"))
    drawn = np.asarray(_decode(overlay["mask"]).convert("RGBA"))
    assert drawn.shape[:2] == labels.shape and (drawn[..., 3] == 255).all()
    classes = json.loads((run / "checkpoints" / "best" / "meta.json").read_text())["class_names"]
    colours = {name: tuple(int(h[i:i + 2], 16) for i in (1, 3, 5)) for name, h in overlay["colors"].items()}
    for label in np.unique(labels):  # every pixel has the colour of the label the CLI wrote there
        assert (drawn[labels == label][:, :3] == colours[classes[label]]).all()


def test_bad_uploads_get_4xx_and_the_server_goes_on(served, tmp_path):
    run, sample, _ = served["classify"]
    predictor = RunPredictor.load(run, device="cpu")
    client = TestClient(create_app(predictor, max_upload_mb=0.01))
    good = sample.read_bytes()
    expected = client.post("/predict", files={"file": ("s.jpg", good)}).json()
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(png, "PNG")
    cases = [
        ({"files": {"file": ("notes.txt", b"just some text\n")}}, 415, "notes.txt: not an image"),
        ({"files": {"file": ("cut.png", png.getvalue()[:1500])}}, 422, "cut.png: truncated or corrupt"),
        ({"files": {"file": ("empty.jpg", b"")}}, 400, "empty upload"),
        ({"files": {"other": ("x.jpg", good)}}, 400, "multipart field 'file'"),
        ({"files": {"file": ("big.jpg", b"\xff" * 20_000)}}, 413, "over the limit of 0.01 MB"),
        ({"content": iter([b"\xff" * 8000] * 3)}, 413, "over the limit of 0.01 MB"),  # chunked: no length given
        ({"files": {"file": ("bands.npy", _npy(np.zeros((6, 6, 4), np.float32)))}}, 422,
         "trained on pictures but this upload is a band array"),
    ]
    for kwargs, status, message in cases:
        answer = client.post("/predict", **kwargs)
        assert answer.status_code == status, (message, answer.text)
        assert message in answer.json()["detail"]
        assert client.post("/predict", files={"file": ("s.jpg", good)}).json() == expected  # still serving
    predictor.max_image_pixels = 1000  # 30 x 40 = 1200 pixels: refused from the header
    small = TestClient(create_app(predictor))
    answer = small.post("/predict", files={"file": ("s.jpg", good)})
    assert answer.status_code == 422 and "over the limit of 1,000" in answer.json()["detail"]
    tiny = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(tiny, "PNG")
    raw = small.post("/predict?name=tiny.png", content=tiny.getvalue(), headers={"content-type": "image/png"})
    assert raw.status_code == 200 and raw.json()["image"] == "tiny.png"  # a raw body works too


# ------------------------------------------------------------------ any predictor, band arrays
def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


class BandEcho:
    """A predictor of 4-band arrays that reports what it was given (any object with ``task``,
    ``class_names`` and ``predict_array`` can be served)."""

    task = "classify"
    class_names = ["a", "b"]
    input_spec = InputSpec(in_channels=4, rgb_bands=[2, 1, 0], mean=[0.0] * 4, std=[1.0] * 4, arrays=True)

    def __init__(self) -> None:
        self.active = self.most = 0
        self.fail_next = False

    def predict_array(self, array: np.ndarray, name: str) -> dict[str, Any]:
        self.active += 1
        self.most = max(self.most, self.active)
        time.sleep(0.02)
        self.active -= 1
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("the model fell over")
        return {"image": name, "shape": list(array.shape), "sum": float(array.astype(np.float64).sum())}


def test_band_arrays_are_checked_against_the_model_bands(tmp_path):
    import tifffile

    predictor = BandEcho()
    client = TestClient(create_app(predictor))
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 4000, (4, 10, 12)).astype(np.uint16)  # C x H x W: the band axis is the small one
    answer = client.post("/predict", files={"file": ("tile.npy", _npy(tile))})
    assert answer.json() == {"image": "tile.npy", "shape": [10, 12, 4], "sum": float(tile.sum())}
    tifffile.imwrite(tmp_path / "tile.tif", np.moveaxis(tile, 0, -1), planarconfig="contig")
    answer = client.post("/predict?overlay=1", files={"file": ("t.tif", (tmp_path / "tile.tif").read_bytes())})
    assert answer.json()["shape"] == [10, 12, 4] and answer.json()["sum"] == float(tile.sum())
    assert _decode(answer.json()["overlay"]["image"]).size == (12, 10)  # drawn through the RGB bands
    refusals = [
        (_npy(tile[:3]), 422, "has 3 band(s) but the model takes 4"),
        (_npy(np.full((4, 6, 6), np.nan, np.float32)), 422, "NaN / inf"),
        (_npy(np.array([{"a": 1}], dtype=object)), 422, "object"),
    ]
    png = io.BytesIO()
    Image.new("RGB", (6, 6)).save(png, "PNG")
    refusals.append((png.getvalue(), 422, "trained on band arrays (4 bands) but this upload is a picture"))
    for data, status, message in refusals:
        answer = client.post("/predict", files={"file": ("x.npy", data)})
        assert answer.status_code == status and message in answer.json()["detail"], answer.text
    predictor.fail_next = True
    failed = client.post("/predict", files={"file": ("tile.npy", _npy(tile))})
    assert failed.status_code == 500 and "the model fell over" in failed.json()["detail"]
    assert client.post("/predict", files={"file": ("tile.npy", _npy(tile))}).status_code == 200


def test_one_inference_at_a_time():
    predictor = BandEcho()
    app = create_app(predictor)
    data = _npy(np.ones((4, 8, 8), np.float32))
    codes: list[int] = []

    def post() -> None:
        with TestClient(app) as client:
            codes.append(client.post("/predict", files={"file": ("t.npy", data)}).status_code)

    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 4 and predictor.most == 1


# ------------------------------------------------------------------------------ exported models
@pytest.mark.parametrize("task", ["classify", "segment"])
def test_an_exported_model_serves_what_its_run_serves(served, task, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    pytest.importorskip("dinotune.runtime", reason="dinotune.runtime is not available")
    from dinotune.export import export

    run, sample, torch_client = served[task]
    # the legacy exporter: the same graph as dynamo's for these heads, in a second instead of ten
    folder = export(run, tmp_path / "onnx", format="onnx", exporter="legacy")
    client = TestClient(create_app(open_predictor(folder, device="cpu")))
    health = client.get("/health").json()
    assert health["model"]["backend"] == "onnx" and health["classes"] == torch_client.get("/health").json()["classes"]
    served_onnx = _upload(client, sample, query="?overlay=1").json()
    served_torch = _upload(torch_client, sample, query="?overlay=1").json()
    if task == "classify":
        assert [p["class"] for p in served_onnx["predictions"]] == [p["class"] for p in served_torch["predictions"]]
        assert [p["score"] for p in served_onnx["predictions"]] == pytest.approx(
            [p["score"] for p in served_torch["predictions"]], abs=1e-5)
    else:  # the same label map, drawn the same
        assert served_onnx["classes"] == served_torch["classes"]
        assert served_onnx["overlay"]["mask"] == served_torch["overlay"]["mask"]
    assert open_predictor(folder / "model.onnx", device="cpu").task == task  # the .onnx file itself too
    if task == "segment":  # serving an export needs no torch: the same answer with torch unimportable
        script = ("import sys, json; sys.modules['torch'] = None\n"
                  "from pathlib import Path\nfrom fastapi.testclient import TestClient\n"
                  "from dinotune.serve import create_app, open_predictor\n"
                  "client = TestClient(create_app(open_predictor(sys.argv[1], device='cpu')))\n"
                  "image = Path(sys.argv[2])\n"
                  "answer = client.post('/predict?overlay=1', files={'file': (image.name, image.read_bytes())})\n"
                  "print(json.dumps(answer.json()))\n")
        done = subprocess.run([sys.executable, "-c", script, str(folder), str(sample)], capture_output=True,
                              text=True, cwd=Path(__file__).parent.parent, timeout=120)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == served_onnx


# ------------------------------------------------------------------------------------ the CLI
def test_serve_command_refuses_bad_arguments(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert "no such run folder or ONNX model" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--max-upload-mb", "0"]) == 2
    assert "--max-upload-mb 0.0: must be > 0" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="neither a run folder"):
        open_predictor(tmp_path)


def test_the_page_and_its_script_are_served(served):
    client = served["classify"][2]
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file"' in page.text and "/static/page.js" in page.text
    assert "/predict?overlay=1" in client.get("/static/page.js").text


def test_similar_answers_an_index_beside_the_model_and_alone(served, tmp_path):
    """``serve RUN --index DIR``: POST /similar answers what ``dinotune search`` answers (the upload
    first when it is indexed), names relative to the dataset, pictures by row only; an index
    served alone answers the hits from /predict."""
    from dinotune.serve.similar import SimilarImages

    run, _, _ = served["classify"]
    data = run.parent / "data"
    emb = dinotune.api.embed(run, data, tmp_path / "e.parquet", device="cpu", progress=False)
    dinotune.api.build_index(emb, tmp_path / "idx")
    client = TestClient(create_app(RunPredictor.load(run, device="cpu"), similar=SimilarImages(tmp_path / "idx", "cpu")))
    assert client.get("/health").json()["similar"]["images"] == 12
    image = sorted((data / "train" / "red").iterdir())[1]
    upload = {"file": (image.name, image.read_bytes())}
    hits = client.post("/similar?k=3", files=upload).json()["hits"]
    assert hits[0]["name"] == str(image.relative_to(data)) and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    [searched] = dinotune.api.search(tmp_path / "idx", image, k=3, picture=None, device="cpu")
    assert [h["label"] for h in hits] == [h["label"] for h in searched["hits"]]
    assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in searched["hits"]], abs=1e-5)
    thumb = client.get(f"/similar/{hits[1]['row']}.jpg")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(thumb.content)).size[0] > 0
    assert client.get("/similar/12.jpg").status_code == 404 and client.get("/similar/-1.jpg").status_code == 404
    assert client.post("/similar?k=0", files=upload).status_code == 422
    assert client.post("/similar", files={"file": ("x.txt", b"not a picture")}).status_code == 415
    alone = TestClient(create_app(open_predictor(tmp_path / "idx", device="cpu")))
    assert alone.post("/predict", files=upload).json()["hits"][0]["row"] == hits[0]["row"]
