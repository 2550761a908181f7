"""Defaults of the commands that are not a task: ``dinotune pca``, ``serve``, ``export`` and ``sweep``."""

from __future__ import annotations

from dataclasses import dataclass

from dinotune.config.base import opt


@dataclass
class PcaConfig:
    image_size: int = opt(448, "short side in pixels for a backbone spec (a run uses its own --image-size)", ge=1)
    max_images: int = opt(8, "use at most this many images, one figure row each", ge=1)


@dataclass
class ServeConfig:
    """Defaults of ``dinotune serve`` (the prediction server)."""

    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = opt(8000, "TCP port (0: any free port)", ge=0, le=65535)
    max_upload_mb: float = opt(20.0, "largest upload accepted, in MB (larger ones get 413)", gt=0)


@dataclass
class ExportConfig:
    """Defaults of ``dinotune export --format onnx|torchscript``."""

    image_size: int = opt(0, "the graph's fixed input side, a multiple of the patch size (0: the run's --image-size)",
                          ge=0)
    opset: int = opt(18, "ONNX opset (17 or later)", ge=17)
    exporter: str = opt("dynamo", "ONNX exporter: dynamo (torch.export, default) or legacy (TorchScript tracer, "
                        "deprecated by PyTorch, faster to export)")


@dataclass
class SweepConfig:
    """Defaults of ``dinotune sweep``."""

    out: str = opt("runs/sweep", "the sweep folder: trials/, the table, the chart (a second call continues it)")
    search: str = opt("grid", "grid = every combination of --grid; optuna = TPE over the same choices, --trials of them")
    trials: int = opt(20, "--search optuna: how many trials the search may train", ge=1)
