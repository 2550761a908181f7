"""Round two, exports and what the runtime reads beside them: tampered ``dinotune_export.json``
files, another export's graph swapped in, ``predict --image-info`` files of any shape, a non-ASCII
numeric file name, and the server's health showing paths."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from hostile.common import FAST, case, classify_data, refused, run
from tests.conftest import make_coco_dataset

_BUILT: dict[str, Path] = {}


def _export(task: str) -> Path:
    """A tiny trained run of ``task`` exported to ONNX (legacy exporter), built once per replay."""
    if task not in _BUILT:
        root = Path(tempfile.mkdtemp(prefix=f"hostile-{task}-"))
        atexit.register(shutil.rmtree, root, True)
        if task == "classify":
            data, extra = classify_data(root), []
        else:
            data = make_coco_dataset(root / "coco", {"train": [1, 2], "val": [1]}, size=(70, 52))
            extra = ["--image-size", "56", "--num-queries", "4", "--decoder-layers", "1", "--hidden-dim", "16",
                     "--num-heads", "2", "--ffn-dim", "16", "--sampling-points", "1"]
        code, err = run(["train", task, "--data", str(data), "--out", str(root / "run"), *FAST, *extra])
        assert code == 0, err
        code, err = run(["export", str(root / "run"), "--format", "onnx", "--exporter", "legacy",
                         "--out", str(root / "export")])
        assert code == 0, err
        _BUILT[task] = root / "export"
    return _BUILT[task]


def _images(task: str) -> Path:
    return _export(task).parent / ("data" if task == "classify" else "coco") / "val"


def _tamper(tmp: Path, change: Callable[[dict[str, Any]], Any]) -> Path:
    folder = tmp / "export"
    shutil.copytree(_export("classify"), folder)
    meta = folder / "dinotune_export.json"
    data = json.loads(meta.read_text())
    changed = change(data)
    meta.write_text(changed if isinstance(changed, str) else json.dumps(data))
    return folder


def _setter(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return change


_TAMPERED = [
    ("task changed to detect", _setter("task", "detect"), "a graph or description of another task"),
    ("image_size 0", _setter("image_size", 0), "image_size is 0"),
    ("image_size -56", _setter("image_size", -56), "image_size is -56"),
    ("image_size \"56\"", _setter("image_size", "56"), "image_size is '56'"),
    ("image_size 10^6", _setter("image_size", 10**6), "image_size is 1000000"),
    ("mean of length 5", _setter("input.mean", [0.5] * 5), "input.mean"),
    ("input as a list", _setter("input", [3]), "input is [3]"),
    ("top_k \"abc\"", _setter("postprocess.top_k", "abc"), "inference.top_k must be int"),
    ("nested 200 000 deep", lambda d: json.dumps(d)[:-1] + ', "x": ' + "[" * 200_000 + "]" * 200_000 + "}",
     "nested too deep"),
    ("a class list shorter than the logits", _setter("class_names", ["red"]), "1 class names but the graph gives 2"),
    ("\"class_names\": \"ab\"", _setter("class_names", "ab"), "class_names is 'ab'"),
    ("std 0 (NaN scores)", _setter("input.std", [0.2, 0.0, 0.2]), "input.std"),
    ("max_image_pixels 0 (the bomb guard off)", _setter("max_image_pixels", 0), "max_image_pixels is 0"),
    ("model_file leaving the folder", _setter("model_file", "../../model.onnx"), "model_file is '../../model.onnx'"),
]

for _i, (_name, _change, _needle) in enumerate(_TAMPERED, 1):
    @case(f"R2-exp-{_i}", f"dinotune_export.json tampered: {_name}")
    def _(tmp: Path, _change=_change, _needle=_needle):
        folder = _tamper(tmp, _change)
        code, err = run(["predict", str(folder), str(_images("classify"))])
        return refused(code, err, "dinotune_export.json", _needle)


@case("R2-exp-15", "a detection export with a classifier's model.onnx swapped in")
def _(tmp: Path):
    folder = tmp / "export"
    shutil.copytree(_export("detect"), folder)
    shutil.copy(_export("classify") / "model.onnx", folder / "model.onnx")
    code, err = run(["predict", str(folder), str(_images("detect"))])
    return refused(code, err, "dinotune_export.json", "a graph of another export")


_INFO = [
    ("a list", '[{"file_name": "a.png", "id": 1}]', "not COCO image info"),
    ("an entry without file_name", '{"images": [{"id": 1}]}', "has no file_name"),
    ("not JSON", "images: a.png", "cannot be read as JSON"),
    ("\"id\": \"abc\"", '{"images": [{"file_name": "a.png", "id": "abc"}]}', "has id 'abc'"),
    ("ids of 1e400", '{"images": [{"file_name": "a.png", "id": 1e400}]}', "has id inf"),
    ("not UTF-8", b'{"images": [{"file_name": "\xff.png", "id": 1}]}', "cannot be read as JSON"),
]

for _i, (_name, _content, _needle) in enumerate(_INFO, 1):
    @case(f"R2-info-{_i}", f"predict --image-info: {_name}")
    def _(tmp: Path, _content=_content, _needle=_needle):
        info = tmp / "info.json"
        info.write_bytes(_content.encode() if isinstance(_content, str) else _content)
        code, err = run(["predict", str(_export("detect")), str(_images("detect")), "--image-info", str(info)])
        return refused(code, err, str(info), _needle)


@case("R2-info-7", "detection predict of an image named ²³.png")
def _(tmp: Path):
    from PIL import Image

    odd = tmp / "²³.png"
    Image.open(next(_images("detect").glob("*.png"))).save(odd)
    code, err = run(["predict", str(_export("detect")), str(odd), "--out", str(tmp / "out.json")])
    records = json.loads((tmp / "out.json").read_text()) if code == 0 else []
    ok = code == 0 and "Traceback" not in err and all(r["image_id"] == 1 for r in records)
    return ok, f"exit {code}, image ids {sorted({r['image_id'] for r in records})}" if code == 0 else err[-300:]


@case("R2-health", "/health shows the server's absolute run and model paths")
def _(tmp: Path):
    from fastapi.testclient import TestClient

    from dinotune.serve import create_app, open_predictor

    folder = _export("classify")
    runs = (folder, folder.parent / "run")
    shown = [TestClient(create_app(open_predictor(path, device="cpu"))).get("/health").text for path in runs]
    leaked = [str(p) for p in (folder, folder.parent) if any(str(p) in text for text in shown)]
    return not leaked, ("paths shown: " + ", ".join(leaked)) if leaked else "names only: " + shown[0][:200]
