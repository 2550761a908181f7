"""The task contract: everything the engine, the API, the CLI, robustness evaluation and the
detector comparison call of a task, and what a task is (its metric, its labels, its options).

A task holds only its config. What it builds is handed back: ``build_data`` returns the datasets
and the metadata a checkpoint keeps, ``build_model`` a ``ModelBundle`` (model, criterion,
post-processing, class names), and every later method receives the bundle (training, evaluation)
or the loaded run (prediction). Nothing is stashed on the task between calls, so one task object
can serve several models.
"""

from __future__ import annotations

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
from dinotune.models.bundle import ModelBundle


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
    """What prediction and evaluation read of a trained run (``dinotune.api.LoadedRun``)."""

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
        predict_options: keyword options ``predict`` takes besides the config's inference section.
    """

    name: ClassVar[str]
    monitor_mode: ClassVar[Literal["max", "min"]] = "max"
    pixel_aligned_labels: ClassVar[bool] = False
    supports_subset: ClassVar[bool] = False
    predict_options: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, cfg: Any):
        self.cfg = cfg

    @property
    @abstractmethod
    def monitor(self) -> str:
        """The key of ``evaluate``'s result that picks the best checkpoint."""

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

    @abstractmethod
    def loaders(self, data: TaskData) -> tuple[DataLoader, DataLoader | None]:
        """Training and validation loaders (the engine shards them under several processes)."""

    # ---------------------------------------------------------------- training and evaluation
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

    # ---------------------------------------------------------------------- a trained run
    @abstractmethod
    def predict(self, run: TrainedRun, images: Any, settings: Any, **options: Any) -> list[dict[str, Any]]:
        """Predictions per readable image of ``images`` (a file, a folder searched recursively, or
        a list of them; unreadable files are reported and skipped). ``settings`` is the resolved
        inference section of the config, ``options`` those named in ``predict_options``."""

    @abstractmethod
    def format_predictions(self, results: list[dict[str, Any]], fmt: Literal["json", "csv"]) -> str:
        """``predict``'s results as the text of a JSON or CSV file."""

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
