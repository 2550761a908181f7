"""Options of the commands that use a trained run or get data: ``dinotune eval``, ``predict``,
``analyze``, ``compare``, ``demo`` and ``data download`` (``pca``, ``serve``, ``export`` and ``sweep``
are in ``tools.py``), and the option fields several commands share.

Each command's dataclass is the one home of its defaults: ``cli.build_parser`` makes its flags from
the fields (operands included: a field with ``positional=True`` is ``dinotune eval RUN``'s ``RUN``),
and the Python API (``dinotune.api``, ``demo.run_demo``, ``robustness.evaluate_corruptions``) takes
its keyword defaults from the same fields. A default of ``None`` (or ``""`` for a path) means "the
run's own" or "derived", and the field's ``default_text`` says which.

``predict``'s task options are not here: they are every registered task config's ``inference``
fields and its ``predict_options`` (``DetectPredictOptions``, ...), so a new task brings its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from dinotune.config.base import device_option, opt, threads_option

# The checkpoints a run folder keeps (``engine.run_folder``'s ``BEST`` / ``LAST``, the same strings:
# the config layer cannot import the engine): the one with the best monitored metric, and the latest.
CheckpointName = Literal["best", "last"]
# The split of a dataset with train/ and val/ (and test/) that a command reads.
Split = Literal["val", "train", "test"]


# ---------------------------------------------------------------- fields several commands share
def checkpoint_option() -> Any:
    """``--checkpoint``: which of a run's checkpoints to load."""
    return opt("best", "which checkpoint: best (by the monitored metric) or last")


def weights_option() -> Any:
    """``--model`` of a command on a trained run: another location of its base backbone weights."""
    return opt("", "where the base backbone weights are, if not where training found them",
               default_text="where training found them")


def batch_size_option(default_text: str = "the run's inference.batch_size") -> Any:
    """``--batch-size`` of a command on a trained run (None: the run's own)."""
    return opt(None, "images per batch", default_text=default_text, ge=1)


def run_operand(help: str = "run folder (or a checkpoint folder)", metavar: str | None = None) -> Any:
    """The ``RUN`` operand of a command on a trained run."""
    return opt("", help, positional=True, metavar=metavar)


def images_operand() -> Any:
    """The ``IMAGES`` operand: one or more files and / or folders."""
    return opt([], "image files and/or folders (searched recursively)", positional=True)


def split_option() -> Any:
    return opt("val", "split to read when --data has several (train/, val/, test/; a data.yaml's entries; VOC's "
               "ImageSets lists)")


# ------------------------------------------------------------------------------------ commands
@dataclass
class EvalConfig:
    """``dinotune eval``: metrics of a run on a dataset, or its robustness under corruptions."""

    run: str = run_operand()
    data: str = opt("", "as for training: class folders / CSV / dataset, or COCO / YOLO detection data",
                    required=True)
    split: Split = split_option()
    out: str = opt("", "metrics JSON path (with --corruptions: a folder)",
                   default_text="RUN/eval/<data>-<split>.json")
    images: str = opt("", "COCO image folder (detection / segmentation)", default_text="found next to the JSON")
    labels: str = opt("", "labels of a scene given as --data (vector labels, or a label raster where the task takes "
                      "one); --split val scores the tiles of the run's validation blocks, train those of its "
                      "training blocks, test the whole scene", metavar="FILE",
                      default_text="the run's own when --data is its training scene")
    subset: int = opt(0, "detection / segmentation: evaluate on a reproducible random subset of N images "
                      "(0 = all)", ge=0)
    subset_seed: int = opt(0, "seed of --subset", ge=0)
    corruptions: bool = opt(False, "robustness: evaluate under the 15 ImageNet-C corruptions at each severity and "
                            "write a table and a chart (mIoU, top-1 or COCO AP by task); --out is then a folder",
                            negatable=False)
    severities: list[int] = opt([1, 2, 3, 4, 5], "corruption severities", ge=1, le=5)
    corruption_names: list[str] = opt([], "only these corruptions", metavar="NAME", default_text="all 15")
    corruption_seed: int = opt(0, "seed of the random corruptions", ge=0)
    checkpoint: CheckpointName = checkpoint_option()
    model: str = weights_option()
    device: str = device_option()
    threads: int = threads_option()
    batch_size: int | None = batch_size_option()


@dataclass
class PredictConfig:
    """``dinotune predict``: records per image from a run or an exported model. The task options
    (``--top-k``, ``--draw`` ...) come from the task configs (see the module docstring)."""

    run: str = run_operand("run folder (or a checkpoint folder), or an exported ONNX model (folder or .onnx file)",
                           metavar="RUN_OR_ONNX")
    images: list[str] = images_operand()
    format: str = opt("", "output format: json (records per image) or csv (a row per prediction); detection also "
                      "coco (COCO results for evaluation: every top-k detection, unthresholded, as --image-info "
                      "implies); json and csv show a person the detections scoring at least --draw-threshold",
                      default_text="from --out, else json")
    out: str = opt("", "write to this file", default_text="stdout")
    backend: Literal["torch", "onnx"] | None = opt(
        None, "torch: the run in PyTorch; onnx: the exported graph in onnxruntime, pre- and post-processing in "
        "numpy (a run folder is exported once into RUN/export/onnx-<checkpoint>)",
        default_text="onnx for an exported model, else torch")
    checkpoint: CheckpointName = checkpoint_option()
    model: str = weights_option()
    device: str = device_option()
    threads: int = threads_option()
    batch_size: int | None = batch_size_option()


@dataclass
class AnalyzeConfig:
    """``dinotune analyze``: charts and sample pictures of a run."""

    run: str = run_operand("run folder")
    data: str = opt("", "evaluate on this data first", default_text="the run's best validation metrics")
    split: Split = split_option()
    out: str = opt("", "output folder", default_text="RUN/analysis")
    samples: int = opt(8, "images to draw", ge=0)
    draw_threshold: float | None = opt(None, "detection: draw boxes scoring at least this",
                                       default_text="the run's inference.draw_threshold", ge=0, le=1)
    model: str = weights_option()
    device: str = device_option()
    threads: int = threads_option()


@dataclass
class CompareConfig:
    """``dinotune compare``: detectors (our runs, YOLO weights) scored on the same images."""

    data: str = opt("", "COCO folder / JSON or YOLO folder with ground truth", required=True)
    split: Split = split_option()
    images: str = opt("", "COCO image folder", default_text="found next to the JSON")
    runs: list[str] = opt([], "dinotune detection runs", metavar="RUN", default_text="none")
    yolo: list[str] = opt([], "ultralytics weights (yolov8n.pt ...) or model YAMLs (random weights: their rows are "
                          "marked so); needs pip install 'dinotune[yolo]'", metavar="WEIGHTS", default_text="none")
    class_map: str = opt(
        "", "YOLO class -> dataset category: MODEL_CLASS=CATEGORY pairs (class index or name, e.g. 0=person,"
        "1=bicycle) or a JSON file {\"0\": \"person\"}; other classes are matched by name. Needed when a model "
        "shares no class name with the data (a model YAML names its classes 0..79)", metavar="MAP",
        default_text="match by name")
    yolo_image_size: int | None = opt(None, "YOLO inference size", ge=1,
                                      default_text="inference.compare_image_size of the first run, else the task "
                                                   "config's")
    subset: int = opt(0, "evaluate on N random images (0 = all)", ge=0)
    subset_seed: int = opt(0, "seed of --subset", ge=0)
    out: str = opt("runs/compare", "output folder")
    device: str = device_option()
    threads: int = threads_option()
    batch_size: int | None = batch_size_option("each run's inference.batch_size")


@dataclass
class DemoConfig:
    """``dinotune demo``: fine-tune on scikit-learn's handwritten digits, offline if need be."""

    out: str = opt("runs/demo", "run folder")
    epochs: int | None = opt(None, "epochs", default_text="20 random-init, 3 pretrained", ge=1)
    model: str = opt("facebook/dinov2-small", "backbone; falls back to random:tiny when the hub cannot be reached")
    device: str = device_option()
    threads: int = threads_option()


@dataclass
class DownloadConfig:
    """``dinotune data download``: a dataset's official archives into the layout dinotune reads.
    The datasets and their splits are the download catalog's (``cli`` passes them as choices)."""

    dataset: str = opt("", "which dataset", positional=True)
    to: str = opt("", "dataset folder", metavar="DIR", default_text="data/<dataset>")
    splits: list[str] = opt([], "splits to get", default_text="all; VOC, ADE20K and hymenoptera ship both in one "
                            "archive")
    mirror: str = opt("", "base URL replacing the official one (also $DINOTUNE_DOWNLOAD_MIRROR)", metavar="URL",
                      default_text="the official one")
    keep_archives: bool = opt(False, "keep the downloaded archives after extraction (by default they are deleted)",
                              negatable=False)
