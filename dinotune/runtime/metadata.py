"""``dinotune_export.json``: what an exported model needs beside its graph to predict like the run.

``dinotune export`` writes it next to ``model.onnx``; ``dinotune.runtime`` reads nothing else. Keys:

- ``format`` (``onnx`` / ``torchscript``), ``model_file``, ``dtype`` (``float32`` / ``float16``),
  ``opset``, ``exporter``, ``dinotune_version``;
- ``task`` (``classify`` / ``detect`` / ``segment``), ``class_names``, ``categories`` (detection and
  segmentation: ``[{"id", "name"}]``, the dataset's ids);
- ``image_size`` ``S`` (the graph's fixed input side), ``patch_size``, ``input``: the run's bands
  (``in_channels``, ``rgb_bands``, per-band ``mean`` / ``std`` in the reader's units, ``arrays``:
  band-array files rather than pictures, ``layout``), ``max_image_pixels``;
- ``inputs`` / ``outputs``: the graph's tensor names (see ``export/graphs.py`` for their shapes);
- ``postprocess``: the run's inference settings (classification ``top_k``; detection ``head``,
  ``top_k`` (the graph's ``k``), ``score_threshold``, ``draw_threshold``, ``category_ids``;
  segmentation ``inference`` (whole / slide), ``slide_stride``, ``output_stride``,
  ``ignore_index``; all: ``batch_size``);
- ``source`` (the run, checkpoint, backbone, adapter) and ``verification`` (the largest difference
  between the exported graph and PyTorch on the export's own check).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dinotune.errors import ConfigError

EXPORT_META = "dinotune_export.json"
TASKS = ("classify", "detect", "segment")


@dataclass
class InputInfo:
    """The model's input, as the run's ``meta["input"]`` saved it (the fields of
    ``dinotune.data.bands.InputSpec``, without torch)."""

    in_channels: int = 3
    rgb_bands: list[int] = field(default_factory=lambda: [0, 1, 2])
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    arrays: bool = False
    layout: str = "auto"

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "InputInfo":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in (d or {}).items() if k in known})


@dataclass
class ExportInfo:
    """The parsed ``dinotune_export.json`` (see the module docstring for the keys)."""

    task: str
    class_names: list[str]
    image_size: int
    patch_size: int
    inputs: list[str]
    outputs: list[str]
    input: InputInfo = field(default_factory=InputInfo)
    postprocess: dict[str, Any] = field(default_factory=dict)
    categories: list[dict[str, Any]] | None = None
    format: str = "onnx"
    model_file: str = "model.onnx"
    dtype: str = "float32"
    opset: int | None = None
    exporter: str = ""
    max_image_pixels: int = 89_478_485
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
        """Parse ``folder/dinotune_export.json``; ConfigError naming the file when it is missing or
        does not describe a dinotune export."""
        path = Path(folder) / EXPORT_META
        if not path.is_file():
            raise ConfigError(f"{path} is missing: an exported model folder holds {EXPORT_META} beside the graph "
                              "(export with `dinotune export RUN --format onnx --out DIR`)")
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: not readable JSON ({exc})") from None
        missing = [k for k in ("task", "class_names", "image_size", "patch_size", "inputs", "outputs") if k not in raw]
        if not isinstance(raw, dict) or missing:
            raise ConfigError(f"{path}: not a dinotune export description (missing {', '.join(missing) or 'keys'})")
        if raw["task"] not in TASKS:
            raise ConfigError(f"{path}: unknown task {raw['task']!r} (expected one of {', '.join(TASKS)})")
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in raw.items() if k in known}
        values["input"] = InputInfo.from_dict(raw.get("input"))
        return cls(**values)
