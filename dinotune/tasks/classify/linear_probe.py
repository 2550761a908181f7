"""Classification's part of ``--linear-grid`` (``dinotune/tasks/linear_probe.py``): DINOv2's linear
evaluation, heads of every pooling trained on one cached row per image.

The row holds the class tokens of the last ``n`` layers (shallow to deep) and the last layer's mean
patch token (``n`` = 4 when a ``last4`` head is asked for, else 1); every pooling is a slice of it
(``cls``: the last class token, ``cls_mean``: it and the mean patch token, ``last4``: the whole
row), equal to what ``heads.pool_features`` gives, so a head reads what its lone
``--cache-features`` run caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset

from dinotune.config import ClassifyConfig
from dinotune.errors import ConfigError
from dinotune.tasks.classify.heads import Pool, layers_needed
from dinotune.tasks.classify.probe import FeatureDataset, cached_features
from dinotune.tasks.linear_probe import LinearProbe


class AllPools(nn.Module):
    """``features(images)``: ``B x 3 x H x W`` -> ``B x (n + 1) C``, the class tokens of the last
    ``n`` layers (shallow to deep) and the last layer's mean patch token."""

    def __init__(self, backbone: nn.Module, n_layers: int):
        super().__init__()
        self.backbone = backbone
        self.n_layers = n_layers

    def features(self, images: torch.Tensor) -> torch.Tensor:
        f = self.backbone(images, layers=self.n_layers)
        return torch.cat([*f.layers_cls, f.patch_mean], dim=-1)


def pool_columns(pool: Pool, n_layers: int, dim: int) -> slice:
    """The columns of an ``AllPools`` row (``n_layers`` class tokens of width ``dim``, then the mean
    patch token) that make the pooled input of ``pool``."""
    last = (n_layers - 1) * dim  # where the last layer's class token starts
    if pool == "cls":
        return slice(last, last + dim)
    if pool == "cls_mean":
        return slice(last, last + 2 * dim)
    if pool == "last4":
        return slice(last - 3 * dim, last + 2 * dim)
    raise ConfigError(f"unknown pool {pool!r}: choose cls, cls_mean or last4")


@dataclass(frozen=True)
class PoolView:
    """One head's columns of the cached rows (``FeatureDataset`` items / batches, key ``features``)."""

    columns: slice

    def dataset(self, cached: Dataset) -> Dataset:
        assert isinstance(cached, FeatureDataset)
        # contiguous: the head's matmul then reads the very layout a lone run's cache has
        return FeatureDataset(cached.features[:, self.columns].contiguous(), cached.labels)

    def batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {**batch, "features": batch["features"][:, self.columns].contiguous()}


class ClassifyLinearProbe(LinearProbe):
    """Heads may differ in pooling and label smoothing besides their learning rate and weight decay."""

    keys = ("head.pool", "head.label_smoothing")

    def prepare(self, cfg: ClassifyConfig) -> None:
        cfg.head.cache_features = True  # a lone run's cached path: no augmentation, loaders without workers

    def check(self, cfg: ClassifyConfig) -> None:
        if cfg.head.head_dropout > 0:
            raise ConfigError("--linear-grid needs --head-dropout 0: dropout draws from one random stream, which "
                              "heads trained together would draw in another order than each alone")

    def feature_model(self, backbone: nn.Module, configs: Sequence[ClassifyConfig]) -> AllPools:
        return AllPools(backbone, max(layers_needed(c.head.pool) for c in configs))

    def cache(self, model: nn.Module, train: Dataset, val: Dataset, *, cache_dir: Path, key: dict[str, Any],
              batch_size: int, workers: int, device: torch.device, precision: str,
              show_progress: bool) -> tuple[Dataset, Dataset]:
        assert isinstance(model, AllPools)
        common: dict[str, Any] = {
            "cache_dir": cache_dir, "key_parts": {**key, "pool": f"layers{model.n_layers}+mean"},
            "batch_size": batch_size, "workers": workers, "device": device, "precision": precision,
            "show_progress": show_progress}
        return (cached_features(model, train, split="train", **common),
                cached_features(model, val, split="val", **common))

    def head_view(self, cfg: ClassifyConfig, model: nn.Module) -> PoolView:
        assert isinstance(model, AllPools)
        return PoolView(pool_columns(cfg.head.pool, model.n_layers, model.backbone.embed_dim))
