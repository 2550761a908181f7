"""DataLoader construction shared by tasks: seeded shuffling or balanced draws, worker settings."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from dinotune.data.sampler import BalancedSampler


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    workers: int,
    collate_fn: Callable | None = None,
    seed: int = 0,
    drop_last: bool = False,
    pin_memory: bool = False,
    weights: torch.Tensor | None = None,
) -> DataLoader:
    """A DataLoader whose order and worker seeds come from its own generator (the trainer reseeds
    it every epoch, which makes resumed runs repeat the uninterrupted ones).

    ``weights`` (``len(dataset)`` non-negative numbers): instead of a shuffle, each epoch draws
    ``len(dataset)`` items with replacement in proportion to them (``BalancedSampler``, drawing
    from the same generator, so balanced runs resume exactly too)."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    sampler = None
    if weights is not None:
        if len(weights) != len(dataset):
            raise ValueError(f"{len(weights)} sampling weights for a dataset of {len(dataset)} items")
        sampler, shuffle = BalancedSampler(weights, generator), False
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        generator=generator,
        drop_last=drop_last and len(dataset) > batch_size,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
