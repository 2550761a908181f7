"""``dinotune.train`` returns the trained run as a handle: the summary by key, as before (a
read-only mapping of ``results.json``), and the model at once: ``evaluate`` / ``predict`` give what
``dinotune.load`` gives, ``export`` writes the run into another format."""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest

import dinotune
from tests.conftest import make_class_folders, tiny_options

pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_returns_a_run_handle(tmp_path):
    make_class_folders(tmp_path / "data" / "train", ["red", "blue"], 4, seed=1)
    make_class_folders(tmp_path / "data" / "val", ["red", "blue"], 2, seed=2)
    run = dinotune.train(task="classify", data=str(tmp_path / "data"), adapter="lora",
                         **tiny_options(tmp_path / "run"))
    assert isinstance(run, Mapping) and isinstance(run, dinotune.Run)
    summary = json.loads((run.path / "results.json").read_text())
    assert dict(run) == summary and run["run_dir"] == str(run.path) and run["task"] == "classify"

    loaded = dinotune.load(run.path, device="cpu")
    assert run.evaluate(str(tmp_path / "data"))["top1"] == loaded.evaluate(str(tmp_path / "data"))["top1"]
    images = sorted((tmp_path / "data" / "val").rglob("*.png"))
    assert run.predict(images, top_k=1) == loaded.predict(images, top_k=1)
    assert run.load() is run.load()  # loaded once, kept for the calls that follow

    pytest.importorskip("onnx", reason="the export extra is not installed")
    out = run.export(tmp_path / "exported", exporter="legacy")
    assert (out / "model.onnx").is_file() and json.loads((out / "dinotune_export.json").read_text())["task"] == "classify"
