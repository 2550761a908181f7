"""What ``--linear-grid`` asks of a task (``Task.linear_probe()``): heads trained together on one
pass of a frozen backbone's cached features, each exactly as a lone cached-feature run trains it.

The generic loop (``dinotune/sweep/linear_grid.py``) owns the optimisers, schedules, reseeding,
evaluation and the run folder of the best head; the task owns what a cached row is and which part
of it each head reads. The flow, for heads of configs ``configs`` on ``backbone``:

    probe.prepare(cfg); probe.check(cfg)                 # before anything runs
    model = probe.feature_model(backbone, configs)       # features(images) -> B x D rows
    train, val = probe.cache(model, data.train, data.val, ...)  # one pass, cached on disk
    view = probe.head_view(cfg, model)                   # per head: its part of a row
    view.dataset(val); view.batch(batch)                 # what its evaluation / training step reads
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Protocol, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset


class HeadView(Protocol):
    """What one head reads of the cached rows: the same items and batches, cut to its input."""

    def dataset(self, cached: Dataset) -> Dataset:
        """``cached`` (the rows ``LinearProbe.cache`` made) as this head's lone cached-feature run
        would have cached it."""

    def batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A batch of cached rows (the task's loader collated it) as this head's training step
        reads it."""


class LinearProbe(ABC):
    """A task's part of ``--linear-grid``.

    Class attributes:
        keys: dotted config keys (beyond the optimiser's ``optim.lr`` and ``optim.weight_decay``,
            which every head has its own of) that heads trained on the same cached rows may
            differ in; any other swept key is refused.
    """

    keys: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def prepare(self, cfg: Any) -> None:
        """Set ``cfg`` in place as a lone run on cached features has it (its data pipeline, the
        config written into the best head's run folder)."""

    def check(self, cfg: Any) -> None:
        """Refuse (ConfigError) task settings that would couple heads trained together (a random
        stream drawn in another order than alone, ...). The generic ones (adapter, precision,
        EMA, early stopping, processes) are the loop's own."""

    @abstractmethod
    def feature_model(self, backbone: nn.Module, configs: Sequence[Any]) -> nn.Module:
        """A module on the frozen ``backbone`` whose ``features(images)`` (``B x 3 x H x W`` ->
        ``B x D``) row holds every input the heads of ``configs`` read."""

    @abstractmethod
    def cache(self, model: nn.Module, train: Dataset, val: Dataset, *, cache_dir: Path, key: dict[str, Any],
              batch_size: int, workers: int, device: torch.device, precision: str,
              show_progress: bool) -> tuple[Dataset, Dataset]:
        """The training and validation rows of ``model`` (``feature_model``'s), read from
        ``cache_dir`` or extracted once and stored there. ``key``: what identifies the backbone and
        the input (base-weight fingerprint, model, image size, bands); the probe adds the row's layout."""

    @abstractmethod
    def head_view(self, cfg: Any, model: nn.Module) -> HeadView:
        """What the head of ``cfg`` reads of ``model``'s rows."""
