"""Split names and reproducible subsets, the same for every task and data layout."""

from __future__ import annotations

from pathlib import Path

import torch

# Folder / file names a split may go by (Roboflow writes "valid", some datasets "validation"). A
# test split is read by ``eval --split test`` only: training never looks at it.
SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",),
}


def split_dirs(root: Path) -> dict[str, Path]:
    """The split folders under ``root`` (``train/``, ``val/`` or an alias, ``test/``), by canonical
    split name; the first alias present wins. Empty when ``root`` has none."""
    found: dict[str, Path] = {}
    for split, names in SPLIT_ALIASES.items():
        folder = next((root / d for d in names if (root / d).is_dir()), None)
        if folder is not None:
            found[split] = folder
    return found


def subset_indices(size: int, n: int, seed: int) -> list[int]:
    """``n`` of the indices ``0..size-1``, drawn reproducibly and returned sorted: the first ``n``
    of a ``seed``-ed permutation, so the subset of a seed includes that of any smaller ``n``.
    ``n <= 0`` or ``n >= size``: every index."""
    if n <= 0 or n >= size:
        return list(range(size))
    generator = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(size, generator=generator)[:n].tolist())
