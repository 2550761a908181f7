"""``dinotune_export.json``: what an exported model needs beside its graph to predict like the run.

``dinotune export`` writes it next to ``model.onnx``; ``dinotune.runtime`` reads nothing else. Keys:

- ``format`` (``onnx`` / ``torchscript``), ``model_file``, ``dtype`` (``float32`` / ``float16``),
  ``opset``, ``exporter``, ``dinotune_version``;
- ``task`` (a registered task's name), ``class_names``, ``categories`` (tasks whose data has category
  ids: ``[{"id", "name"}]``, the dataset's ids);
- ``image_size`` ``S`` (the graph's fixed input side), ``patch_size``, ``input``: the run's bands
  (``in_channels``, ``rgb_bands``, per-band ``mean`` / ``std`` in the reader's units, ``arrays``:
  band-array files rather than pictures, ``layout``), ``max_image_pixels``;
- ``inputs`` / ``outputs``: the graph's tensor names (each task's ``export.py`` gives their shapes);
- ``postprocess``: the run's inference section and what the task's runtime needs beside it (each
  task's ``export.py`` says which keys);
- ``source`` (the run, checkpoint, backbone, adapter) and ``verification`` (the largest difference
  between the exported graph and PyTorch on the export's own check).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dinotune.data.images import DEFAULT_MAX_IMAGE_PIXELS
from dinotune.data.input_spec import InputSpec
from dinotune.errors import ConfigError
from dinotune.runtime.schema import MAX_DESCRIPTION_BYTES, check_description
from dinotune.tasks import registry

EXPORT_META = "dinotune_export.json"


@dataclass
class ExportInfo:
    """The parsed ``dinotune_export.json`` (see the module docstring for the keys)."""

    task: str
    class_names: list[str]
    image_size: int
    patch_size: int
    inputs: list[str]
    outputs: list[str]
    input: InputSpec = field(default_factory=InputSpec)
    postprocess: dict[str, Any] = field(default_factory=dict)
    categories: list[dict[str, Any]] | None = None
    format: str = "onnx"
    model_file: str = "model.onnx"
    dtype: str = "float32"
    opset: int | None = None
    exporter: str = ""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    dinotune_version: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, folder: Path) -> Path:
        path = Path(folder) / EXPORT_META
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, folder: Path) -> "ExportInfo":
        """Parse ``folder/dinotune_export.json``, every value checked (``schema.py``); ConfigError
        naming the file (and the key) when it is missing or does not describe a dinotune export."""
        path = Path(folder) / EXPORT_META
        if not path.is_file():
            raise ConfigError(f"{path} is missing: an exported model folder holds {EXPORT_META} beside the graph "
                              "(export with `dinotune export RUN --format onnx --out DIR`)")
        try:
            if path.stat().st_size > MAX_DESCRIPTION_BYTES:
                raise ConfigError(f"{path}: {path.stat().st_size:,} bytes; a dinotune export description is a few "
                                  "KB (at most 16 MB is read)")
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ConfigError(f"{path}: not readable JSON ({exc})") from None
        except RecursionError:
            raise ConfigError(f"{path}: not readable JSON (nested too deep)") from None
        values = check_description(raw, str(path))
        if values["task"] not in registry.names():
            raise ConfigError(f"{path}: unknown task {values['task']!r} (expected one of {', '.join(registry.names())})")
        values["input"] = InputSpec.from_dict(values["input"])
        return cls(**values)
