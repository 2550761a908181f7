"""Tiny trained runs and their ONNX exports, made once per test session and shared by
``test_export_onnx.py`` and ``test_runtime.py`` (a plain memo: module-scoped fixtures in two files
would train everything twice).

Every run is ``random:tiny`` trained for one epoch on a few images the tests make, so nothing here
needs shared data; the tests feed them real images from ``$DINOTUNE_SHARED`` where they can.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import dinotune
from dinotune.export.onnx import onnx_for_run
from tests.conftest import make_class_folders, make_coco_dataset, make_segmentation_folders, tiny_options

_RUNS: dict[str, Path] = {}
_EXPORTS: dict[tuple[str, str], Path] = {}

DETR = dict(image_size=56, num_queries=6, decoder_layers=1, hidden_dim=16, num_heads=2, ffn_dim=16, sampling_points=1)
# each kind: task, data maker, training options
KINDS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "classify": ("classify", "classes", dict(adapter="lora", image_size=56)),
    "detect": ("detect", "coco", dict(adapter="lora", **DETR)),
    "single": ("detect", "coco", dict(adapter="dora", head="simple", image_size=56)),
    "segment": ("segment", "masks", dict(adapter="full", decoder="fpn", fpn_dim=16, image_size=56)),
    "dinov3": ("classify", "classes", dict(adapter="none", model="random:dinov3-tiny", image_size=32)),
    "bands": ("classify", "bands", dict(adapter="lora", image_size=28)),
}


def band_tile(label: int, seed: int, shape: tuple[int, int] = (36, 30), bands: int = 5) -> np.ndarray:
    """``H x W x C`` uint16 'reflectance', class ``label`` bright in band ``label + 3``."""
    rng = np.random.default_rng(seed)
    tile = rng.integers(800, 1200, (*shape, bands)).astype(np.uint16)
    tile[..., (label + 3) % bands] += 2000
    return tile


def _data(kind: str, root: Path) -> Path:
    if kind == "classes":
        make_class_folders(root / "train", ["red", "blue"], 4, size=64, seed=1)
        make_class_folders(root / "val", ["red", "blue"], 2, size=64, seed=2)
        return root
    if kind == "bands":
        for split, n in (("train", 4), ("val", 2)):
            for c, name in enumerate(("crop", "water")):
                (root / split / name).mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    np.save(root / split / name / f"{name}_{i}.npy", band_tile(c, 100 * c + 10 * len(split) + i))
        return root
    if kind == "coco":
        return make_coco_dataset(root, {"train": [1, 2, 1, 2], "val": [1, 2]}, size=(70, 52))
    return make_segmentation_folders(root, {"train": 4, "val": 2}, size=56)


def trained_run(kind: str, factory: pytest.TempPathFactory) -> Path:
    """The run folder of ``kind`` (one of ``KINDS``), trained on first use."""
    if kind not in _RUNS:
        task, data_kind, extra = KINDS[kind]
        root = factory.mktemp(f"run-{kind}")
        data = _data(data_kind, root / "data")
        opts = tiny_options(root / "run", epochs=1, batch_size=4, check_images="fast")
        opts.update(extra)
        _RUNS[kind] = Path(dinotune.train(task=task, data=str(data), **opts)["run_dir"])
    return _RUNS[kind]


def data_folder(kind: str, factory: pytest.TempPathFactory, split: str = "val") -> Path:
    """The images ``kind``'s run was validated on."""
    run = trained_run(kind, factory)
    data = run.parent / "data"
    return {"classes": data / split, "bands": data / split, "coco": data / split,
            "masks": data / split / "images"}[KINDS[kind][1]]


def exported(kind: str, factory: pytest.TempPathFactory, exporter: str = "legacy") -> Path:
    """The ONNX export of ``kind``'s run (the legacy exporter unless asked: several times faster
    to export on a CPU). The classification run's dynamo export is the one ``predict --backend
    onnx`` makes inside the run (``RUN/export/onnx-best``), so the CLI tests reuse it."""
    key = (kind, exporter)
    if key not in _EXPORTS:
        if kind == "classify" and exporter == "dynamo":
            _EXPORTS[key] = onnx_for_run(trained_run(kind, factory))
        else:
            out = factory.mktemp(f"onnx-{kind}-{exporter}") / "model"
            _EXPORTS[key] = dinotune.export(trained_run(kind, factory), out, format="onnx", exporter=exporter)
    return _EXPORTS[key]


def exported_into_run(kind: str, factory: pytest.TempPathFactory) -> Path:
    """``RUN/export/onnx-best`` of ``kind``'s run, as ``predict RUN --backend onnx`` makes it on first
    use (dynamo for the classification run, legacy for the others, to keep the tests quick)."""
    if kind == "classify":
        return exported(kind, factory, "dynamo")
    return onnx_for_run(trained_run(kind, factory), exporter="legacy")


def copy_run(run: Path, dest: Path, replace: tuple[str, str] | None = None) -> Path:
    """A copy of ``run`` with ``replace`` = (old, new) applied to every ``config.yaml`` in it (e.g.
    the segmentation inference mode), so an inference setting can change without training again."""
    shutil.copytree(run, dest)
    if replace:
        for cfg in dest.rglob("config.yaml"):
            text = cfg.read_text()
            assert replace[0] in text, f"{replace[0]!r} not in {cfg}"
            cfg.write_text(text.replace(*replace))
    return dest
