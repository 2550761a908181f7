"""What the server predicts with: any object with ``task``, ``class_names`` and
``predict_array(array, name) -> dict``; ``RunPredictor`` gives a trained run (torch) that face, and
``open_predictor`` picks the right one for a run folder, an exported ONNX model or an index
(``dinotune.serve.similar``).

The record ``predict_array`` returns is the one ``dinotune.predict`` returns for that image (the
run's inference settings; ``image`` is ``name``). Optional members the server uses when present:

- ``input_spec`` (an ``InputSpec``): the model's bands, so uploads are checked against them
  (default: RGB pictures);
- ``max_image_pixels`` (int): the pixel limit of decoded uploads (default: Pillow's);
- ``runtime``: the task's ``RuntimeTask`` (class or instance): what the page draws of a record
  (``view``), its controls (``view_settings``) and colours;
- ``predict_view(array, name) -> (record, extras)``: the record and what the page draws beside it
  (a label map under ``"mask"``);
- ``view_settings() -> dict``: the page's controls for this model (e.g. the box threshold);
- ``describe() -> dict``: what ``GET /health`` says of the model.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from dinotune.engine.run_folder import RunLayout
from dinotune.errors import ConfigError
from dinotune.runtime.metadata import EXPORT_META


@runtime_checkable
class Predictor(Protocol):
    """The face the server needs of a model (``dinotune.runtime``'s ONNX predictor has it too)."""

    task: str
    class_names: list[str]

    def predict_array(self, array: np.ndarray, name: str) -> dict[str, Any]:
        """The prediction record of one image: ``H x W x 3`` uint8 RGB, or ``H x W x C`` bands."""
        ...


class RunPredictor:
    """A trained run (``dinotune.load``) as a ``Predictor``.

    ``predict_array`` goes through the task's own ``predict`` on a copy of the image in a private
    temporary folder (PNG for pictures, which is lossless, ``.npy`` for band arrays), so a served
    record is what ``dinotune predict`` gives for the same image, by construction rather than by
    a second implementation of each task's pre- and post-processing. What the page draws beside it
    comes back through files the task's runtime asks ``predict`` to write (``artifact_options``).
    """

    def __init__(self, run: Any):
        self.run = run
        self.task: str = run.task.name
        self.class_names: list[str] = list(run.bundle.class_names)
        self.input_spec = run.input_spec
        self.max_image_pixels: int = run.cfg.data.max_image_pixels
        self.runtime = run.task.runtime()

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> "RunPredictor":
        from dinotune.runs import load  # torch: only for a run, never for an exported model

        return cls(load(path, device=device))

    def describe(self) -> dict[str, Any]:
        """What ``GET /health`` says of the model."""
        cfg = self.run.cfg
        # names, never paths: the server shows this to any client (a hub id or random:* spec as it is)
        backbone = cfg.backbone.model
        if Path(backbone).expanduser().exists():
            backbone = Path(backbone).name
        return {"backend": "torch", "run": self.run.run_dir.name, "backbone": backbone,
                "adapter": cfg.adapter.kind, "image_size": cfg.backbone.image_size, "device": str(self.run.device)}

    def view_settings(self) -> dict[str, Any]:
        """The page's controls, from the run's inference settings."""
        return self.runtime.view_settings(dataclasses.asdict(self.run.cfg.inference))

    def predict_array(self, array: np.ndarray, name: str) -> dict[str, Any]:
        return self._predict(array, name, with_view=False)[0]

    def predict_view(self, array: np.ndarray, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The record and what the page draws beside it (the task runtime's extras)."""
        return self._predict(array, name, with_view=True)

    def _predict(self, array: np.ndarray, name: str, with_view: bool) -> tuple[dict[str, Any], dict[str, Any]]:
        from PIL import Image

        # numeric stems are detection image ids, as for files: name the copy as the upload is named
        stem = Path(name).stem or "image"
        with tempfile.TemporaryDirectory(prefix="dinotune-serve-") as tmp:
            folder = Path(tmp)
            if self.input_spec.arrays:
                path = folder / f"{stem}.npy"
                # the run's layout reads it back: C x H x W when it was trained on chw files
                np.save(path, np.moveaxis(array, -1, 0) if self.input_spec.layout == "chw" else array,
                        allow_pickle=False)
            else:
                path = folder / f"{stem}.png"
                Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8), mode="RGB").save(path)
            options = self.runtime.artifact_options(folder) if with_view else {}
            record, extras = self.run.predict([path], **options)[0], {}
            if with_view:
                record, extras = self.runtime.take_artifacts(record)  # before the folder goes
        record["image"] = name
        return record, extras


def open_predictor(path: str | Path, device: str = "auto") -> Predictor:
    """The predictor of ``path``: a run folder (or one of its checkpoint folders) through
    ``dinotune.load``, or an exported model (a ``dinotune export`` folder, or its ``.onnx`` file)
    through ``dinotune.runtime.load_predictor``. ``device``: either's (``auto``, ``cpu``, ``cuda``).
    Raises ConfigError for anything else."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such run folder or ONNX model")
    from dinotune.embed.index import is_index

    if is_index(path):  # an index served alone answers the most similar images
        from dinotune.serve.similar import SimilarImages

        return SimilarImages(path, device=device)
    layout = RunLayout(path)
    if layout.config.is_file() or layout.checkpoints.is_dir() or RunLayout.is_checkpoint(path):
        return RunPredictor.load(path, device=device)
    exported = path.suffix.lower() == ".onnx" or (path / EXPORT_META).is_file()
    if exported or (path.is_dir() and any(path.glob("*.onnx"))):
        try:
            from dinotune.runtime import load_predictor
        except ImportError as exc:  # onnxruntime, an optional dependency, is what is usually missing
            raise ConfigError(f"{path}: serving an exported model needs onnxruntime (pip install onnxruntime): "
                              f"{exc}") from None
        return load_predictor(path, device=device)
    raise ConfigError(f"{path}: neither a run folder (config.yaml + checkpoints/), an exported model "
                      "(`dinotune export RUN --format onnx` output, or its .onnx file) nor an index (dinotune index)")
