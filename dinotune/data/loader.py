"""DataLoader construction shared by tasks: seeded shuffling, worker settings."""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset


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
) -> DataLoader:
    """A DataLoader whose order and worker seeds come from its own generator (the trainer reseeds
    it every epoch, which makes resumed runs repeat the uninterrupted ones)."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate_fn,
        generator=generator,
        drop_last=drop_last and len(dataset) > batch_size,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
