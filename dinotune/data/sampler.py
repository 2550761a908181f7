"""Balanced sampling (``--sampler balanced``): an epoch of weighted draws instead of a shuffle.

An epoch draws ``len(dataset)`` images with replacement, each with a probability proportional to
its weight, so rare classes come up as often as common ones (rare images repeat within an epoch,
common ones are left out of some epochs):

- classification: weight ``1 / (images of the image's class)``; every class is drawn equally
  often in expectation (``len(dataset) / classes`` times per epoch);
- detection: an image may hold several classes, so it is weighted by the rarest class it contains
  (``1 / (images containing that class)``); images with rare objects come up often, and the
  common classes still ride along in them. Images without boxes get the mean weight of the
  images with boxes: balancing re-shares the draws among the annotated images, and the
  background images keep the share of each epoch they had under a plain shuffle.

The draws come from the loader's own generator, which the trainer reseeds every epoch, so a
resumed run draws the same batches as an uninterrupted one. Under ``torchrun`` every process
makes the same draw and takes every ``world_size``-th index of it (``shard``), as
``DistributedSampler`` does with its permutation: the processes together see one epoch's draw.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def class_counts(labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """``num_classes`` int64 counts of ``labels`` (class indices)."""
    return torch.bincount(torch.as_tensor(list(labels), dtype=torch.int64), minlength=num_classes)


def class_balanced_weights(labels: Sequence[int]) -> torch.Tensor:
    """``N`` float64 weights, ``1 / (images of the class of image i)``: each class present gets the
    same total weight, 1."""
    labels_t = torch.as_tensor(list(labels), dtype=torch.int64)
    if labels_t.numel() == 0:
        return torch.zeros(0, dtype=torch.float64)
    counts = torch.bincount(labels_t).to(torch.float64)
    return 1.0 / counts[labels_t]


def image_class_counts(image_labels: Sequence[Sequence[int]], num_classes: int) -> torch.Tensor:
    """``num_classes`` int64 counts of the images containing each class (an image with three boxes
    of one class counts once)."""
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for labels in image_labels:
        for c in {int(v) for v in labels}:
            counts[c] += 1
    return counts


def rarest_class_weights(image_labels: Sequence[Sequence[int]], num_classes: int) -> torch.Tensor:
    """``N`` float64 weights of detection images, one list of box class indices per image:
    ``1 / (images containing c)`` for the class ``c`` of the image that the fewest images contain.
    Images without boxes get the mean weight of the images with boxes, so they keep their share
    of the draws (all images equal when none has a box)."""
    counts = image_class_counts(image_labels, num_classes).to(torch.float64)
    weights = torch.zeros(len(image_labels), dtype=torch.float64)
    empty = torch.zeros(len(image_labels), dtype=torch.bool)
    for i, labels in enumerate(image_labels):
        present = sorted({int(v) for v in labels})
        if present:
            weights[i] = 1.0 / counts[present].min()
        else:
            empty[i] = True
    weights[empty] = weights[~empty].mean() if (~empty).any() else 1.0
    return weights


def expected_image_draws(weights: torch.Tensor, image_labels: Sequence[Sequence[int]], num_classes: int,
                         draws: int) -> torch.Tensor:
    """``num_classes`` float64: how many drawn images contain each class in an epoch of ``draws``
    weighted draws, in expectation (``draws x`` the probability mass of the images holding it)."""
    p = weights / weights.sum()
    out = torch.zeros(num_classes, dtype=torch.float64)
    for i, labels in enumerate(image_labels):
        for c in {int(v) for v in labels}:
            out[c] += p[i]
    return out * draws


class BalancedSampler(Sampler[int]):
    """``num_samples`` indices per epoch drawn with replacement in proportion to ``weights``
    (``torch.multinomial`` on ``generator``), or this process's share of them.

    Args:
        weights: ``N`` non-negative weights, one per dataset item (not necessarily normalised).
        generator: where the draws come from; the DataLoader's own, reseeded by the trainer per epoch.
        num_samples: draws per epoch over all processes (default ``N``; rounded up to a multiple
            of ``world_size`` so every process makes as many steps).
        rank, world_size: which share of the draw this process takes (every ``world_size``-th
            index from ``rank``).
    """

    def __init__(self, weights: torch.Tensor, generator: torch.Generator, num_samples: int | None = None,
                 rank: int = 0, world_size: int = 1):
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.ndim != 1 or weights.numel() == 0 or not bool((weights >= 0).all()) or float(weights.sum()) <= 0:
            raise ValueError("balanced sampling needs one non-negative weight per item, not all zero")
        self.weights = weights
        self.generator = generator
        self.num_samples = int(num_samples if num_samples is not None else weights.numel())
        self.rank, self.world_size = rank, world_size
        self.total = -(-self.num_samples // world_size) * world_size

    def __iter__(self) -> Iterator[int]:
        draws = torch.multinomial(self.weights, self.total, replacement=True, generator=self.generator)
        return iter(draws[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.total // self.world_size

    def shard(self, rank: int, world_size: int) -> BalancedSampler:
        """The sampler of process ``rank`` of ``world_size``: the same weights, draw count and
        generator (seeded alike on every process), its own share of the draw."""
        return BalancedSampler(self.weights, self.generator, self.num_samples, rank, world_size)


def _listing(names: Sequence[str], values: Sequence[str], limit: int = 12) -> str:
    pairs = [f"{n} {v}" for n, v in zip(names, values)]
    return ", ".join(pairs) if len(pairs) <= limit else ", ".join(pairs[:limit]) + f", ... ({len(pairs)} in all)"


def describe_class_balance(names: Sequence[str], counts: torch.Tensor) -> str:
    """One line for the log: the images per class and how often each class is drawn."""
    present = int((counts > 0).sum())
    n = int(counts.sum())
    return (f"balanced sampling: images per class {_listing(names, [str(int(c)) for c in counts])}; each epoch "
            f"draws {n} with replacement, every class equally often (about {n / max(present, 1):.1f} each): "
            "images of rare classes repeat, common ones are left out of some epochs")


def describe_image_balance(names: Sequence[str], counts: torch.Tensor, expected: torch.Tensor, empty: int,
                           draws: int) -> str:
    """One line for the log: images containing each class, before and (expected) after balancing."""
    shown = [f"{int(c)} -> {e:.1f}" for c, e in zip(counts.tolist(), expected.tolist())]
    tail = f"; the {empty} image(s) without boxes keep their share of the draws" if empty else ""
    return (f"balanced sampling: images drawn by the rarest class they contain (weight 1 / images containing "
            f"it), {draws} draws per epoch with replacement; images containing each class, in the data -> "
            f"expected per epoch: {_listing(names, shown)}{tail}")
