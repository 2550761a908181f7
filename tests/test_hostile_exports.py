"""Exports, image-info files and the server's health under hostile input: a tampered
``dinotune_export.json`` (or another export's graph swapped in) is refused in one line naming the
file and the key, never run and never a silent wrong answer; ``predict --image-info`` files of any
shape are refused naming the entry; a non-ASCII numeric file name is no image id; ``/health``
shows names, not the server's paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from dinotune.cli import main
from dinotune.errors import ConfigError, DataError
from dinotune.tasks.detect.runtime import image_ids, read_image_info
from tests.export_runs import data_folder, exported

pytest.importorskip("onnxruntime", reason="the runtime extra (onnxruntime) is not installed")
pytest.importorskip("onnx", reason="the export extra (onnx) is not installed")
pytestmark = pytest.mark.usefixtures("one_thread")


def _tampered(source: Path, tmp_path: Path, change: Callable[[dict[str, Any]], Any]) -> Path:
    folder = tmp_path / "tampered"
    shutil.copytree(source, folder)
    meta = folder / "dinotune_export.json"
    data = json.loads(meta.read_text())
    changed = change(data)
    meta.write_text(changed if isinstance(changed, str) else json.dumps(data))
    return folder


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        node = data
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return change


CASES = [
    ("task", _set("task", "detect"), "this task's graph has images of rank 4, orig_sizes of rank 2"),
    ("image_size 0", _set("image_size", 0), "image_size is 0"),
    ("image_size -56", _set("image_size", -56), "image_size is -56"),
    ("image_size '56'", _set("image_size", "56"), "image_size is '56'"),
    ("image_size 10^6", _set("image_size", 10**6), "image_size is 1000000"),
    ("image_size other", _set("image_size", 70), "image_size is 70 but the graph's images are"),
    ("mean of length 5", _set("input.mean", [0.5] * 5), "input.mean is [0.5, 0.5, 0.5, 0.5, 0.5]"),
    ("input as a list", _set("input", [3, [0, 1, 2]]), "input is [3, [0, 1, 2]]; an object is expected"),
    ("top_k 'abc'", _set("postprocess.top_k", "abc"), "inference.top_k must be int, got 'abc'"),
    ("nested 200000 deep", lambda d: json.dumps(d)[:-1] + ', "deep": ' + "[" * 200_000 + "]" * 200_000 + "}",
     "nested too deep"),
    ("a class list shorter than the logits", _set("class_names", ["red"]), "1 class names but the graph gives 2"),
    ("class names as a string", _set("class_names", "ab"), "class_names is 'ab'; a list of names"),
    ("std 0", _set("input.std", [0.2, 0.0, 0.2]), "input.std is [0.2, 0.0, 0.2]"),
    ("max_image_pixels 0", _set("max_image_pixels", 0), "max_image_pixels is 0"),
    ("model_file leaving the folder", _set("model_file", "../model.onnx"), "model_file is '../model.onnx'"),
    ("a list, not an object", lambda d: "[1, 2, 3]", "a JSON object is expected"),
]


@pytest.mark.parametrize("name, change, message", CASES, ids=[c[0] for c in CASES])
def test_a_tampered_export_description_is_refused_naming_the_key(name, change, message, tmp_path_factory, tmp_path,
                                                                 capsys):
    from dinotune.runtime import load_predictor

    folder = _tampered(exported("classify", tmp_path_factory), tmp_path, change)
    with pytest.raises(ConfigError) as e:
        load_predictor(folder)
    assert message in str(e.value) and "dinotune_export.json" in str(e.value), str(e.value)
    images = data_folder("classify", tmp_path_factory)
    assert main(["predict", str(folder), str(images)]) == 2  # the command line: one line, no traceback
    err = capsys.readouterr().err
    assert err.count("dinotune: error:") == 1 and "Traceback" not in err and message in err


def test_another_tasks_graph_swapped_in_is_refused(tmp_path_factory, tmp_path):
    """A segmentation graph (``images -> logits``, as a classifier's, but of rank 4) in a classifier's
    export folder, and a classifier's graph in a detector's."""
    from dinotune.runtime import load_predictor

    for mine, theirs, message in (("classify", "segment", "logits of rank 2"),
                                  ("detect", "classify", "the graph takes images and gives logits")):
        folder = tmp_path / f"{mine}-with-{theirs}"
        shutil.copytree(exported(mine, tmp_path_factory), folder)
        shutil.copy(exported(theirs, tmp_path_factory) / "model.onnx", folder / "model.onnx")
        with pytest.raises(ConfigError, match=message):
            load_predictor(folder)


def test_an_untampered_export_still_loads_and_predicts(tmp_path_factory):
    from dinotune.runtime import load_predictor

    for kind in ("classify", "detect", "segment"):
        predictor = load_predictor(exported(kind, tmp_path_factory))
        assert predictor.predict(data_folder(kind, tmp_path_factory))


@pytest.mark.parametrize("content, message", [
    ('[{"file_name": "a.jpg", "id": 1}]', "not COCO image info"),
    ('{"images": [{"id": 1}]}', "images[0] has no file_name"),
    ("this is not json", "cannot be read as JSON"),
    ('{"images": [{"file_name": "a.jpg", "id": "abc"}]}', "images[0] (a.jpg) has id 'abc'"),
    ('{"images": [{"file_name": "a.jpg", "id": 1e400}]}', "images[0] (a.jpg) has id inf"),
    ('{"images": [{"file_name": "a.jpg", "id": true}]}', "images[0] (a.jpg) has id True"),
    ('{"images": [{"file_name": "a.jpg", "id": 99999999999999999999999}]}', "a whole number from 0 to 2^63 - 1"),
    (b'{"images": [{"file_name": "\xff\xfe.jpg", "id": 1}]}', "cannot be read as JSON"),
])
def test_image_info_of_any_shape_is_refused_naming_the_entry(content, message, tmp_path):
    path = tmp_path / "info.json"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(DataError) as e:
        read_image_info(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_a_non_ascii_numeric_file_name_is_no_image_id(tmp_path):
    """``'²³'.isdigit()`` is true but ``int('²³')`` fails: such names get 1..N, as names that are not ids."""
    paths = [tmp_path / "²³.jpg", tmp_path / "7.jpg"]
    assert image_ids(paths, None) == {str(paths[0]): 1, str(paths[1]): 2}
    assert image_ids([tmp_path / "12.jpg", tmp_path / "3.jpg"], None) == {str(tmp_path / "12.jpg"): 12,
                                                                         str(tmp_path / "3.jpg"): 3}
    long = tmp_path / ("9" * 5000 + ".jpg")  # int() of 5000 digits raises: no id either
    assert image_ids([long], None) == {str(long): 1}


def test_detection_predict_reads_a_non_ascii_numeric_file(tmp_path_factory, tmp_path, capsys):
    from PIL import Image

    image = next(data_folder("detect", tmp_path_factory).glob("*.png"))
    odd = tmp_path / "²³.png"
    Image.open(image).save(odd)
    assert main(["predict", str(exported("detect", tmp_path_factory)), str(odd), "--format", "coco"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert all(r["image_id"] == 1 and r["file_name"] == str(odd) for r in records)


def test_health_shows_names_not_the_servers_paths(tmp_path_factory):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient

    from dinotune.runs import load
    from dinotune.serve import RunPredictor, create_app, open_predictor

    folder = exported("classify", tmp_path_factory)
    run = Path(json.loads((folder / "dinotune_export.json").read_text())["source"]["run"])
    for predictor in (open_predictor(folder, device="cpu"), RunPredictor(load(run, device="cpu"))):
        text = TestClient(create_app(predictor)).get("/health").text
        assert str(folder) not in text and str(run) not in text and str(Path.home()) not in text, text
        assert "/tmp" not in text, text


def test_labels_beyond_the_classes_are_refused():
    from dinotune.tasks.detect.runtime import detection_record

    categories = [{"id": 1, "name": "a"}]
    with pytest.raises(DataError, match="class index 3 for 1 classes"):
        detection_record("x.jpg", 1, (10, 10), np.array([0.9]), np.array([3]), np.zeros((1, 4)), categories,
                         0.0, 10, "coco")
