"""Training tiles cut from a scene: where they may lie (``ScenePlan``: the spatial split into
training and validation blocks and the grid inside each), which objects a tile holds
(``LabelIndex``: vector labels clipped to a window, an object less visible than ``min_visible``
dropped) and how training windows are drawn (``TileSampler``: random positions or the grid, tiles
without objects kept at ``empty_rate``).

Why blocks: neighbouring tiles share texture, light and often the same objects, so validation
tiles drawn at random beside training tiles would score the model on what it has seen. Training
windows lie wholly inside training blocks (a block is at least a tile), validation tiles inside
validation blocks, so no validation pixel is ever trained on.

Torch-free and task-free; shapely is imported where it is used. Coordinates are the scene's pixels
(x = column, y = row, the scene's top-left corner at (0, 0)); a tile's objects come back in the
tile's own pixels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import numpy as np

from dinotune.data.input_spec import BandMoments
from dinotune.errors import ConfigError
from dinotune.geo.scene import Window
from dinotune.geo.tiles import block_split, tile_windows

TileSampling = Literal["random", "grid"]

# A random draw that keeps landing on tiles without objects gives up after this many tries and
# returns the last one (a scene almost without labels must still yield tiles).
MAX_DRAWS = 100


# ------------------------------------------------------------------------------- split and grid
@dataclass
class ScenePlan:
    """Where a scene's training and validation tiles lie.

    Attributes:
        height, width: the scene's size in pixels.
        tile: the side of a tile.
        block: the side of a split block (>= ``tile``).
        train_blocks, val_blocks: the blocks of each side of the split (row by row).
    """

    height: int
    width: int
    tile: int
    block: int
    train_blocks: list[Window]
    val_blocks: list[Window]

    def grid(self, blocks: Sequence[Window]) -> list[Window]:
        """``tile x tile`` windows covering each of ``blocks`` without overlap (the last of a row or
        column ends at the block's border, sharing pixels with its neighbour in the same block). A
        block narrower than a tile (at the scene's right or bottom edge) gets one window reaching
        past the scene, read as zeros there: never into another block."""
        out = []
        for b in blocks:
            out += [Window(b.row + w.row, b.col + w.col, w.height, w.width)
                    for w in tile_windows(b.height, b.width, self.tile, 0.0)]
        return out

    def train_grid(self) -> list[Window]:
        return self.grid(self.train_blocks)

    def val_grid(self) -> list[Window]:
        return self.grid(self.val_blocks)

    def random_window(self, rng: np.random.Generator) -> Window:
        """A ``tile x tile`` window wholly inside a training block, the block drawn by its area (so
        every training pixel is about equally likely to be seen), the position uniform in it."""
        areas = np.array([b.height * b.width for b in self.train_blocks], dtype=np.float64)
        b = self.train_blocks[int(rng.choice(len(areas), p=areas / areas.sum()))]
        row = b.row + int(rng.integers(0, max(b.height - self.tile, 0) + 1))
        col = b.col + int(rng.integers(0, max(b.width - self.tile, 0) + 1))
        return Window(row, col, self.tile, self.tile)

    def to_meta(self) -> dict[str, Any]:
        """What a run records: sizes and block counts (the split itself follows from the config)."""
        return {"height": self.height, "width": self.width, "tile": self.tile, "block": self.block,
                "train_blocks": len(self.train_blocks), "val_blocks": len(self.val_blocks)}

    def describe(self) -> str:
        return (f"spatial split: {len(self.train_blocks)} training and {len(self.val_blocks)} validation block(s) of "
                f"{self.block} px, tiles of {self.tile} px ({len(self.train_grid())} training / "
                f"{len(self.val_grid())} validation grid tiles)")


def plan_scene(height: int, width: int, tile: int, block: int, val_fraction: float, seed: int) -> ScenePlan:
    """The split of a ``height x width`` scene into ``block``-pixel blocks (0: four tiles), of which
    ``val_fraction`` go to validation (drawn with ``seed``; ``tiles.block_split``). ConfigError when
    a block is smaller than a tile: training windows must fit inside a training block."""
    if tile <= 0:
        raise ConfigError(f"--tile {tile}: a tile needs at least one pixel")
    block = block or 4 * tile
    if block < tile:
        raise ConfigError(f"--block {block} is smaller than the tile ({tile} px): training windows lie wholly inside "
                          f"training blocks, so a block must hold a tile; use --block {4 * tile} (or 0 = 4 tiles)")
    train, val = block_split(height, width, block, val_fraction, seed)
    return ScenePlan(height, width, tile, block, train, val)


# ------------------------------------------------------------------------------------ objects
@dataclass
class TileObject:
    """One label object as a tile sees it.

    Attributes:
        label: its class index.
        geometry: the part inside the tile, a shapely (Multi)Polygon in the tile's pixels.
        box: ``(x0, y0, x1, y1)``, the bounds of that part (tile pixels).
        visible: the part's share of the object's area inside the scene, in (0, 1].
    """

    label: int
    geometry: Any
    box: tuple[float, float, float, float]
    visible: float


class LabelIndex:
    """Label polygons of a scene (pixel coordinates) with a spatial index, clipped tile by tile.

    ``geometries`` are clipped to the scene first: the part of an object outside the scene is
    never in any tile, so it does not count against the object's visible share. Objects with no
    area inside the scene are left out (``dropped`` counts them)."""

    def __init__(self, geometries: Sequence[Any], labels: Sequence[int], height: int, width: int):
        import shapely

        self.height, self.width = height, width
        self.geometries, self.labels, self.dropped = [], [], 0
        for geom, label in zip(geometries, labels):
            inside = _polygons(shapely.clip_by_rect(geom, 0, 0, width, height))
            if inside is None:
                self.dropped += 1
                continue
            self.geometries.append(inside)
            self.labels.append(int(label))
        self.areas = np.array([g.area for g in self.geometries], dtype=np.float64)
        self._tree = shapely.STRtree(self.geometries)

    def __len__(self) -> int:
        return len(self.geometries)

    def touching(self, window: Window) -> list[int]:
        """Indices of the objects whose bounding boxes meet ``window`` (sorted: drawing order)."""
        import shapely

        x0, y0, x1, y1 = window.bounds
        return sorted(int(i) for i in self._tree.query(shapely.box(x0, y0, x1, y1)))

    def clip(self, window: Window, min_visible: float = 0.0) -> list[TileObject]:
        """The objects inside ``window`` in its pixels, in label-file order; an object whose part
        inside keeps less than ``min_visible`` of its area is dropped (0: any part with an area)."""
        import shapely

        x0, y0, x1, y1 = window.bounds
        out = []
        for i in self.touching(window):
            part = _polygons(shapely.clip_by_rect(self.geometries[i], x0, y0, x1, y1))
            if part is None:
                continue
            visible = min(1.0, part.area / self.areas[i])
            if visible < min_visible:
                continue
            part = shapely.transform(part, lambda xy: xy - np.array([x0, y0], dtype=np.float64))
            out.append(TileObject(self.labels[i], part, tuple(float(v) for v in part.bounds), float(visible)))
        return out

    def any_in(self, window: Window, min_visible: float = 0.0) -> bool:
        """Whether ``window`` holds at least one object (as ``clip`` keeps them)."""
        return bool(self.clip(window, min_visible))

    def counts(self, blocks: Sequence[Window], num_classes: int) -> list[int]:
        """Objects per class whose representative point lies in one of ``blocks``."""
        out = [0] * num_classes
        for geom, label in zip(self.geometries, self.labels):
            p = geom.representative_point()
            if any(b.col <= p.x < b.col + b.width and b.row <= p.y < b.row + b.height for b in blocks):
                out[label] += 1
        return out

    def rasterize(self, window: Window, values: Sequence[int], fill: int, dtype: Any) -> np.ndarray:
        """``window.height x window.width`` labels: each object's pixels (pixel centres inside it)
        set to ``values[its label]``, later objects over earlier ones, ``fill`` elsewhere."""
        from affine import Affine
        from rasterio.features import rasterize

        shapes = [(obj.geometry, int(values[obj.label])) for obj in self.clip(window)]
        if not shapes:
            return np.full((window.height, window.width), fill, dtype=dtype)
        return rasterize(shapes, out_shape=(window.height, window.width), fill=fill, transform=Affine.identity(),
                         dtype=dtype)


def _polygons(geom: Any) -> Any:
    """The polygonal part of a clip (a Polygon or MultiPolygon), None when it has no area (clipping
    may leave the lines and points where an object touched the border)."""
    import shapely

    if geom is None or geom.is_empty:
        return None
    if geom.geom_type in ("Polygon", "MultiPolygon"):
        return geom if geom.area > 0 else None
    parts = [p for p in shapely.get_parts(geom) if p.geom_type in ("Polygon", "MultiPolygon") and p.area > 0]
    if not parts:
        return None
    polys = [q for p in parts for q in shapely.get_parts(p)]
    return polys[0] if len(polys) == 1 else shapely.MultiPolygon(polys)


# ------------------------------------------------------------------------------ training draws
@dataclass
class TileSampler:
    """Training windows of one epoch.

    ``grid``: the grid tiles of the training blocks, those without objects kept at ``empty_rate``
    (decided once, with ``seed``); ``random``: each item a fresh window at a random position in a
    training block, one without objects kept with probability ``empty_rate`` (else drawn again, up
    to ``MAX_DRAWS`` times). An epoch is ``tiles_per_epoch`` items (0: as many as the grid keeps).

    ``has_objects(window)`` says whether a window holds an object. ``drawn_empty`` / ``kept_empty``
    count the empty candidates of random draws and how many were kept (in this process).
    """

    plan: ScenePlan
    has_objects: Callable[[Window], bool]
    sampling: TileSampling
    empty_rate: float
    tiles_per_epoch: int = 0
    seed: int = 0
    kept: list[Window] = field(init=False)
    full_grid: int = field(init=False)  # grid tiles holding objects
    empty_grid: int = field(init=False)  # grid tiles without any
    drawn_empty: int = field(default=0, init=False)
    kept_empty: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self.kept, self.empty_grid, self.full_grid = [], 0, 0
        for w in self.plan.train_grid():
            if self.has_objects(w):
                self.kept.append(w)
                self.full_grid += 1
            else:
                self.empty_grid += 1
                if rng.random() < self.empty_rate:
                    self.kept.append(w)

    def __len__(self) -> int:
        return self.tiles_per_epoch or max(1, len(self.kept))

    @property
    def fixed(self) -> bool:
        """The windows are known in advance (grid sampling)."""
        return self.sampling == "grid"

    def windows(self) -> list[Window]:
        """Grid sampling: the window of each item (the kept grid tiles, repeated or cut to the epoch;
        every grid tile when none was kept)."""
        pool = self.kept or self.plan.train_grid()
        return [pool[i % len(pool)] for i in range(len(self))]

    def draw(self, rng: np.random.Generator) -> Window:
        """Random sampling: one training window (see the class docstring)."""
        window = self.plan.random_window(rng)
        for _ in range(MAX_DRAWS):
            if self.has_objects(window):
                return window
            self.drawn_empty += 1
            if rng.random() < self.empty_rate:
                self.kept_empty += 1
                return window
            window = self.plan.random_window(rng)
        return window

    def describe(self) -> str:
        how = ("random windows in the training blocks" if self.sampling == "random"
               else "the grid tiles of the training blocks")
        return (f"training: {len(self)} tiles per epoch, {how}; {self.full_grid} grid tiles hold objects, "
                f"{len(self.kept) - self.full_grid} of the {self.empty_grid} without any kept (--empty-rate "
                f"{self.empty_rate:g})")


# ---------------------------------------------------------------------------------- statistics
def window_statistics(read: Callable[[Window], np.ndarray], windows: Sequence[Window], height: int, width: int,
                      scale: float = 1.0, max_windows: int = 32) -> tuple[list[float], list[float]]:
    """Per-band mean and standard deviation over up to ``max_windows`` of ``windows`` (evenly
    spaced), each clipped to the scene so padding does not count; ``read(window)`` returns
    ``bands x h x w``, multiplied by ``scale`` (1/255 for pictures: the transforms' units). A band
    that never varies gets std 1."""
    if not windows:
        raise ValueError("no windows to compute band statistics from")
    step = max(1, -(-len(windows) // max_windows))
    moments = BandMoments()
    for w in list(windows)[::step]:
        inside = w.clip(height, width)
        if inside.height and inside.width:
            x = read(inside)
            moments.add(x.reshape(x.shape[0], -1).T * scale)
    return moments.result()
