"""The task contract: everything the engine, the API, the CLI, robustness evaluation, the export
and the comparison tools call of a task's PyTorch half, and what a task is (its metric, its labels,
its options). Its torch-free half is its ``RuntimeTask`` (``runtime/task.py``), which the registry
names beside it.

A task holds only its config. What it builds is handed back: ``build_data`` returns the datasets
and the metadata a checkpoint keeps, ``build_model`` a ``ModelBundle`` (model, criterion,
post-processing, class names), and every later method receives the bundle (training, evaluation)
or the loaded run (prediction). Nothing is stashed on the task between calls, so one task object
can serve several models.
"""

from __future__ import annotations

import dataclasses
import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal, Protocol, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from dinotune.adapters import apply_adapter
from dinotune.backbone.model import DinoBackbone
from dinotune.engine import distributed
from dinotune.engine.monitor import MonitorChoice
from dinotune.errors import ConfigError, ExportError
from dinotune.models.bundle import ModelBundle
from dinotune.models.graph import ExportGraph
from dinotune.runtime.task import RuntimeTask
from dinotune.tasks import registry
from dinotune.tasks.linear_probe import LinearProbe


@dataclass
class TaskData:
    """Datasets of one run and the metadata a checkpoint needs (class names, ...)."""

    train: Dataset | None
    val: Dataset | None
    meta: dict[str, Any] = field(default_factory=dict)


def files_fingerprint(paths: Iterable[str | Path], extra: Iterable[Any] = ()) -> str:
    """A short hash of files' paths, sizes and modification times (and ``extra`` identifying
    values), as the feature cache keys its files: a run records the one of its training data, and
    a resume notices when that data changed. Missing files count as changed."""
    hasher = hashlib.sha1()
    for path in sorted(str(p) for p in paths):
        try:
            st = Path(path).stat()
            hasher.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            hasher.update(f"{path}\0missing\n".encode())
    for value in extra:
        hasher.update(f"{value}\n".encode())
    return hasher.hexdigest()[:16]


class TrainedRun(Protocol):
    """What prediction and evaluation read of a trained run (``dinotune.runs.LoadedRun``)."""

    cfg: Any
    meta: dict[str, Any]
    bundle: ModelBundle
    device: torch.device
    precision: str


def build_backbone(cfg: Any, model_override: str | None = None) -> tuple[DinoBackbone, str]:
    """The backbone of ``cfg.backbone`` with ``cfg.adapter`` applied, and the fingerprint of its
    base weights (taken before adapting, to notice a run loaded onto other weights).

    Raises ConfigError when ``cfg.backbone.image_size`` is not a multiple of its patch size.
    """
    backbone = DinoBackbone.from_spec(model_override or cfg.backbone.model, init_seed=cfg.backbone.init_seed)
    backbone.check_image_size(cfg.backbone.image_size, "backbone.image_size")
    fingerprint = backbone.fingerprint()
    apply_adapter(backbone, cfg.adapter)
    return backbone, fingerprint


class Task(ABC):
    """One task: its data, model, training step, evaluation and inference.

    Class attributes say what the task is:
        name: the registry name (``classify``, ...).
        monitor_mode: whether a larger (``max``) or smaller value of ``monitor`` is better.
        pixel_aligned_labels: labels are tied to pixel positions (masks, boxes), so image
            corruptions must not move content (robustness uses the dense elastic variant).
        supports_subset: ``eval --subset N`` applies.
        supports_labels: ``eval --labels FILE`` applies (the labels of a scene given as data);
            ``evaluate_data`` then takes ``labels``.
    """

    name: ClassVar[str]
    monitor_mode: ClassVar[Literal["max", "min"]] = "max"
    pixel_aligned_labels: ClassVar[bool] = False
    supports_subset: ClassVar[bool] = False
    supports_labels: ClassVar[bool] = False

    def __init__(self, cfg: Any):
        self.cfg = cfg

    @property
    def predict_options(self) -> frozenset[str]:
        """Keyword options ``predict`` takes besides the config's inference section: the fields of
        the config class's ``predict_options`` dataclass (``DetectPredictOptions``, ...), which
        also make ``dinotune predict``'s flags; none when the config declares none."""
        options = getattr(type(self.cfg), "predict_options", None)
        return frozenset(f.name for f in dataclasses.fields(options)) if options else frozenset()

    @property
    @abstractmethod
    def monitor(self) -> str:
        """The key of ``evaluate``'s result that picks the best checkpoint by default, from the
        config alone (``monitor_for`` may choose another for a run's data)."""

    def monitor_for(self, meta: dict[str, Any], val: Dataset | None) -> MonitorChoice:
        """What picks the best checkpoint of a run on this data (``--monitor auto``), in which
        direction and why, and the keys ``--monitor`` may name (None: checked at the first
        evaluation). ``meta``: ``build_data``'s metadata; ``val``: the validation dataset the
        engine evaluates. By default ``monitor`` / ``monitor_mode``, whatever the data."""
        return MonitorChoice(self.monitor, self.monitor_mode)

    # ------------------------------------------------------------------------- data and model
    @abstractmethod
    def build_data(self, run_dir: Path | None, patch_size: int) -> TaskData:
        """Training and validation datasets, and ``meta`` (``class_names``, ``num_classes``,
        ``data_fingerprint`` of the training files, ...). ``run_dir``: where to record subsets
        (None: record nothing)."""

    @abstractmethod
    def build_model(self, meta: dict[str, Any], backbone: DinoBackbone) -> ModelBundle:
        """The model on ``backbone`` for the classes in ``meta``, with its criterion and
        post-processing."""

    def prepare(self, bundle: ModelBundle, data: TaskData, run_dir: Path, device: torch.device,
                precision: str) -> TaskData:
        """Hook before training (e.g. feature caching); returns the data to train on."""
        return data

    def linear_probe(self) -> LinearProbe | None:
        """Its part of ``dinotune sweep --linear-grid`` (heads trained together on one pass of
        cached frozen-backbone features), or None: the task has no such evaluation and its sweeps
        use ``--grid``."""
        return None

    @abstractmethod
    def loaders(self, data: TaskData) -> tuple[DataLoader, DataLoader | None]:
        """Training and validation loaders (the engine shards them under several processes)."""

    # ---------------------------------------------------------------- training and evaluation
    def scheduled(self, step: int, total_steps: int) -> None:
        """Before optimizer step ``step`` (0-based) of the run's ``total_steps``: for what follows
        training progress beside the learning rate (a temperature); nothing by default."""

    def stepped(self, bundle: ModelBundle, step: int, total_steps: int) -> None:
        """After optimizer step ``step``: for weights that follow the trained ones (a teacher);
        nothing by default."""

    @abstractmethod
    def training_step(self, bundle: ModelBundle, model: torch.nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Losses of one batch (``"loss"`` is back-propagated, the rest logged). ``model`` is
        ``bundle.model`` or its DDP wrapper, the one to call."""

    @abstractmethod
    def evaluation_pass(self, bundle: ModelBundle, loader: DataLoader, device: torch.device, precision: str,
                        show_progress: bool) -> Any:
        """Run the model over this process's ``loader``; return a picklable partial result
        (predictions or sufficient statistics) that ``compute_metrics`` combines."""

    @abstractmethod
    def compute_metrics(self, bundle: ModelBundle, parts: Sequence[Any], dataset: Dataset) -> dict[str, Any]:
        """Metrics from the partial results of every process (one part outside ``torchrun``),
        the same whatever way the images were split between processes."""

    @torch.no_grad()
    def evaluate(self, bundle: ModelBundle, loader: DataLoader, device: torch.device, precision: str,
                 show_progress: bool = False) -> dict[str, Any]:
        """Metrics of ``bundle.model`` over ``loader``. Under ``torchrun`` every process passes
        over its own shard and the partial results are gathered, so every process returns the
        metrics of the whole set."""
        model = bundle.model
        was_training = model.training
        model.eval()
        try:
            part = self.evaluation_pass(bundle, loader, device, precision, show_progress)
        finally:
            model.train(was_training)
        return self.compute_metrics(bundle, distributed.gather_objects(part), loader.dataset)

    def finished(self, run_dir: Path, bundle: ModelBundle) -> list[Path]:
        """After the last epoch, on process 0, with the trained model: what the task leaves in the
        run folder besides its checkpoints (a pretraining run's backbone); returns the files."""
        return []

    # ---------------------------------------------------------------------- a trained run
    @abstractmethod
    def predict(self, run: TrainedRun, images: Any, settings: Any, **options: Any) -> list[dict[str, Any]]:
        """Predictions per readable image of ``images`` (a file, a folder searched recursively, or
        a list of them; unreadable files are reported and skipped). ``settings`` is the resolved
        inference section of the config, ``options`` those named in ``predict_options``."""

    def format_predictions(self, results: list[dict[str, Any]], fmt: str, settings: Any = None) -> str:
        """``predict``'s results as the text of a ``fmt`` file (``runtime().formats``): the runtime's
        formatter, so ``predict --backend onnx`` writes the very same files. ``settings``: the
        resolved inference section (a dataclass or a dict) and predict options."""
        if dataclasses.is_dataclass(settings):
            settings = dataclasses.asdict(settings)
        return self.runtime().format_predictions(results, fmt, settings)

    @abstractmethod
    def evaluate_data(self, run: TrainedRun, data: str, split: str, settings: Any, *, images: str = "",
                      subset: int = 0, subset_seed: int = 0,
                      pre_transform: Callable | None = None) -> dict[str, Any]:
        """Metrics of ``run`` on a dataset in any layout the task reads. ``pre_transform`` (PIL ->
        PIL) runs on each image before preprocessing (e.g. a corruption)."""

    def report(self, out_dir: Path, metrics: dict[str, Any], meta: dict[str, Any]) -> list[Path]:
        """Charts of ``metrics`` written into ``out_dir``; returns the files."""
        return []

    def sample_charts(self, run: TrainedRun, data: str, split: str, out_dir: Path, samples: int,
                      settings: Any = None) -> list[Path]:
        """Pictures of ``samples`` predictions on ``data``; returns the files. ``settings``: the
        resolved inference section (thresholds to draw with), None for the run's own."""
        return []

    def summary_table(self, metrics: dict[str, Any]) -> str | None:
        """A per-class table of ``metrics`` for the terminal, or None."""
        return None

    # ------------------------------------------------------- beyond PyTorch: runtime and export
    @classmethod
    def runtime(cls) -> type[RuntimeTask]:
        """The task's torch-free half (records, output files, what the server draws)."""
        return registry.entry(cls.name).runtime_class()

    @classmethod
    def compare(cls, *, data: str, split: str, runs: Sequence[TrainedRun], run_names: Sequence[str],
                yolo: Sequence[str], out: Path, images: str, subset: int, subset_seed: int, device: str,
                batch_size: int | None, yolo_image_size: int | None, class_map: Any, defaults: Any) -> str:
        """``dinotune compare``: ``runs`` of this task and third-party baselines (``yolo`` weights)
        scored on the same images of ``data`` by the same metric code, written into ``out``; returns
        the Markdown table. ``defaults``: the config whose inference section fills unset options."""
        raise ConfigError(f"dinotune compare does not apply to {cls.name} runs")

    def check_distributed(self) -> None:
        """Refuse (ConfigError), before any work, settings that do not combine with several
        processes under ``torchrun``."""

    def export_graph(self, run: TrainedRun, model: torch.nn.Module, image_size: int) -> ExportGraph:
        """The graph ``dinotune export`` writes for ``run``: ``model`` (the run's model, merged, maybe
        a half-precision copy) and the tensor part of the post-processing, at ``image_size``."""
        raise ExportError(f"{self.name} runs cannot be exported to ONNX / TorchScript")

    def check_transformers_export(self) -> None:
        """Refuse (ExportError, with the reason) a run with no transformers counterpart, from its
        config alone (before any weights are loaded)."""
        raise ExportError(f"--format hf: {self.name} runs have no transformers counterpart")

    def to_transformers(self, run: TrainedRun) -> tuple[Any, Any, str]:
        """``(model, image processor, model card text)``: ``run`` as a plain transformers model that
        gives its outputs (checked), for ``dinotune export --format hf``."""
        self.check_transformers_export()
        raise NotImplementedError
