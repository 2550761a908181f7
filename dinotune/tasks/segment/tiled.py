"""Semantic segmentation over a scene in tiles, in bounded memory: the logits of overlapping tiles
are averaged as the sliding window averages them (each tile's logits resized to its pixels, summed,
divided by how many tiles cover a pixel), but only for the band of rows the current row of tiles
touches. Once a row of tiles is done, the rows above the next one are final: their labels go to the
label GeoTIFF and their logits are dropped. Memory: ``classes x (tile + stride) x scene width``
floats, whatever the scene's height.

Under ``torchrun`` each process takes a contiguous run of tile rows, plus the earlier rows of tiles
that still overlap its first rows (computed twice, so each process's rows are exactly the ones a
single process would give); each writes its final rows to a part file beside the output, and the
first process copies them into the GeoTIFF.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torchvision.transforms import v2

from dinotune.data.input_spec import InputSpec
from dinotune.data.transforms import normalize
from dinotune.engine import distributed
from dinotune.engine.device import autocast
from dinotune.geo.scene import Scene, Window
from dinotune.tasks.base import TrainedRun
from dinotune.tasks.segment.inference import crop_and_resize
from dinotune.tasks.segment.runtime import eval_size
from dinotune.tasks.tiling import Tiling, open_input_scene, tile_batches
from dinotune.utils import info

if TYPE_CHECKING:
    from dinotune.tasks.segment.task import SegmentTask


def label_dtype(classes: int) -> type:
    """The label raster's sample type: 8 bits up to 256 classes."""
    return np.uint8 if classes <= 256 else np.uint16


def _rank_rows(starts: list[int], height: int, tile: int) -> tuple[int, int, list[int]]:
    """This process's final pixel rows ``[top, bottom)`` and the tile-row starts it must compute."""
    ctx = distributed.current()
    per = math.ceil(len(starts) / ctx.world_size)
    first, last = ctx.rank * per, min(len(starts), (ctx.rank + 1) * per)
    if first >= last:
        return 0, 0, []
    top = 0 if first == 0 else starts[first]
    bottom = height if last == len(starts) else starts[last]
    return top, bottom, [s for s in starts if s < bottom and s + tile > top]


class StripAccumulator:
    """Summed logits and window counts of the rows ``[top, top + rows)`` of a ``width``-wide scene."""

    def __init__(self, classes: int, width: int, top: int):
        self.classes, self.width, self.top = classes, width, top
        self.sum = np.zeros((classes, 0, width), np.float32)
        self.count = np.zeros((0, width), np.float32)

    def add(self, window: Window, logits: np.ndarray, height: int) -> None:
        """``logits`` ``K x h x w`` of ``window``'s part inside the scene (``height`` rows tall)."""
        h, w = logits.shape[-2:]
        end = min(window.row + h, height)
        need = end - self.top - self.sum.shape[1]
        if need > 0:
            self.sum = np.concatenate([self.sum, np.zeros((self.classes, need, self.width), np.float32)], axis=1)
            self.count = np.concatenate([self.count, np.zeros((need, self.width), np.float32)])
        r0 = window.row - self.top
        skip = max(0, -r0)  # rows of the tile above this process's first row
        rows = slice(r0 + skip, r0 + h)
        self.sum[:, rows, window.col: window.col + w] += logits[:, skip:]
        self.count[rows, window.col: window.col + w] += 1

    def release(self, upto: int) -> np.ndarray:
        """Labels of the rows from ``top`` to ``upto`` (``upto - top`` x width), dropped from the strip."""
        n = max(0, min(upto - self.top, self.sum.shape[1]))
        labels = (self.sum[:, :n] / np.maximum(self.count[:n], 1)).argmax(0)
        self.sum, self.count, self.top = self.sum[:, n:], self.count[n:], self.top + n
        return labels


def tile_logits(task: "SegmentTask", run: TrainedRun, tiles: list[torch.Tensor], valid: list[tuple[int, int]]
                ) -> list[np.ndarray]:
    """``K x h x w`` float32 logits of each tile's valid ``(h, w)`` part, as ``predict_mask`` would
    compute them for that tile as an image (resized so its short side is the run's size)."""
    model, spec = run.bundle.model, InputSpec.from_meta(run.meta)
    th, tw = tiles[0].shape[-2:]
    size = eval_size(th, tw, run.cfg.backbone.image_size, model.patch_size)
    prepare = v2.Compose([v2.Resize(list(size), antialias=True), v2.ToDtype(torch.float32, scale=True),
                          normalize(spec)])
    batch = torch.stack([prepare(t).as_subclass(torch.Tensor) for t in tiles]).to(run.device)
    with torch.no_grad(), autocast(run.device, run.precision):
        logits = model(batch).float()
    out = []
    for i, (vh, vw) in enumerate(valid):
        full = crop_and_resize(logits[i: i + 1], tuple(size), tuple(size), (th, tw))[0]
        out.append(full[:, :vh, :vw].cpu().numpy())
    return out


def predict_scene(task: "SegmentTask", run: TrainedRun, path: Path, settings: Any, tiling: Tiling,
                  out: Path, colours: Any) -> dict[str, Any]:
    """One scene's labels written as a one-band GeoTIFF ``out`` (the scene's size, CRS and transform,
    a colour table); returns ``{"image", "mask" (out), "classes": {name: fraction}, "tiling"}``."""
    from dinotune.geo.write import LabelRasterWriter

    names = run.bundle.class_names
    spec = InputSpec.from_meta(run.meta)
    ctx = distributed.current()
    with open_input_scene(path, spec, task.cfg.data.max_image_pixels) as scene:
        windows = tiling.windows(scene)
        starts = sorted({w.row for w in windows})
        top, bottom, mine = _rank_rows(starts, scene.height, tiling.tile)
        info(f"{scene.describe()}; {len(windows)} tiles of {tiling.tile} px, overlap {tiling.overlap:g}")
        counts = np.zeros(len(names), np.int64)
        dtype = label_dtype(len(names))
        part = out.with_name(f"{out.name}.part{ctx.rank}.npy") if ctx.enabled and bottom > top else None
        rows_out = (np.lib.format.open_memmap(part, "w+", dtype, (bottom - top, scene.width))
                    if part is not None else None)
        writer = (LabelRasterWriter(out, scene, names, colours, tags=tiling.describe())
                  if not ctx.enabled else None)

        def emit(labels: np.ndarray, row: int) -> None:
            counts[:] += np.bincount(labels.ravel(), minlength=len(names))[: len(names)]
            if writer is not None:
                writer.write(Window(row, 0, labels.shape[0], scene.width), labels.astype(dtype))
            else:
                rows_out[row - top: row - top + labels.shape[0]] = labels

        try:
            strip = StripAccumulator(len(names), scene.width, top)
            rows = set(mine)
            todo = [w for w in windows if w.row in rows]  # row by row, as tile_windows lists them
            seen = 0
            run.bundle.model.eval()
            for batch, tiles in tile_batches(scene, todo, settings.window_batch, spec, desc=path.name):
                valid = [(w.clip(scene.height, scene.width).height, w.clip(scene.height, scene.width).width)
                         for w in batch]
                for window, logits in zip(batch, tile_logits(task, run, tiles, valid)):
                    strip.add(window, logits, scene.height)
                seen += len(batch)
                # rows above the next row of tiles not yet (fully) done are final
                done = min(bottom, todo[seen].row) if seen < len(todo) else bottom
                if done > strip.top:
                    row = strip.top
                    emit(strip.release(done), row)
            if writer is not None:
                writer.close()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if ctx.enabled:
            if rows_out is not None:
                rows_out.flush()
                del rows_out
            counts = np.sum(distributed.gather_objects(counts), axis=0)
            distributed.barrier()
            if ctx.is_main:
                _assemble(out, scene, names, colours, tiling, starts, ctx.world_size)
            distributed.barrier()
    total = max(int(counts.sum()), 1)
    classes = {names[c]: round(float(v) / total, 5) for c, v in enumerate(counts) if v}
    return {"image": str(path), "mask": str(out), "classes": classes,
            "tiling": tiling.describe(tiles=len(windows))}


def _assemble(out: Path, scene: Scene, names: list[str], colours: Any, tiling: Tiling, starts: list[int],
              world: int) -> None:
    """The processes' part files copied into the GeoTIFF ``out`` (a few rows at a time), then removed."""
    from dinotune.geo.write import LabelRasterWriter

    with LabelRasterWriter(out, scene, names, colours, tags=tiling.describe()) as writer:
        for rank in range(world):
            part = out.with_name(f"{out.name}.part{rank}.npy")
            if not part.is_file():
                continue
            rows = np.load(part, mmap_mode="r")
            per = math.ceil(len(starts) / world)
            top = 0 if rank == 0 else starts[min(rank * per, len(starts) - 1)]
            step = max(1, 4_000_000 // max(scene.width, 1))
            for r in range(0, rows.shape[0], step):
                chunk = np.asarray(rows[r: r + step])
                writer.write(Window(top + r, 0, chunk.shape[0], scene.width), chunk.astype(label_dtype(len(names))))
            del rows
            part.unlink()
