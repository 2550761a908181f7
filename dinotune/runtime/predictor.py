"""``Predictor``: an exported model (``model.onnx`` + ``dinotune_export.json``) that predicts files or
in-memory images with onnxruntime, numpy and Pillow, giving the records ``dinotune predict`` gives
for the run (``predict``), one image's record (``predict_array``, what ``dinotune serve`` calls) and
the JSON / CSV text of ``predict``'s output files (``format_predictions``).

What is particular to the run's task (its input, its records, its files, what the page draws) is
the task's ``RuntimeTask`` (``tasks/<name>/runtime.py``), found through the task registry; this
module holds what every task shares: the session, the files, the settings and their checks.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from dinotune.config import check_ranges, coerce
from dinotune.errors import ConfigError
from dinotune.runtime.inputs import as_model_image, read_image, readable_inputs
from dinotune.runtime.metadata import EXPORT_META, ExportInfo
from dinotune.runtime.schema import DescriptionError, check_graph
from dinotune.runtime.session import OnnxSession
from dinotune.runtime.task import Prediction, RuntimeTask
from dinotune.tasks import registry


class Predictor:
    """An exported model ready to predict (see the module docstring).

    Attributes:
        task: the run's task name.
        class_names: the run's classes, in label order.
        info: the parsed ``dinotune_export.json``.
        input_spec: the model's bands (``InputSpec``).
        max_image_pixels: the pixel limit of decoded images.
        runtime: the task's ``RuntimeTask`` over this model's session.
    """

    def __init__(self, folder: Path, info: ExportInfo, *, model_file: str | None = None, device: str = "auto",
                 threads: int = 0):
        if info.format != "onnx":
            raise ConfigError(f"{folder}: a {info.format} export; dinotune.runtime runs ONNX exports "
                              "(export with --format onnx)")
        self.folder = Path(folder)
        self.info = info
        self.task = info.task
        self.class_names = list(info.class_names)
        self.input_spec = info.input
        self.max_image_pixels = int(info.max_image_pixels)
        self.model_path = self.folder / (model_file or info.model_file)
        self.session = OnnxSession(self.model_path, device=device, threads=threads)
        entry = registry.entry(info.task)
        self._inference = type(entry.config_class()().inference)
        self.runtime: RuntimeTask = entry.runtime_class()(info, self.session.run)
        self._check(folder)

    def _check(self, folder: Path) -> None:
        """The description against the graph and the task (``schema.check_graph``), and its settings
        against the task config's ranges, before anything is predicted: a tampered or mismatched
        export is refused naming the file, never run."""
        where = str(Path(folder) / EXPORT_META)
        rt = self.runtime
        check_graph(where, self.info.inputs, self.info.outputs, self.session.input_shapes, self.session.output_shapes,
                    (rt.graph_inputs, rt.graph_outputs), self.input_spec.in_channels, self.info.image_size,
                    len(self.class_names))
        problem = rt.check_postprocess(self.info.postprocess)
        if problem:
            raise DescriptionError(f"{where}: {problem}")
        try:
            self.settings()
        except ConfigError as exc:
            raise DescriptionError(f"{where}: postprocess: {exc}") from None

    # ----------------------------------------------------------------------------- settings
    @property
    def options(self) -> frozenset[str]:
        """The predict options this model takes: its task's inference settings and extras."""
        return frozenset(f.name for f in dataclasses.fields(self._inference)) | self.runtime.extra_options

    def settings(self, **options: Any) -> dict[str, Any]:
        """The run's inference settings (as the export saved them) with ``options`` applied; an
        option the task does not take, or a value out of its config's range, is refused by name."""
        given = {k: v for k, v in options.items() if v is not None}
        unknown = sorted(set(given) - self.options)
        if unknown:
            raise ConfigError(f"{', '.join(unknown)}: not an option of {self.task} predictions with the ONNX backend "
                              f"(valid: {', '.join(sorted(self.options))})")
        hints = typing.get_type_hints(self._inference)
        saved = {k: v for k, v in self.info.postprocess.items() if k in hints}
        values = {**dataclasses.asdict(self._inference()), **saved, **given}
        fields = {k: coerce(values[k], hints[k], f"inference.{k}") for k in hints}
        check_ranges(self._inference(**fields), "inference.")
        return self.runtime.check_settings({**values, **fields})

    # ---------------------------------------------------------------------------- predicting
    def predict(self, images: str | Path | Iterable[str | Path], **options: Any) -> list[dict[str, Any]]:
        """The records ``dinotune predict`` writes for the readable images of ``images`` (files, or
        folders searched recursively). Options: the task's (``options``)."""
        s = self.settings(**options)
        paths = readable_inputs(images, self.input_spec, self.max_image_pixels, self.runtime.check)
        return self.runtime.predict_files(paths, s, self._read)

    def _read(self, path: Path) -> np.ndarray:
        return read_image(path, self.input_spec, self.max_image_pixels)

    def predict_array(self, image: np.ndarray, name: str) -> dict[str, Any]:
        """The record of one in-memory image (``H x W x 3`` uint8 RGB, or ``H x W x C`` band values)
        named ``name`` (its ``image`` field)."""
        return self.predict_view(image, name)[0]

    def predict_view(self, image: np.ndarray, name: str) -> Prediction:
        """The record of one in-memory image and what the page draws beside it (``extras``)."""
        array = as_model_image(image, self.input_spec, name)
        return self.runtime.predict_arrays([name], [array], self.settings())[0]

    def format_predictions(self, results: list[dict[str, Any]], fmt: str, settings: dict[str, Any] | None = None) -> str:
        """``predict``'s records as the text of a ``fmt`` file (as the torch path writes them);
        ``settings``: the call's resolved settings (default: the export's own)."""
        return self.runtime.format_predictions(results, fmt, self.settings() if settings is None else settings)

    def view_settings(self) -> dict[str, Any]:
        """The server page's controls for this model (``RuntimeTask.view_settings``)."""
        return self.runtime.view_settings(self.settings())

    def describe(self) -> dict[str, Any]:
        """What the exported model is (for ``dinotune serve``'s health check and for logs)."""
        # names, never paths: the server shows this to any client
        source = {k: v for k, v in self.info.source.items() if k in ("checkpoint", "adapter", "trained_image_size")}
        return {"backend": "onnx", "model": self.model_path.name, "task": self.task, "image_size": self.info.image_size,
                "dtype": self.info.dtype, "providers": list(self.session.providers), "source": source}


def load_predictor(path: str | Path, *, device: str = "auto", threads: int = 0) -> Predictor:
    """The ``Predictor`` of an exported model: its folder (``model.onnx`` + ``dinotune_export.json``)
    or the ``.onnx`` file inside it. ``device``: ``auto`` / ``cpu`` / ``cuda``; ``threads``:
    onnxruntime's intra-op threads (0: ``dinotune.threads``' choice)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such exported model (a folder with {EXPORT_META}, or its .onnx file)")
    folder, model_file = (path.parent, path.name) if path.is_file() else (path, None)
    return Predictor(folder, ExportInfo.read(folder), model_file=model_file, device=device, threads=threads)
