"""Semantic segmentation over a scene in tiles, in bounded memory: the logits of overlapping tiles
are averaged as the sliding window averages them (each tile's logits resized to its pixels, summed,
divided by how many tiles cover a pixel), but only over a strip of rows: once a row of tiles is done,
the rows above the next one are final, their labels go to the label GeoTIFF and the strip moves down.
The strip holds ``classes x tile x width`` float32 sums; when that would pass
``STRIP_BYTES`` (many classes, a wide scene) the scene is done in vertical bands of tile columns,
each band's edge tiles computed once more for the band beside it, so memory never follows the
scene's size and the labels are the same.

Under ``torchrun`` each process takes a contiguous run of tile rows, plus the earlier rows of tiles
that still overlap its first rows (computed twice, so each process's rows are exactly the ones a
single process would give); each writes its final rows to a part file beside the output, and the
first process copies them into the GeoTIFF.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

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
from dinotune.tasks.tiling import Tiling, open_input_scene, say, tile_batches, valid_extent

if TYPE_CHECKING:
    from dinotune.tasks.segment.task import SegmentTask

STRIP_BYTES = 192_000_000  # the summed logits of one strip, at most (the scene is cut into bands above)
RELEASE_VALUES = 16_000_000  # logits turned into labels at once when rows are released


def span(starts: Sequence[int], total: int, tile: int, parts: int, index: int) -> tuple[int, int, list[int]]:
    """Part ``index`` of ``parts`` of an axis of ``total`` pixels tiled from ``starts``: its final
    pixels ``[lo, hi)`` (a contiguous run of tile starts each) and the tile starts it must compute
    (its own and those of earlier tiles reaching into it). ``(0, 0, [])`` for a part left without tiles."""
    per = math.ceil(len(starts) / parts)
    first, last = index * per, min(len(starts), (index + 1) * per)
    if first >= last:
        return 0, 0, []
    lo = 0 if first == 0 else starts[first]
    hi = total if last == len(starts) else starts[last]
    return lo, hi, [s for s in starts if s < hi and s + tile > lo]


class StripAccumulator:
    """Summed logits over rows ``[top, top + capacity)`` (a tile's height: rows are released as soon
    as a row of tiles starts below them) and columns ``[left, left + width)`` of a
    scene, in a buffer allocated once (released rows are shifted out in place).

    The average over the tiles covering a pixel divides every class's sum by the same count, so its
    argmax is the sum's: the counts are never stored."""

    def __init__(self, classes: int, left: int, width: int, top: int, capacity: int):
        self.left, self.top = left, top
        self.sum = np.zeros((classes, capacity, width), np.float32)

    def add(self, window: Window, logits: np.ndarray) -> None:
        """``logits`` ``K x h x w`` of ``window``'s part inside the scene; rows above ``top`` and columns
        outside the strip are left out."""
        h, w = logits.shape[-2:]
        r0, c0 = window.row - self.top, window.col - self.left
        rs, cs = max(0, -r0), max(0, -c0)
        re, ce = min(h, self.sum.shape[1] - r0), min(w, self.sum.shape[2] - c0)
        if re <= rs or ce <= cs:
            return
        self.sum[:, r0 + rs: r0 + re, c0 + cs: c0 + ce] += logits[:, rs:re, cs:ce]

    def release(self, upto: int) -> np.ndarray:
        """Labels (``n x width``) of the rows from ``top`` to ``upto``, shifted out of the strip."""
        n = max(0, min(upto - self.top, self.sum.shape[1]))
        labels = np.empty((n, self.sum.shape[2]), np.int64)
        step = max(1, RELEASE_VALUES // max(1, self.sum.shape[0] * self.sum.shape[2]))
        for r in range(0, n, step):
            rows = slice(r, min(n, r + step))
            labels[rows] = self.sum[:, rows].argmax(0)
        rest = self.sum.shape[1] - n
        self.sum[:, :rest] = self.sum[:, n:]
        self.sum[:, rest:] = 0
        self.top += n
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


def band_count(classes: int, width: int, tile: int, stride: int, columns: int) -> int:
    """Vertical bands the scene is done in: enough that a band's strip stays under ``STRIP_BYTES``,
    at most one per tile column."""
    strip = classes * tile * (width + tile) * 4
    return max(1, min(columns, math.ceil(strip / STRIP_BYTES)))


def _predict_band(task: "SegmentTask", run: TrainedRun, scene: Scene, windows: list[Window], spec: InputSpec,
                  rows: tuple[int, int], cols: tuple[int, int], settings: Any, tiling: Tiling, emit: Any,
                  desc: str) -> None:
    """The labels of rows ``[top, bottom)`` x columns ``[left, right)`` from ``windows`` (those
    touching them, row by row), handed to ``emit(labels, row, left)`` as rows become final."""
    (top, bottom), (left, right) = rows, cols
    first = min(w.col for w in windows)
    width = min(scene.width, max(w.col + w.width for w in windows)) - first
    strip = StripAccumulator(len(run.bundle.class_names), first, width, top, tiling.tile)

    def release(upto: int) -> None:
        if upto > strip.top:
            row = strip.top
            emit(strip.release(upto)[:, left - first: right - first], row, left)

    for batch, tiles in tile_batches(scene, windows, settings.window_batch, spec, desc=desc):
        valid = [valid_extent(w, scene) for w in batch]
        for window, logits in zip(batch, tile_logits(task, run, tiles, valid)):
            # tiles come row by row: the rows above a new row of tiles are final
            release(min(bottom, window.row))
            strip.add(window, logits)
    release(bottom)


def predict_scene(task: "SegmentTask", run: TrainedRun, path: Path, settings: Any, tiling: Tiling,
                  out: Path, colours: Any) -> dict[str, Any]:
    """One scene's labels written as a one-band GeoTIFF ``out`` (the scene's size, CRS and transform,
    a colour table); returns ``{"image", "mask" (out), "classes": {name: fraction}, "tiling"}``."""
    from dinotune.geo.write import LabelRasterWriter, label_raster_dtype

    names = run.bundle.class_names
    spec = InputSpec.from_meta(run.meta)
    ctx = distributed.current()
    dtype = label_raster_dtype(len(names))
    with open_input_scene(path, spec, task.cfg.data.max_image_pixels) as scene:
        windows = tiling.windows(scene)
        row_starts = sorted({w.row for w in windows})
        col_starts = sorted({w.col for w in windows})
        top, bottom, mine = span(row_starts, scene.height, tiling.tile, ctx.world_size, ctx.rank)
        stride = max(1, round(tiling.tile * (1 - tiling.overlap)))
        bands = band_count(len(names), scene.width, tiling.tile, stride, len(col_starts))
        say(f"{scene.describe()}; {len(windows)} tiles of {tiling.tile} px, overlap {tiling.overlap:g}"
             + (f", in {bands} vertical bands" if bands > 1 else ""))
        counts = np.zeros(len(names), np.int64)
        part = out.with_name(f"{out.name}.part{ctx.rank}.npy") if ctx.enabled and bottom > top else None
        rows_out = np.lib.format.open_memmap(part, "w+", dtype, (bottom - top, scene.width)) if part else None
        writer = LabelRasterWriter(out, scene, names, colours, tags=tiling.describe()) if not ctx.enabled else None

        def emit(labels: np.ndarray, row: int, left: int) -> None:
            counts[:] += np.bincount(labels.ravel(), minlength=len(names))[: len(names)]
            if writer is not None:
                writer.write(Window(row, left, labels.shape[0], labels.shape[1]), labels.astype(dtype))
            else:
                rows_out[row - top: row - top + labels.shape[0], left: left + labels.shape[1]] = labels

        try:
            run.bundle.model.eval()
            mine_rows = set(mine)
            for band in range(bands):
                left, right, cols = span(col_starts, scene.width, tiling.tile, bands, band)
                cols_set = set(cols)
                todo = [w for w in windows if w.row in mine_rows and w.col in cols_set]  # row by row
                if todo:
                    _predict_band(task, run, scene, todo, spec, (top, bottom), (left, right), settings, tiling,
                                  emit, f"{path.name}" + (f" band {band + 1}/{bands}" if bands > 1 else ""))
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
                _assemble(out, scene, names, colours, tiling, row_starts, ctx.world_size)
            distributed.barrier()
    total = max(int(counts.sum()), 1)
    classes = {names[c]: round(float(v) / total, 5) for c, v in enumerate(counts) if v}
    return {"image": str(path), "mask": str(out), "classes": classes,
            "tiling": tiling.describe(tiles=len(windows), bands=bands)}


def _assemble(out: Path, scene: Scene, names: list[str], colours: Any, tiling: Tiling, starts: list[int],
              world: int) -> None:
    """The processes' part files copied into the GeoTIFF ``out`` (a few rows at a time), then removed."""
    from dinotune.geo.write import LabelRasterWriter

    with LabelRasterWriter(out, scene, names, colours, tags=tiling.describe()) as writer:
        for rank in range(world):
            part = out.with_name(f"{out.name}.part{rank}.npy")
            if not part.is_file():
                continue
            top = span(starts, scene.height, tiling.tile, world, rank)[0]
            rows = np.load(part, mmap_mode="r")
            step = max(1, 4_000_000 // max(scene.width, 1))
            for r in range(0, rows.shape[0], step):
                chunk = np.asarray(rows[r: r + step])
                writer.write(Window(top + r, 0, chunk.shape[0], scene.width), chunk.astype(writer.dtype))
            del rows
            part.unlink()
