"""Defaults of the commands that are not a task: ``dinotune pca``, ``serve``, ``export`` and
``sweep`` (the commands on a trained run are in ``commands.py``, the embedding commands in
``embeddings.py``). Their flags are made from these fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dinotune.config.base import device_option, opt, threads_option
from dinotune.config.commands import CheckpointName, checkpoint_option, images_operand, run_operand, weights_option


@dataclass
class PcaConfig:
    """Defaults of ``dinotune pca`` (patch features' principal components as RGB)."""

    images: list[str] = images_operand()
    model: str = opt("", "a backbone (--model forms) or a dinotune run folder", required=True)
    out: str = opt("pca.png", "output PNG (a folder or a suffix-less path gets pca.png inside)")
    image_size: int = opt(448, "short side in pixels for a backbone spec (a run uses its own --image-size)", ge=1)
    foreground_threshold: float | None = opt(None, "black out patches whose first component is below this (0-1), "
                                             "as DINOv2's demo", default_text="off", ge=0, le=1)
    max_images: int = opt(8, "use at most this many images, one figure row each", ge=1)
    device: str = device_option()
    threads: int = threads_option()


@dataclass
class ServeConfig:
    """Defaults of ``dinotune serve`` (the prediction server)."""

    target: str = run_operand("a run folder (or checkpoint folder), an exported .onnx file / folder, or an index "
                              "folder (dinotune index)", metavar="RUN_OR_ONNX")
    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = opt(8000, "TCP port (0: any free port)", ge=0, le=65535)
    device: str = device_option("auto, cpu, cuda, cuda:N, mps (runs only: an ONNX model picks its provider)")
    threads: int = threads_option()
    max_upload_mb: float = opt(20.0, "largest upload accepted, in MB (larger ones get 413)", gt=0)
    index: str = opt("", "an index folder (dinotune index): POST /similar answers its images most similar to an "
                     "upload, and the page shows them", default_text="none")


@dataclass
class ExportConfig:
    """Defaults of ``dinotune export``. ``image_size``, ``half``, ``opset`` and ``exporter`` apply to
    onnx (the first two to torchscript too), ``push_to_hub`` and ``private`` to hf."""

    run: str = run_operand()
    format: Literal["onnx", "hf", "torchscript"] = opt("onnx", "output format")
    out: str = opt("", "folder to write (new or empty)", required=True)
    image_size: int = opt(0, "onnx / torchscript: the graph's fixed input side, a multiple of the patch size "
                          "(0: the run's --image-size)", ge=0)
    half: bool = opt(False, "onnx / torchscript: fp16 weights and arithmetic inside the graph (inputs and outputs "
                     "stay float32; fastest on a GPU runtime)", negatable=False)
    opset: int = opt(18, "onnx: the ONNX opset (17 or later)", ge=17)
    exporter: Literal["dynamo", "legacy"] = opt(
        "dynamo", "onnx: PyTorch's exporter: dynamo (torch.export) or legacy (the TorchScript tracer, deprecated by "
        "PyTorch, several times faster to export)")
    push_to_hub: str = opt("", "hf: also upload the folder to this hub repo", metavar="REPO", default_text="no upload")
    private: bool = opt(False, "hf: create the hub repo private", negatable=False)
    checkpoint: CheckpointName = checkpoint_option()
    model: str = weights_option()
    threads: int = threads_option()


# The ExportConfig fields each format takes; given for another format, they are refused by name.
EXPORT_FORMAT_OPTIONS: dict[str, frozenset[str]] = {
    "onnx": frozenset({"image_size", "half", "opset", "exporter"}),
    "torchscript": frozenset({"image_size", "half"}),
    "hf": frozenset({"push_to_hub", "private"}),
}


@dataclass
class SweepConfig:
    """Defaults of ``dinotune sweep``'s own options (the trials' base settings are the task config's)."""

    out: str = opt("runs/sweep", "the sweep folder: trials/, the table, the chart; a second call with the same "
                   "settings continues it, with other settings it is refused", short="-o", metavar="SWEEP")
    grid: list[str] = opt(
        [], "the settings to try: a train flag without dashes (adapter, rank, lr, backbone-lr) or a dotted config "
        "key, with comma-separated values (list items joined by +); every combination is a trial, settings that do "
        "not apply collapse", metavar="KEY=V1,V2", repeatable=True, default_text="none")
    linear_grid: list[str] = opt(
        [], "classify, frozen backbone: heads trained together on one pass of cached features (keys lr, "
        "weight-decay, pool, label-smoothing), the best chosen on validation and saved as SWEEP/best",
        metavar="KEY=V1,V2", repeatable=True, default_text="none")
    search: Literal["grid", "optuna"] = opt(
        "grid", "grid = every combination of --grid; optuna = TPE over the same choices, --trials of them "
        "(pip install 'dinotune[sweep]')")
    trials: int = opt(20, "--search optuna: trials in all, this call's and earlier ones'", ge=1)
    retry_failed: bool = opt(False, "train trials that failed in an earlier call again (by default they stay failed)",
                             negatable=False)
