"""Round two, decoded images and uploads: a 1 x N PNG that the resize to the model's short side blew
up (CLI, both backends, and the server), uploads decoded side by side outside the server's lock, a
band array whose decoded bytes the pixel limit did not count, a TIFF of 20 000 pages, and .npy files
of values beyond float32 or of a record dtype.

The holes run in child processes under a memory cap (``run_capped``; the server through
``_serve_capped``), so an open hole is a lost case, not a lost machine.
"""

from __future__ import annotations

import atexit
import json
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hostile.common import FAST, ROOT, case, classify_data, refused, run, run_capped

BANDS = 13  # a Sentinel-2 tile's band count
_BUILT: dict[str, Path] = {}


def _model(kind: str) -> tuple[Path, Path]:
    """``(run, export)`` of a tiny classifier of ``kind`` (``pictures`` or 13-band ``bands``),
    trained for one epoch and exported to ONNX once per replay."""
    if kind not in _BUILT:
        root = Path(tempfile.mkdtemp(prefix=f"hostile-images-{kind}-"))
        atexit.register(shutil.rmtree, root, True)
        if kind == "pictures":
            data = classify_data(root)
        else:
            data = root / "bands"
            rng = np.random.default_rng(0)
            for split, n in (("train", 4), ("val", 2)):
                for c, name in enumerate(("crop", "water")):
                    (data / split / name).mkdir(parents=True)
                    for i in range(n):
                        tile = rng.integers(800, 1200, (16, 16, BANDS)).astype(np.uint16)
                        tile[..., 3 + c] += 2000
                        np.save(data / split / name / f"{name}_{i}.npy", tile)
        code, err = run(["train", "classify", "--data", str(data), "--out", str(root / "run"), *FAST])
        assert code == 0, err
        code, err = run(["export", str(root / "run"), "--format", "onnx", "--exporter", "legacy",
                         "--out", str(root / "export")])
        assert code == 0, err
        _BUILT[kind] = root
    return _BUILT[kind] / "run", _BUILT[kind] / "export"


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


def _serve_capped(model: Path, files: list[Path], cap_mb: int, copies: int = 1,
                  timeout: float = 120) -> list[list[Any]] | str:
    """The ``[status, detail]`` answers to posting ``files`` to ``model``'s server in a child whose
    data segment is capped at ``cap_mb`` MB (no torch: the cap is absolute), or why there are none."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (cap_mb * 1024 * 1024, cap_mb * 1024 * 1024))

    try:
        done = subprocess.run([sys.executable, "-c", _SERVE, str(model), str(copies), *map(str, files)], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout, preexec_fn=cap,
                              env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        return f"the server took over {timeout:g} s"
    if done.returncode != 0:
        return f"the server died (exit {done.returncode}): {done.stderr.strip()[-200:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _answered(answers: list[list[Any]] | str, status: int, name: str, *needles: str) -> tuple[bool, str]:
    """One answer ``status`` whose detail starts with ``name: `` and holds every needle."""
    if isinstance(answers, str):
        return False, answers
    (got, detail), = answers
    ok = got == status and detail.startswith(f"{name}: ") and all(n in detail for n in needles)
    return ok, f"{got} {detail}"[:300]


def _strip(tmp: Path, length: int) -> Path:
    path = tmp / "strip.png"
    Image.new("RGB", (length, 1), (120, 60, 30)).save(path)  # a few hundred bytes
    return path


def _band_bomb(tmp: Path) -> Path:
    import tifffile

    path = tmp / "tile.tif"  # ~1.9 MB of zlib for 416 MB of uint16 values
    tifffile.imwrite(path, np.zeros((4000, 4000, BANDS), np.uint16), photometric="minisblack", planarconfig="contig",
                     compression="zlib", compressionargs={"level": 1}, metadata=None)
    return path


def _many_pages(tmp: Path, pages: int = 20_000) -> Path:
    """A TIFF of ``pages`` tiny gray pages of varying shapes, written byte by byte in milliseconds."""
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for i in range(pages):
        h, w = 1 + i % 3, 2
        data = len(out) + 2 + 9 * 12 + 4
        tags = [(256, 3, w), (257, 3, h), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, data), (277, 3, 1),
                (278, 3, h), (279, 4, h * w)]
        out += struct.pack("<H", len(tags))
        for tag, kind, value in tags:
            out += struct.pack("<HHII", tag, kind, 1, value) if kind == 4 else struct.pack("<HHIHH", tag, kind, 1, value, 0)
        out += struct.pack("<I", 0 if i == pages - 1 else data + h * w) + bytes(h * w)
    path = tmp / "pages.tif"
    path.write_bytes(bytes(out))
    return path


# ------------------------------------------------------------------------- R2-H2a: a long strip
@case("R2-H2a", "1 x 20000 PNG (157 bytes) uploaded to an exported model's server (700 MB cap)", hole=True)
def _(tmp: Path):
    return _answered(_serve_capped(_model("pictures")[1], [_strip(tmp, 20_000)], cap_mb=700), 422, "strip.png",
                     "aspect ratio of 1:20000")


@case("R2-H2a", "1 x 100000 PNG, dinotune predict EXPORT (numpy runtime, capped)", hole=True)
def _(tmp: Path):
    code, err = run_capped(["predict", str(_model("pictures")[1]), str(_strip(tmp, 100_000))], cap_mb=200)
    return refused(code, err, "strip.png", "aspect ratio of 1:100000")


@case("R2-H2a", "1 x 20000 PNG, dinotune predict RUN (PyTorch, capped)", hole=True)
def _(tmp: Path):
    code, err = run_capped(["predict", str(_model("pictures")[0]), str(_strip(tmp, 20_000)), "--device", "cpu"],
                           cap_mb=300)
    return refused(code, err, "strip.png", "aspect ratio of 1:20000")


# ------------------------------------------------------------- R2-H2b: uploads decoded in parallel
@case("R2-H2b", "four parallel 6000 x 6000 PNG uploads: served one image at a time (1000 MB cap)", hole=True)
def _(tmp: Path):
    big = tmp / "big.png"
    Image.new("RGB", (6000, 6000), (10, 20, 30)).save(big, compress_level=1)  # 108 MB decoded
    answers = _serve_capped(_model("pictures")[1], [big], cap_mb=1000, copies=4, timeout=300)
    if isinstance(answers, str):
        return False, answers
    ok = [a[0] for a in answers] == [200] * 4
    return ok, "4 x 200" if ok else "; ".join(f"{s} {d[:80]}" for s, d in answers)


# ------------------------------------------------------------------- R2-H3: decoded bytes of bands
@case("R2-H3", "1.9 MB zlib TIFF of 13 x 4000 x 4000 uint16, dinotune predict EXPORT (capped)", hole=True)
def _(tmp: Path):
    code, err = run_capped(["predict", str(_model("bands")[1]), str(_band_bomb(tmp))], cap_mb=200)
    return refused(code, err, "tile.tif", "416,000,000 bytes decoded", "268,435,455")


@case("R2-H3", "the same TIFF, dinotune predict RUN (PyTorch, capped)", hole=True)
def _(tmp: Path):
    code, err = run_capped(["predict", str(_model("bands")[0]), str(_band_bomb(tmp)), "--device", "cpu"], cap_mb=300)
    return refused(code, err, "tile.tif", "416,000,000 bytes decoded")


@case("R2-H3", "the same TIFF uploaded to the server (700 MB cap)", hole=True)
def _(tmp: Path):
    return _answered(_serve_capped(_model("bands")[1], [_band_bomb(tmp)], cap_mb=700), 422, "tile.tif",
                     "416,000,000 bytes decoded")


# ----------------------------------------------------------------------- R2-img: pages and values
@case("R2-img-1", "TIFF of 20 000 pages of varying shapes, dinotune predict EXPORT (60 s)")
def _(tmp: Path):
    code, err = run_capped(["predict", str(_model("bands")[1]), str(_many_pages(tmp))], cap_mb=200, timeout=60)
    return refused(code, err, "pages.tif", "more than 512 pages")


@case("R2-img-1", "the same TIFF uploaded to the server (60 s)")
def _(tmp: Path):
    return _answered(_serve_capped(_model("bands")[1], [_many_pages(tmp)], cap_mb=700, timeout=60), 422,
                     "pages.tif", "more than 512 pages")


@case("R2-img-2", ".npy of 1e300 float64, dinotune predict EXPORT (was \"score\": NaN)")
def _(tmp: Path):
    path = tmp / "huge.npy"
    np.save(path, np.full((16, 16, BANDS), 1e300))
    code, err = run(["predict", str(_model("bands")[1]), str(path)])
    return refused(code, err, "huge.npy", "beyond float32's range")


@case("R2-img-2", ".npy of 1e300 float64, dinotune predict RUN (PyTorch)")
def _(tmp: Path):
    path = tmp / "huge.npy"
    np.save(path, np.full((16, 16, BANDS), 1e300))
    code, err = run(["predict", str(_model("bands")[0]), str(path), "--device", "cpu"])
    return refused(code, err, "huge.npy", "beyond float32's range")


@case("R2-img-3", ".npy of a record dtype, dinotune predict EXPORT (was a traceback)")
def _(tmp: Path):
    path = tmp / "record.npy"
    np.save(path, np.zeros((16, 16), dtype=[("a", "<f4"), ("b", "<f4")]))
    code, err = run(["predict", str(_model("bands")[1]), str(path)])
    return refused(code, err, "record.npy", "structured (record) array")


@case("R2-img-3", ".npy of a record dtype uploaded to the server (was a 500)")
def _(tmp: Path):
    path = tmp / "record.npy"
    np.save(path, np.zeros((16, 16), dtype=[("a", "<f4"), ("b", "<f4")]))
    return _answered(_serve_capped(_model("bands")[1], [path], cap_mb=700), 422, "record.npy",
                     "structured (record) array")
