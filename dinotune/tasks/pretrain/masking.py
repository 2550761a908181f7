"""Block-wise patch masks for the iBOT loss (masked image modelling), as DINOv2 draws them.

The student sees the global crops with some patches replaced by a mask token and learns to
predict the teacher's prototype distribution at exactly those patches. Masking whole rectangles
rather than scattered patches (BEiT's block-wise masking, kept by iBOT and DINOv2) stops the
student from filling a hole by copying its immediate neighbours. This reproduces DINOv2's
``MaskingGenerator`` (``dinov2/data/masking.py``) and the masking half of its ``collate_data_and_cast``,
with one change: the count is topped up with single patches, so it is exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dinotune.errors import ConfigError

# DINOv2's MaskingGenerator defaults: a rectangle covers at least this many patches, its aspect
# ratio h / w is log-uniform in (MIN_ASPECT, 1 / MIN_ASPECT), and it gets this many placements to
# add new patches before the generator gives up on rectangles.
MIN_BLOCK_AREA = 4
MIN_ASPECT = 0.3
PLACEMENT_TRIES = 10


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in ``[low, high]`` (both included, as Python's ``random.randint``)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _add_block(mask: Tensor, budget: int, generator: torch.Generator | None) -> int:
    """Masks one random rectangle of ``mask`` (``h x w`` bool, changed in place) that adds between 1
    and ``budget`` new patches; returns how many it added (0 after ``PLACEMENT_TRIES`` misses)."""
    height, width = mask.shape
    log_aspect = (math.log(MIN_ASPECT), math.log(1 / MIN_ASPECT))
    for _ in range(PLACEMENT_TRIES):
        area = _uniform(MIN_BLOCK_AREA, max(MIN_BLOCK_AREA, budget), generator)
        aspect = math.exp(_uniform(*log_aspect, generator))
        h = max(1, round(math.sqrt(area * aspect)))
        w = max(1, round(math.sqrt(area / aspect)))
        if h > height or w > width:
            continue
        top = _randint(0, height - h, generator)
        left = _randint(0, width - w, generator)
        block = mask[top:top + h, left:left + w]
        new = h * w - int(block.sum())
        # DINOv2's test: the rectangle must add something and may overlap earlier ones, but never
        # push the count past the target.
        if 0 < new <= budget:
            block.fill_(True)
            return new
    return 0


def _image_mask(grid: tuple[int, int], count: int, generator: torch.Generator | None) -> Tensor:
    """``h x w`` bool with exactly ``count`` patches masked: rectangles, then single patches."""
    mask = torch.zeros(grid, dtype=torch.bool)
    remaining = count
    while remaining > 0:
        added = _add_block(mask, remaining, generator)
        if added == 0:
            break
        remaining -= added
    if remaining > 0:
        # DINOv2 stops here with fewer patches than asked (the last few rarely fit a rectangle of
        # area >= 4); a few random single patches make the count the one that was drawn.
        free = (~mask).flatten().nonzero().flatten()
        pick = free[torch.randperm(free.numel(), generator=generator)[:remaining]]
        mask.view(-1)[pick] = True
    return mask


def block_masks(batch: int, grid: tuple[int, int], ratio: tuple[float, float] = (0.1, 0.5), probability: float = 0.5,
                generator: torch.Generator | None = None) -> Tensor:
    """``B x (h * w)`` bool: ``True`` at the patches the student's global crop hides.

    ``n = floor(probability * B + 0.5)`` images (``probability * B`` rounded half up) are masked, the
    others are left whole. As in DINOv2's collate, the ratio range is cut into ``n`` equal bins and
    the ``i``-th masked image draws its ratio uniformly in the ``i``-th bin, so every batch covers
    the whole range evenly rather than by chance; a random permutation then decides which images
    get which mask (or none). A mask covers ``int(ratio * h * w)`` patches exactly (DINOv2's
    rounding), so the count lies in ``[int(low * h * w), int(high * h * w)]``.

    Args:
        batch: ``B``, the number of images (crops) to mask.
        grid: ``(h, w)``, the patch grid of one crop.
        ratio: ``(low, high)``, the range of the masked share of a masked image's patches.
        probability: the share of the images that are masked at all.
        generator: the source of every random draw; a seeded one gives the same masks each time.
    """
    low, high = ratio
    if not 0.0 <= low <= high <= 1.0:
        raise ConfigError(f"mask ratio {ratio}: expected 0 <= low <= high <= 1")
    if not 0.0 <= probability <= 1.0:
        raise ConfigError(f"mask probability {probability}: expected a value in [0, 1]")
    height, width = grid
    patches = height * width
    masked = min(batch, math.floor(probability * batch + 0.5))
    bins = [low + (high - low) * i / masked for i in range(masked)] + [high]  # linspace, in float64
    masks = torch.zeros(batch, patches, dtype=torch.bool)
    order = torch.randperm(batch, generator=generator)
    for i in range(masked):
        count = int(patches * _uniform(bins[i], bins[i + 1], generator))
        masks[order[i]] = _image_mask((height, width), count, generator).flatten()
    return masks
