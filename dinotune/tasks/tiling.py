"""Tiled prediction, the part every task shares: a scene opened and checked against the run's input,
its tile grid (this process's share of it under ``torchrun``), and the tiles read from disk a batch
ahead of the model, with a progress bar in tiles per second. What a tile's output becomes and how
tiles merge is the task's (``tasks/<task>/tiled.py``).

Memory follows the batch of tiles, never the scene: each batch is read from disk (a GeoTIFF window,
a slice of a memory-mapped ``.npy``) just before the model needs it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torchvision import tv_tensors

from dinotune.config.tiling import parse_tile
from dinotune.data.input_spec import InputSpec
from dinotune.engine import distributed
from dinotune.engine.logging import progress
from dinotune.errors import DataError
from dinotune.utils import info
from dinotune.geo.scene import Scene, Window, open_scene
from dinotune.geo.tiles import tile_windows


@dataclass(frozen=True)
class Tiling:
    """How a scene is tiled and merged: ``tile`` pixels a side, ``overlap`` (fraction of a tile),
    ``merge`` (``nms`` / ``union``: detection duplicates across seams) and ``coords`` (GeoJSON
    ``lonlat`` or the scene's ``crs``)."""

    tile: int
    overlap: float = 0.2
    merge: str = "nms"
    coords: str = "lonlat"

    @classmethod
    def from_options(cls, tile: str | int, image_size: int, overlap: float = 0.2, merge: str = "nms",
                     coords: str = "lonlat") -> "Tiling | None":
        """The tiling ``predict --tile`` asks for (``auto``: ``image_size``, the run's ``training_tile``),
        None when off."""
        side = parse_tile(tile, image_size)
        return cls(side, float(overlap), merge, coords) if side else None

    def windows(self, scene: Scene) -> list[Window]:
        return tile_windows(scene.height, scene.width, self.tile, self.overlap)

    def describe(self, **extra: Any) -> dict[str, Any]:
        """What every output of a tiled prediction names: the tile, overlap and merge used."""
        return {"tile": self.tile, "overlap": self.overlap, **extra}


def say(message: str) -> None:
    """``info`` from process 0 alone (under ``torchrun`` every process runs the same prediction)."""
    if distributed.current().is_main:
        info(message)


def training_tile(run: Any) -> int:
    """What ``--tile auto`` means for ``run``: the scene tile it trained on (scene pixels, objects at
    the scale it learnt them), else its training image size."""
    scene = run.meta.get("scene") or {}
    return int(scene.get("tile") or run.cfg.backbone.image_size)


def open_input_scene(path: str | Path, spec: InputSpec, max_pixels: int = 0) -> Scene:
    """``path`` opened as a scene (``geo.open_scene``) and checked against the run's input: a run
    trained on pictures takes 3-band 8-bit scenes, one trained on band arrays takes its band count
    in any numeric type (its statistics are in the file's units). DataError names the file."""
    scene = open_scene(path, spec.layout, max_pixels)
    if spec.arrays:
        if scene.bands != spec.in_channels:
            scene.close()
            raise DataError(f"{scene.path}: {scene.bands} band(s), but the model takes {spec.in_channels}")
    elif not scene.rgb8:
        scene.close()
        raise DataError(f"{scene.path}: {scene.bands} band(s) of {scene.dtype}, but the model was trained on 8-bit RGB "
                        "pictures; predict it with a run trained on band arrays of this kind")
    return scene


def as_tile_image(array: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """A ``C x h x w`` window as the per-image readers give an image: 8-bit pictures stay uint8
    (scaled to [0, 1] by the task's preprocessing), band arrays become float32 in the file's units."""
    if spec.arrays:
        return tv_tensors.Image(torch.from_numpy(array.astype(np.float32, copy=False)))
    return tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(array)))


def my_share(items: Sequence[Any]) -> list[Any]:
    """This process's share of ``items`` under ``torchrun`` (every ``world_size``-th from its rank:
    neighbouring tiles cost alike, so the shares finish together), all of them otherwise."""
    ctx = distributed.current()
    return list(items[ctx.rank:: ctx.world_size]) if ctx.enabled else list(items)


def tile_batches(scene: Scene, windows: Sequence[Window], batch_size: int, spec: InputSpec, show: bool = True,
                 desc: str = "tiles") -> Iterator[tuple[list[Window], list[torch.Tensor]]]:
    """``windows`` of ``scene`` in batches of ``batch_size``: ``(windows, C x tile x tile images)``. The
    next batch is read on a thread while the caller runs the model on this one (GDAL and numpy
    release the GIL while reading), so at most two batches are in memory."""
    batches = [list(windows[i: i + batch_size]) for i in range(0, len(windows), batch_size)]
    if not batches:
        return

    def read(batch: list[Window]) -> list[torch.Tensor]:
        return [as_tile_image(scene.read(w), spec) for w in batch]

    bar = progress(range(len(windows)), show and distributed.current().is_main, desc=desc, unit="tile")
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, batches[0])
        for i, batch in enumerate(batches):
            tiles = pending.result()
            if i + 1 < len(batches):
                pending = pool.submit(read, batches[i + 1])
            yield batch, tiles
            bar.update(len(batch))
    bar.close()


def valid_extent(window: Window, scene: Scene) -> tuple[int, int]:
    """``(h, w)`` of the part of ``window`` inside the scene (windows of a scene smaller than the
    tile reach past it)."""
    inside = window.clip(scene.height, scene.width)
    return inside.height, inside.width


def scene_paths(inputs: Any) -> list[Path]:
    """The files ``inputs`` names (files, folders searched recursively) for tiled prediction: no
    pixel limit applies (scenes are read window by window); a picture's decoder still bounds what
    it decodes whole. DataError when none is left."""
    from dinotune.data.images import SkipReport, collect_images

    report = SkipReport()
    paths = collect_images(inputs, report)
    report.print("inputs")
    if not paths:
        raise DataError(f"no scenes or images in {inputs}{report.why()}")
    return paths


DRAW_LIMIT = 64_000_000  # pixels of a scene --draw pictures whole (a drawing of more is read by no one)


def scene_picture(path: Path, spec: InputSpec) -> Any:
    """A scene as an RGB picture to draw on (its RGB bands stretched as the band drawings are);
    ConfigError for a scene above ``DRAW_LIMIT`` pixels."""
    from dinotune.data.bands import stretch_to_rgb
    from dinotune.errors import ConfigError

    with open_input_scene(path, spec) as scene:
        if scene.height * scene.width > DRAW_LIMIT:
            raise ConfigError(f"--draw: {path} has {scene.height * scene.width:,} pixels; scenes are drawn up to "
                              f"{DRAW_LIMIT:,} (use the GeoJSON output in a GIS for larger ones)")
        array = scene.read(Window(0, 0, scene.height, scene.width))
    if not spec.arrays:  # an 8-bit RGB picture, shown as it is
        from PIL import Image

        return Image.fromarray(np.ascontiguousarray(array.transpose(1, 2, 0)), mode="RGB")
    return stretch_to_rgb(torch.from_numpy(array.astype(np.float32)), spec.rgb_bands)
