"""A fourth task, defined in this module alone and registered at run time, lives its whole life
through the generic layers: ``dinotune train`` -> ``eval`` -> ``export --format onnx`` ->
``predict`` with the ONNX backend -> the server's ``/predict`` and page view, with no library file
knowing it. The proof that a new task is one folder plus one registry entry.

The task, ``brightness``, regresses each picture's mean brightness (the target is computed from the
pixels, so any folder of pictures is data): a config, a ``Task`` (data, a linear head on the class
token, MSE, mean absolute error), its export graph and its ``RuntimeTask`` (numpy preprocessing from
``dinotune.runtime.preprocess``, records, files, the page's view).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dinotune.config.bands import BandsConfig
from dinotune.config.base import (
    AdapterConfig,
    BackboneConfig,
    OptimConfig,
    TrainConfig,
    max_image_pixels_option,
    opt,
    validate_common,
)
from dinotune.data.images import load_image, readable_images
from dinotune.data.input_spec import InputSpec
from dinotune.data.loader import make_loader
from dinotune.data.transforms import classify_eval_transform
from dinotune.engine.device import autocast, to_device
from dinotune.models.bundle import ModelBundle
from dinotune.models.graph import ExportGraph
from dinotune.models.wrapper import BackboneHead
from dinotune.runtime.preprocess import center_crop, normalize, resize, short_side_size
from dinotune.runtime.task import Prediction, RuntimeTask
from dinotune.tasks import registry
from dinotune.tasks.base import Task, TaskData
from tests.conftest import make_image

NAME = "brightness"


# ------------------------------------------------------------------------------------- config
@dataclass
class BrightnessDataConfig:
    data: str = opt("", "a folder with train/ and val/ folders of pictures (any layout below them)")
    max_image_pixels: int = max_image_pixels_option()


@dataclass
class BrightnessInferenceConfig:
    batch_size: int = opt(4, "images per batch when evaluating or predicting", flag="--eval-batch-size", ge=1)


@dataclass
class BrightnessConfig:
    task: Literal["brightness"] = "brightness"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: BrightnessDataConfig = field(default_factory=BrightnessDataConfig)
    bands: BandsConfig = field(default_factory=BandsConfig)
    inference: BrightnessInferenceConfig = field(default_factory=BrightnessInferenceConfig)

    def validate(self) -> None:
        validate_common(self)


# ------------------------------------------------------------------------------- torch half
def brightness(path: Path) -> float:
    """The target: the mean of a picture's RGB values, in [0, 1]."""
    return float(np.asarray(load_image(path), dtype=np.float32).mean() / 255)


class BrightnessImages(Dataset):
    def __init__(self, paths: Sequence[Path], size: int):
        self.paths = list(paths)
        self.transform = classify_eval_transform(size, InputSpec())

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.paths[i]
        return {"image": self.transform(load_image(path)), "target": torch.tensor(brightness(path)), "index": i}


class BrightnessModel(BackboneHead):
    """``B x 3 x S x S`` -> ``B`` brightness from the class token."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.to_head(self.backbone_features(images).cls))[:, 0]


class BrightnessGraph(ExportGraph):
    output_names = ("brightness",)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.to(self.dtype)).float()


class BrightnessTask(Task):
    name = NAME
    monitor_mode = "min"

    @property
    def monitor(self) -> str:
        return "mae"

    def _paths(self, data: str, split: str) -> list[Path]:
        return readable_images(Path(data) / split, "fast")

    def build_data(self, run_dir: Path | None, patch_size: int) -> TaskData:
        size, d = self.cfg.backbone.image_size, self.cfg.data
        meta = {"task": self.name, "class_names": ["brightness"], "num_classes": 1, "input": InputSpec().to_meta()}
        return TaskData(BrightnessImages(self._paths(d.data, "train"), size),
                        BrightnessImages(self._paths(d.data, "val"), size), meta)

    def build_model(self, meta: dict[str, Any], backbone: Any) -> ModelBundle:
        return ModelBundle(BrightnessModel(backbone, nn.Linear(backbone.embed_dim, 1)), nn.MSELoss(), None,
                           list(meta["class_names"]))

    def loaders(self, data: TaskData) -> tuple[DataLoader, DataLoader | None]:
        t = self.cfg.train
        return (make_loader(data.train, t.batch_size, shuffle=True, workers=t.workers, seed=t.seed),
                make_loader(data.val, t.batch_size, shuffle=False, workers=t.workers))

    def training_step(self, bundle: ModelBundle, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"loss": bundle.criterion(model(batch["image"]).float(), batch["target"])}

    def evaluation_pass(self, bundle: ModelBundle, loader: DataLoader, device: torch.device, precision: str,
                        show_progress: bool) -> dict[str, torch.Tensor]:
        preds, targets = [], []
        for batch in loader:
            batch = to_device(batch, device)
            with autocast(device, precision):
                preds.append(bundle.model(batch["image"]).float().cpu())
            targets.append(batch["target"].cpu())
        return {"pred": torch.cat(preds), "target": torch.cat(targets)}

    def compute_metrics(self, bundle: ModelBundle, parts: Sequence[dict[str, torch.Tensor]],
                        dataset: Dataset) -> dict[str, Any]:
        pred = torch.cat([p["pred"] for p in parts])
        target = torch.cat([p["target"] for p in parts])
        return {"loss": float(bundle.criterion(pred, target)), "mae": float((pred - target).abs().mean()),
                "images": int(target.numel())}

    def predict(self, run: Any, images: Any, settings: Any) -> list[dict[str, Any]]:
        paths = readable_images(images, "fast")
        loader = make_loader(BrightnessImages(paths, run.cfg.backbone.image_size), settings.batch_size,
                             shuffle=False, workers=0)
        out = []
        with torch.no_grad():
            for batch in loader:
                values = run.bundle.model(batch["image"].to(run.device)).float().cpu().numpy()
                out += [record(str(paths[i]), v) for i, v in zip(batch["index"].tolist(), values)]
        return out

    def evaluate_data(self, run: Any, data: str, split: str, settings: Any, **options: Any) -> dict[str, Any]:
        loader = make_loader(BrightnessImages(self._paths(data, split), run.cfg.backbone.image_size),
                             settings.batch_size, shuffle=False, workers=0)
        return self.evaluate(run.bundle, loader, run.device, run.precision)

    def export_graph(self, run: Any, model: nn.Module, image_size: int) -> ExportGraph:
        return BrightnessGraph(model, {"batch_size": run.cfg.inference.batch_size})


# --------------------------------------------------------------------------------- numpy half
def record(image: str, value: float) -> dict[str, Any]:
    return {"image": image, "brightness": round(float(value), 5)}


class BrightnessRuntime(RuntimeTask):
    name = NAME
    graph_outputs = {"brightness": 1}  # the graph's outputs by name and rank (checked against the file)

    def predict_arrays(self, names: list[str], arrays: list[np.ndarray], settings: dict[str, Any]) -> list[Prediction]:
        size = self.info.image_size
        inputs = []
        for a in arrays:  # classify_eval_transform, step by step
            h, w = short_side_size(a.shape[0], a.shape[1], int(round(size * 256 / 224)))
            inputs.append(normalize(center_crop(resize(a, h, w), size), self.spec))
        values = self.graph(images=np.stack(inputs))["brightness"]
        return [(record(n, v), {}) for n, v in zip(names, values)]

    @classmethod
    def csv_rows(cls, results: list[dict[str, Any]]) -> list[list[Any]]:
        return [["image", "brightness"]] + [[r["image"], r["brightness"]] for r in results]

    @classmethod
    def view(cls, record: dict[str, Any], extras: dict[str, Any]) -> dict[str, Any]:
        return {"bars": [{"name": "brightness", "score": record["brightness"]}],
                "summary": f"brightness {record['brightness']:.2f}"}


# ---------------------------------------------------------------------------------- the test
@pytest.fixture
def brightness_task():
    registry.register(registry.TaskEntry(NAME, "Regress the mean brightness of pictures", config=BrightnessConfig,
                                         task=BrightnessTask, runtime=BrightnessRuntime))
    yield
    registry.unregister(NAME)


def _pictures(root: Path) -> Path:
    for split, n in (("train", 8), ("val", 4)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            grey = 30 + 25 * i
            make_image((grey, grey, grey), 32, seed=i).save(root / split / f"{split}{i}.png")
    return root


def test_a_task_defined_outside_the_library_lives_its_whole_life(brightness_task, tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="the runtime extra (onnxruntime) is not installed")
    pytest.importorskip("onnx", reason="the export extra (onnx) is not installed")
    from dinotune.cli import main

    data, run = _pictures(tmp_path / "data"), tmp_path / "run"
    assert main(["train", NAME, "--data", str(data), "--model", "random:tiny", "--image-size", "28",
                 "--epochs", "2", "--batch-size", "4", "--workers", "0", "--no-progress", "--device", "cpu",
                 "--adapter", "full", "--out", str(run)]) == 0
    summary = json.loads((run / "results.json").read_text())
    assert summary["task"] == NAME and "val/mae" in summary["best"]

    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(data), "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 4 and metrics["mae"] == pytest.approx(summary["metrics"]["mae"], abs=1e-6)

    exported = tmp_path / "exported"
    assert main(["export", str(run), "--format", "onnx", "--exporter", "legacy", "--out", str(exported)]) == 0
    assert json.loads((exported / "dinotune_export.json").read_text())["task"] == NAME

    images = sorted((data / "val").glob("*.png"))
    assert main(["predict", str(run), *map(str, images), "--device", "cpu", "--out", str(tmp_path / "torch.json")]) == 0
    assert main(["predict", str(exported), *map(str, images), "--out", str(tmp_path / "onnx.csv")]) == 0
    torch_records = json.loads((tmp_path / "torch.json").read_text())
    onnx_rows = list(csv.DictReader((tmp_path / "onnx.csv").read_text().splitlines()))
    assert [r["image"] for r in torch_records] == [r["image"] for r in onnx_rows] == list(map(str, images))
    for mine, theirs in zip(torch_records, onnx_rows):
        assert mine["brightness"] == pytest.approx(float(theirs["brightness"]), abs=1e-4)

    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient

    from dinotune.serve import create_app, open_predictor

    client = TestClient(create_app(open_predictor(exported, device="cpu")))
    assert client.get("/health").json()["task"] == NAME
    answer = client.post("/predict?overlay=1", files={"file": (images[0].name, images[0].read_bytes())}).json()
    assert answer["brightness"] == pytest.approx(torch_records[0]["brightness"], abs=1e-4)
    assert answer["overlay"]["view"]["bars"][0]["name"] == "brightness"
    assert answer["overlay"]["view"]["summary"].startswith("brightness ")
    assert (Image.open(images[0]).size == (answer["overlay"]["source_width"], answer["overlay"]["source_height"]))


def test_a_registered_name_is_refused_twice_and_unknown_names_are_named(brightness_task):
    from dinotune.errors import ConfigError

    with pytest.raises(ConfigError, match="already registered"):
        registry.register(registry.TaskEntry(NAME, "again", config=BrightnessConfig, task=BrightnessTask,
                                             runtime=BrightnessRuntime))
    with pytest.raises(ConfigError, match=f"unknown task 'nope'; valid: classify, detect, segment, instance, pretrain, {NAME}"):
        registry.entry("nope")
