"""Where the tiles of a scene lie: the prediction grid (``tile_windows``) and the spatial split into
training and validation blocks (``block_split``), so validation tiles are never a training tile's
neighbour.
"""

from __future__ import annotations

import random

from dinotune.geo.scene import Window
from dinotune.runtime.windows import window_starts


def tile_stride(tile: int, overlap: float) -> int:
    """Pixels between tile starts: ``tile x (1 - overlap)``, at least one."""
    return max(1, int(round(tile * (1.0 - overlap))))


def tile_windows(height: int, width: int, tile: int, overlap: float) -> list[Window]:
    """``tile x tile`` windows covering a ``height x width`` scene, row by row, ``overlap`` (a fraction
    of the tile, in [0, 1)) shared by neighbours; the last of each row and column ends at the border
    (the sliding window's rule). A scene smaller than the tile gets one window reaching past it (read
    as zeros there)."""
    if tile <= 0:
        raise ValueError(f"tile {tile} must be positive")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap {overlap} must be in [0, 1)")
    stride = tile_stride(tile, overlap)
    return [Window(r, c, tile, tile) for r in window_starts(height, tile, stride)
            for c in window_starts(width, tile, stride)]


def block_split(height: int, width: int, block: int, val_fraction: float, seed: int
                ) -> tuple[list[Window], list[Window]]:
    """The scene cut into ``block x block`` blocks (the last ones in each row and column smaller),
    ``val_fraction`` of them (at least one when there are two or more and the fraction is above 0)
    drawn at random with ``seed`` for validation. Returns ``(train blocks, val blocks)``, each row by
    row."""
    blocks = [Window(r, c, min(block, height - r), min(block, width - c))
              for r in range(0, height, block) for c in range(0, width, block)]
    n_val = 0 if val_fraction <= 0 else min(len(blocks) - 1, max(1, round(len(blocks) * val_fraction)))
    chosen = set(random.Random(seed).sample(range(len(blocks)), n_val)) if n_val > 0 else set()
    return ([b for i, b in enumerate(blocks) if i not in chosen], [b for i, b in enumerate(blocks) if i in chosen])
