"""Hostile images and uploads, round two: files whose headers are small and harmless-looking but
whose decoding or resizing is not (a 1 x 100000 PNG, a 1.9 MB TIFF of 13 x 4000 x 4000 values, a
TIFF of 20 000 tiny pages, .npy files of 1e300 or record values), in both the PyTorch and the numpy
paths and through the server.

The hole tests run the command under a memory cap (``run_capped``: a child process, cheap for the
onnx path that imports no torch; ``main_capped``: in this process, its data segment capped for the
call, for the torch path; the server through ``_serve_capped``), so an open hole fails the test
instead of taking the machine. Payloads
are built small: a 1 x N PNG is a few hundred bytes, the 13-band TIFF is zlib-compressed zeros.
"""

from __future__ import annotations

import io
import json
import resource
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import tifffile
from PIL import Image

import dinotune
from dinotune.cli import main
from dinotune.data.arrays import band_header, check_band_file, read_bands
from dinotune.data.images import DEFAULT_MAX_IMAGE_PIXELS, check_image, load_image
from dinotune.data.input_spec import InputSpec
from dinotune.data.transforms import classify_eval_transform
from dinotune.errors import DataError, ImageReadError
from dinotune.runtime.metadata import ExportInfo
from dinotune.tasks.classify.runtime import classify_input
from dinotune.tasks.segment.runtime import SegmentRuntime
from tests.conftest import main_capped, make_class_folders, run_capped, tiny_options

ROOT = Path(__file__).resolve().parents[1]
BANDS = 13  # a Sentinel-2 tile's band count
# data.arrays.MAX_ASPECT_RATIO and MAX_TIFF_PAGES, written out: the file also runs against code without them
MAX_ASPECT_RATIO, MAX_TIFF_PAGES = 100, 512

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------- builders
def strip_png(path: Path, length: int) -> Path:
    """A 1-pixel-high, ``length``-wide PNG: a few hundred bytes."""
    Image.new("RGB", (length, 1), (120, 60, 30)).save(path)
    return path


def many_page_tiff(path: Path, pages: int) -> Path:
    """A classic little-endian TIFF of ``pages`` 8-bit gray pages whose shapes vary (1..3 x 2), written
    byte by byte (tifffile takes seconds to write 20 000 pages; this takes milliseconds). Pages of
    varying shapes are what makes tifffile slow to parse them (41 s for 20 000)."""
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for i in range(pages):
        h, w = 1 + i % 3, 2
        data = len(out) + 2 + 9 * 12 + 4
        following = 0 if i == pages - 1 else data + h * w
        tags = [(256, 3, w), (257, 3, h), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, data), (277, 3, 1),
                (278, 3, h), (279, 4, h * w)]
        out += struct.pack("<H", len(tags))
        for tag, kind, value in tags:  # SHORT values are left-justified in the 4-byte field
            out += struct.pack("<HHII", tag, kind, 1, value) if kind == 4 else struct.pack("<HHIHH", tag, kind, 1, value, 0)
        out += struct.pack("<I", following) + bytes(h * w)
    path.write_bytes(bytes(out))
    return path


def band_bomb(path: Path, side: int = 4000) -> Path:
    """A zlib-compressed 13-band uint16 TIFF of ``side x side`` zeros: ~1.9 MB on disk for 4000,
    416 MB decoded (and twice that as float32)."""
    tifffile.imwrite(path, np.zeros((side, side, BANDS), np.uint16), photometric="minisblack",
                     planarconfig="contig", compression="zlib", compressionargs={"level": 1}, metadata=None)
    return path


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny classifiers trained for one epoch and their ONNX exports: ``pictures`` (RGB) and
    ``bands`` (13-band .npy tiles), each as a run and as an export (``*_onnx``)."""
    from dinotune.export import export

    root = tmp_path_factory.mktemp("hostile-images")
    make_class_folders(root / "pictures" / "train", ["red", "blue"], 4, size=28, seed=1)
    make_class_folders(root / "pictures" / "val", ["red", "blue"], 2, size=28, seed=2)
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for c, name in enumerate(("crop", "water")):
            folder = root / "bands" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                tile = rng.integers(800, 1200, (16, 16, BANDS)).astype(np.uint16)
                tile[..., 3 + c] += 2000
                np.save(folder / f"{name}_{i}.npy", tile)
    out: dict[str, Path] = {}
    for kind in ("pictures", "bands"):
        run = dinotune.train(task="classify", data=str(root / kind), **tiny_options(root / f"{kind}-run", epochs=1))
        out[kind] = Path(run["run_dir"])
        # the legacy exporter: the same graph for this head, in a second instead of ten
        out[f"{kind}_onnx"] = export(out[kind], root / f"{kind}-onnx", format="onnx", exporter="legacy")
    return out


# A child that serves an export (no torch, as a deployment does) and posts FILES, each COPIES times
# from as many threads at once; prints the answers' statuses and details as JSON.
_SERVE = r"""
import json, sys, threading
sys.modules["torch"] = None
from fastapi.testclient import TestClient
from dinotune.serve import create_app, open_predictor
model, copies, *files = sys.argv[1:]
app = create_app(open_predictor(model, device="cpu"), max_upload_mb=50)
answers = []
def post(path):
    with TestClient(app) as client:
        with open(path, "rb") as f:
            r = client.post("/predict", files={"file": (path.rsplit("/", 1)[-1], f.read())})
        answers.append([r.status_code, r.json().get("detail", "")])
threads = [threading.Thread(target=post, args=(f,)) for f in files * int(copies)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(answers))
"""


def _serve_capped(model: Path, files: list[Path], cap_mb: int, copies: int = 1, timeout: float = 120
                  ) -> list[list[Any]]:
    """``[[status, detail], ...]`` of posting ``files`` to an exported model's server in a child
    process whose data segment is capped at ``cap_mb`` MB (``RLIMIT_DATA``, as ``run_capped``; no
    torch is imported, so the cap is absolute). A child that died is a failed assertion."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (cap_mb * 1024 * 1024, cap_mb * 1024 * 1024))

    done = subprocess.run([sys.executable, "-c", _SERVE, str(model), str(copies), *map(str, files)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=cap,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("dinotune: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


# ------------------------------------------------------------------ holes: resizing a long strip
def test_a_long_strip_is_refused_from_its_header_by_the_onnx_cli(models, tmp_path):
    """1 x 100000 pixels (370 bytes): today's runtime resized it to 32 x 3,200,000 pixels (2.5 GB of
    int64 sums at a 28 px model; 9 GiB at 224)."""
    strip = strip_png(tmp_path / "strip.png", 100_000)
    code, err = run_capped(["predict", str(models["pictures_onnx"]), str(strip)], cap_mb=200, timeout=120)
    line = _error_line(err)
    assert code == 2 and "strip.png" in line and "aspect ratio of 1:100000" in line
    assert f"at most 1:{MAX_ASPECT_RATIO}" in line


def test_a_long_strip_is_refused_from_its_header_by_the_torch_cli(models, tmp_path, capsys):
    strip = strip_png(tmp_path / "strip.png", 20_000)
    code, err = main_capped(["predict", str(models["pictures"]), str(strip), "--device", "cpu"], capsys, cap_mb=300)
    line = _error_line(err)
    assert code == 2 and "strip.png" in line and "aspect ratio of 1:20000" in line


def test_a_long_strip_upload_is_refused_by_the_server(models, tmp_path):
    """The 157-byte 1 x 20000 PNG took an exported model's server to 6.3 GB; now a 422 from its
    header, the server within a 700 MB cap."""
    strip = strip_png(tmp_path / "strip.png", 20_000)
    (status, detail), = _serve_capped(models["pictures_onnx"], [strip], cap_mb=700)
    assert status == 422 and detail.startswith("strip.png: ") and "aspect ratio of 1:20000" in detail


def test_what_a_resize_makes_is_bounded_by_the_pixel_limit_in_both_paths():
    """Within the aspect limit, a resize to the model's short side can still outgrow the pixel
    limit (a large model size): refused before anything of that size is allocated, in the numpy
    steps of classification and segmentation and in the torch transform alike."""
    strip = np.zeros((10, 1000, 3), np.uint8)  # 1:100, the longest strip that is read
    spec = InputSpec()
    with pytest.raises(DataError, match=r"strip\.png: a 1000x10 image resized to the short side 256 is "
                                        r"25600x256 = 6,553,600 pixels, over the limit of 1,000,000"):
        classify_input(strip, 224, spec, "strip.png", max_pixels=1_000_000)
    assert classify_input(strip, 28, spec, "strip.png", max_pixels=1_000_000).shape == (3, 28, 28)
    info = ExportInfo(task="segment", class_names=["a", "b"], image_size=28, patch_size=14, inputs=["images"],
                      outputs=["logits"], max_image_pixels=50_000)
    runtime = SegmentRuntime(info, lambda **_: pytest.fail("the graph must not run"))
    with pytest.raises(DataError, match=r"strip\.png: a 1000x10 image resized to the short side 28 and padded to "
                                        r"multiples of 14 is 2800x28 = 78,400 pixels, over the limit of 50,000"):
        runtime.label_map(strip, 1, "strip.png")
    transform = classify_eval_transform(224, max_pixels=1_000_000)
    with pytest.raises(DataError, match=r"resized to the short side 256 is 25600x256"):
        transform(Image.new("RGB", (1000, 10)))
    assert classify_eval_transform(224, max_pixels=0)(Image.new("RGB", (1000, 10))).shape == (3, 224, 224)


def test_the_aspect_limit_reads_1_to_100_refuses_more_and_is_lifted_with_the_pixel_limit(tmp_path):
    ok, over = strip_png(tmp_path / "ok.png", MAX_ASPECT_RATIO), strip_png(tmp_path / "over.png", MAX_ASPECT_RATIO + 1)
    assert check_image(ok) is None and load_image(ok).size == (100, 1)
    assert "an aspect ratio of 1:101; at most 1:100 is read" in check_image(over)
    with pytest.raises(ImageReadError, match=r"over\.png: image is 101x1 pixels, an aspect ratio of 1:101"):
        load_image(over)
    assert load_image(over, max_pixels=0).size == (101, 1)  # 0 = no limit: every guard of the knob lifted
    np.save(tmp_path / "tall.npy", np.zeros((505, 5, 3), np.float32))
    assert "array is 5x505 pixels, an aspect ratio of 1:101" in check_band_file(tmp_path / "tall.npy", "fast", 10**6)


# ------------------------------------------------------------- hole: uploads decoded in parallel
class _Echo:
    """A picture classifier that answers at once (any object with ``task``, ``class_names`` and
    ``predict_array`` can be served)."""

    task = "classify"
    class_names = ["a", "b"]

    def predict_array(self, array: np.ndarray, name: str) -> dict[str, Any]:
        return {"image": name, "shape": list(array.shape)}


def test_uploads_are_decoded_one_at_a_time_inside_the_inference_lock(monkeypatch):
    """Four parallel 9000 x 9000 PNG uploads were decoded side by side (4.9 GB); the lock covered
    the inference only. Every decode now runs inside the lock: never two at once."""
    from fastapi.testclient import TestClient

    import dinotune.serve.app as app_module

    real = app_module.decoded_upload
    active, most, guard = [0], [0], threading.Lock()

    @contextmanager
    def counted(*args: Any, **kwargs: Any) -> Iterator[Any]:
        with guard:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.05)  # a slow decode: requests decoded side by side meet here
            with real(*args, **kwargs) as upload:
                yield upload
        finally:
            with guard:
                active[0] -= 1

    monkeypatch.setattr(app_module, "decoded_upload", counted)
    app = app_module.create_app(_Echo())
    png = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(png, "PNG")
    codes: list[int] = []

    def post() -> None:
        with TestClient(app) as client:
            codes.append(client.post("/predict", files={"file": ("p.png", png.getvalue())}).status_code)

    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 4 and most[0] == 1


# -------------------------------------------------------------- hole: band arrays' decoded bytes
def test_a_band_array_is_refused_for_its_decoded_bytes_before_decoding(models, tmp_path):
    """A 1.9 MB TIFF of 13 x 4000 x 4000 uint16 zeros (16 M pixels, under the pixel limit) decoded
    to 416 MB, then float32 copies: 2.5-4.1 GB in predict and serve. Refused from the header, with
    both numbers, by the CLI and the server."""
    bomb = band_bomb(tmp_path / "tile.tif")
    code, err = run_capped(["predict", str(models["bands_onnx"]), str(bomb)], cap_mb=200, timeout=120)
    line = _error_line(err)
    assert code == 2 and "tile.tif" in line
    assert "13 band(s) x 4000x4000 pixels x 2 byte(s) (uint16) = 416,000,000 bytes decoded" in line
    assert "over the limit of 268,435,455 bytes" in line
    (status, detail), = _serve_capped(models["bands_onnx"], [bomb], cap_mb=700)
    assert status == 422 and detail.startswith("tile.tif: 13 band(s) x 4000x4000 pixels")
    # a .npy header is enough: a file that claims 13 x 4000 x 4000 float32 is refused without a read
    claim = tmp_path / "claim.npy"
    with open(claim, "wb") as f:  # the header alone (magic included): no value follows it
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (4000, 4000, 13)})
    with pytest.raises(ImageReadError, match=r"claim\.npy: 13 band\(s\) x 4000x4000 pixels x 4 byte\(s\) "
                                             r"\(float32\) = 832,000,000 bytes decoded"):
        read_bands(claim, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)


# ------------------------------------------------------------------------- TIFF pages, values
def test_a_tiff_of_20000_pages_is_refused_from_its_page_chain(models, tmp_path):
    """tifffile parsed every page of it first (41 s per look, several looks per file: minutes of the
    server's CPU); the chain of page offsets is counted first, and stops at the limit."""
    pages = many_page_tiff(tmp_path / "pages.tif", 20_000)
    start = time.perf_counter()
    with pytest.raises(ImageReadError, match=rf"pages\.tif: a TIFF of more than {MAX_TIFF_PAGES} pages"):
        band_header(pages)
    assert time.perf_counter() - start < 2
    code, err = run_capped(["predict", str(models["bands_onnx"]), str(pages)], cap_mb=200, timeout=30)
    assert code == 2 and f"a TIFF of more than {MAX_TIFF_PAGES} pages" in _error_line(err)
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((40, 6, 6), np.uint8))  # one band a page, within the limit
    assert band_header(tmp_path / "stack.tif").bands == 40


@pytest.mark.parametrize("target", ["bands_onnx", "bands"])
def test_values_beyond_float32_and_record_arrays_are_refused_by_name(models, tmp_path, capsys, target):
    """1e300 float64 values gave ``"score": NaN`` (float32 made them inf); a record dtype gave a
    traceback. Both are one line naming the file, from either backend."""
    huge = tmp_path / "huge.npy"
    np.save(huge, np.full((16, 16, BANDS), 1e300))
    record = tmp_path / "record.npy"
    np.save(record, np.zeros((16, 16), dtype=[("a", "<f4"), ("b", "<f4")]))
    for path, needle in ((huge, "beyond float32's range"), (record, "a structured (record) array")):
        capsys.readouterr()
        code = main(["predict", str(models[target]), str(path), "--device", "cpu"])
        out, err = capsys.readouterr()
        line = _error_line(err)
        assert code == 2 and "NaN" not in out and path.name in line and needle in line, (out, err)


def test_the_server_answers_422_for_record_and_out_of_range_arrays(models):
    from fastapi.testclient import TestClient

    from dinotune.serve import create_app, open_predictor

    client = TestClient(create_app(open_predictor(models["bands_onnx"], device="cpu")))
    cases = [(np.zeros((16, 16), dtype=[("a", "<f4"), ("b", "<f4")]), "a structured (record) array"),
             (np.full((16, 16, BANDS), 1e300), "beyond float32's range")]
    for array, needle in cases:
        answer = client.post("/predict", files={"file": ("x.npy", _npy_bytes(array))})
        assert answer.status_code == 422 and answer.json()["detail"].startswith("x.npy: "), answer.text
        assert needle in answer.json()["detail"]
    good = np.full((16, 16, BANDS), 1000, np.uint16)
    assert client.post("/predict", files={"file": ("ok.npy", _npy_bytes(good))}).status_code == 200
