"""What every task supplies, and the pieces tasks share (backbone construction, run metadata)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dinotune.adapters import apply_adapter
from dinotune.backbone.model import DinoBackbone


@dataclass
class TaskData:
    """Datasets of one run and the metadata a checkpoint needs (class names, ...)."""

    train: Dataset | None
    val: Dataset | None
    meta: dict[str, Any] = field(default_factory=dict)


def build_backbone(cfg: Any, meta: dict[str, Any], model_override: str | None = None) -> DinoBackbone:
    """Load the backbone named by ``cfg.backbone`` and apply ``cfg.adapter``.

    Records the fingerprint of the base weights (taken before adapting) in ``meta``:
    ``backbone_fingerprint`` keeps the one a run was trained on, ``loaded_fingerprint`` is this one.
    """
    backbone = DinoBackbone.from_spec(model_override or cfg.backbone.model, init_seed=cfg.backbone.init_seed)
    fingerprint = backbone.fingerprint()
    meta.setdefault("backbone_fingerprint", fingerprint)
    meta["loaded_fingerprint"] = fingerprint
    apply_adapter(backbone, cfg.adapter)
    return backbone


class Task(ABC):
    """A task supplies data, a model (``.backbone`` + ``.head``), a loss and an evaluator.

    The engine calls only ``training_step`` and ``evaluate``; the API calls the rest.
    """

    name: ClassVar[str]
    monitor: ClassVar[str]  # key of evaluate()'s result that picks the best checkpoint
    monitor_mode: ClassVar[str] = "max"

    def __init__(self, cfg: Any):
        self.cfg = cfg

    @abstractmethod
    def build_data(self, run_dir: Path | None) -> TaskData: ...

    @abstractmethod
    def build_model(self, meta: dict[str, Any], model_override: str | None = None) -> nn.Module: ...

    def prepare(self, model: nn.Module, data: TaskData, run_dir: Path, device: torch.device,
                precision: str) -> TaskData:
        """Hook before training (e.g. feature caching); returns the data to train on."""
        return data

    @abstractmethod
    def loaders(self, data: TaskData) -> tuple[DataLoader, DataLoader | None]: ...

    @abstractmethod
    def training_step(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def evaluate(self, model: nn.Module, loader: DataLoader, device: torch.device, precision: str,
                 show_progress: bool = False) -> dict[str, Any]: ...

    def report(self, run_dir: Path, metrics: dict[str, Any], meta: dict[str, Any]) -> list[Path]:
        """Write task plots for ``metrics`` into ``run_dir``; returns the files written."""
        return []
