"""``dinotune export RUN --format onnx|hf|torchscript``: a trained run in a form other tools read.

- ``onnx`` (``export/onnx.py``): the whole model (backbone with LoRA / DoRA merged + head, and the
  task's post-processing where it is a tensor computation) as one ONNX graph at a fixed image size,
  beside ``dinotune_export.json``, which holds everything ``dinotune.runtime`` needs to predict
  without torch (classes, pre- and post-processing settings).
- ``torchscript`` (``export/onnx.py`` too: the same graph module, traced): ``model.pt`` + the same
  JSON, for ``torch.jit.load`` in C++ or Python without dinotune.
- ``hf`` (``export/hf.py``): a classification run as a plain transformers folder.

``export`` is the one entry the CLI and ``dinotune.export`` call; each format module imports torch
and the run's task only when used.
"""

from __future__ import annotations

import inspect
import sys
import types
from pathlib import Path
from typing import Any

from dinotune.errors import ConfigError

FORMATS = ("onnx", "hf", "torchscript")


def export(run: str | Path, out: str | Path, *, format: str = "onnx", **options: Any) -> Path:
    """Export ``run`` (a run folder, one of its checkpoint folders, or a loaded run) into the folder
    ``out`` and return it.

    Options by format: ``onnx`` / ``torchscript``: ``image_size``, ``half``, ``opset`` (onnx),
    ``exporter`` (onnx), ``checkpoint_name``, ``model``, ``device`` (see ``export.onnx.export_onnx``);
    ``hf``: ``push_to_hub``, ``private``, ``checkpoint_name``, ``model``.
    An option the format does not take is refused by name.
    """
    if format in ("onnx", "torchscript"):
        from dinotune.export.onnx import export_onnx, export_torchscript

        writer = export_onnx if format == "onnx" else export_torchscript
    elif format == "hf":
        try:
            from dinotune.export.hf import export_hf as writer
        except ImportError as exc:
            raise ConfigError(f"--format hf is not available in this installation ({exc})") from None
    else:
        raise ConfigError(f"unknown export format {format!r}: choose {', '.join(FORMATS)}")
    takes = set(inspect.signature(writer).parameters) - {"run", "out"}
    unknown = sorted(set(options) - takes)
    if unknown:
        raise ConfigError(f"{', '.join(unknown)}: not an option of --format {format} (it takes {', '.join(sorted(takes))})")
    return writer(run, out, **options)


class _CallableModule(types.ModuleType):
    """``dinotune.export`` is this package and the API function at once: the package's attribute
    on ``dinotune`` is this module (Python binds subpackages there), so calling it exports."""

    def __call__(self, run: str | Path, out: str | Path, *, format: str = "onnx", **options: Any) -> Path:
        return export(run, out, format=format, **options)


sys.modules[__name__].__class__ = _CallableModule
