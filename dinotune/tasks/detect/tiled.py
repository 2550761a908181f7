"""Detection over a scene in tiles: each batch of tiles goes through the run's model exactly as a
batch of images would (resized onto the training canvas, post-processed, boxes back in tile
pixels), boxes are clipped to the scene and moved to scene pixels, and the duplicates that
overlapping tiles produce are merged (``merge.py``). Under ``torchrun`` each process takes its
share of the tiles and the detections are merged once, on every process, from all of them.

Instance segmentation adds its masks through ``DetectTask.tile_extras`` (polygons in scene pixels).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from dinotune.data.input_spec import InputSpec
from dinotune.engine import distributed
from dinotune.engine.device import autocast
from dinotune.geo.scene import Scene, Window
from dinotune.tasks.base import TrainedRun
from dinotune.tasks.detect.merge import merge_detections
from dinotune.tasks.detect.transforms import resize_pad, to_input
from dinotune.tasks.tiling import Tiling, my_share, open_input_scene, say, tile_batches, valid_extent
from dinotune.utils import warn

if TYPE_CHECKING:
    from dinotune.tasks.detect.task import DetectTask


def georef(scene: Scene) -> dict[str, Any] | None:
    """``{"crs": text, "transform": [a, b, c, d, e, f]}`` (pixel -> CRS, affine's order) of a
    georeferenced scene, None otherwise: what a GeoJSON writer needs, kept with the record."""
    if not scene.georeferenced:
        return None
    return {"crs": scene.crs.to_string(), "transform": [float(v) for v in tuple(scene.transform)[:6]]}


def tile_detections(task: "DetectTask", run: TrainedRun, scene: Scene, windows: list[Window], tiles: list[torch.Tensor],
                    threshold: float, settings: Any) -> list[dict[str, Any]]:
    """One batch of tiles through the model: per tile ``{"boxes": k x 4 xyxy scene pixels, "scores",
    "labels", ...task extras}`` (numpy), detections scoring under ``threshold`` or outside the scene
    dropped."""
    size = run.cfg.backbone.image_size
    finish = to_input(InputSpec.from_meta(run.meta))
    canvases, scales, sizes = [], [], []
    for tile in tiles:
        canvas, _, factor = resize_pad(tile, torch.zeros(0, 4), size)
        canvases.append(finish(canvas.as_subclass(torch.Tensor)))
        scales.append(factor)
        sizes.append(list(tile.shape[-2:]))
    model, post = run.bundle.model, run.bundle.postprocess
    with torch.no_grad(), autocast(run.device, run.precision):
        outputs = model(torch.stack(canvases).to(run.device))
    dets = post(outputs, scales, torch.tensor(sizes))
    out = []
    for window, det in zip(windows, dets):
        vh, vw = valid_extent(window, scene)
        scores = det["scores"].float().cpu().numpy()
        boxes = det["boxes"].float().cpu().numpy().reshape(-1, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, vw)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, vh)
        keep = np.flatnonzero((scores >= threshold) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
        part = {"boxes": boxes[keep] + np.array([window.col, window.row] * 2, np.float32),
                "scores": scores[keep], "labels": det["labels"].cpu().numpy()[keep],
                "tiles": np.full(len(keep), window.row * 1_000_000 + window.col, np.int64)}
        part.update(task.tile_extras(run, det, keep, window, (vh, vw), settings))
        out.append(part)
    return out


def _concat(parts: list[dict[str, Any]]) -> dict[str, Any]:
    if not parts:
        return {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0, np.float32),
                "labels": np.zeros(0, np.int64), "tiles": np.zeros(0, np.int64)}
    out: dict[str, Any] = {}
    for key in parts[0]:
        values = [p[key] for p in parts]
        out[key] = np.concatenate(values) if isinstance(values[0], np.ndarray) else [v for vs in values for v in vs]
    return out


def _touches(window: Window, region: Sequence[Window]) -> bool:
    x0, y0, x1, y1 = window.bounds
    return any(x0 < r.col + r.width and r.col < x1 and y0 < r.row + r.height and r.row < y1 for r in region)


def predict_scene(task: "DetectTask", run: TrainedRun, path: Path, image_id: int, settings: Any,
                  tiling: Tiling, region: Sequence[Window] | None = None) -> dict[str, Any]:
    """The record of one scene predicted in tiles: ``detection_record``'s (boxes in scene pixels; the
    task's own record for instance segmentation) plus ``"tiling"`` (tile, overlap, merge, tiles) and
    ``"georef"`` (CRS and transform, None for a scene without them). ``region``: only the tiles
    touching these windows (an evaluation's blocks)."""
    spec = InputSpec.from_meta(run.meta)
    threshold = max(settings.score_threshold, getattr(run.bundle.postprocess, "score_threshold", 0.0))
    with open_input_scene(path, spec, task.cfg.data.max_image_pixels) as scene:
        windows = tiling.windows(scene)
        if region is not None:
            windows = [w for w in windows if _touches(w, region)]
        say(f"{scene.describe()}; {len(windows)} tiles of {tiling.tile} px, overlap {tiling.overlap:g}")
        parts = []
        run.bundle.model.eval()
        for batch, tiles in tile_batches(scene, my_share(windows), settings.batch_size, spec, desc=path.name):
            parts += tile_detections(task, run, scene, batch, tiles, threshold, settings)
        found = _concat([p for ps in distributed.gather_objects(parts) for p in ps])
        kept, boxes = merge_detections(found["boxes"], found["scores"], found["labels"], tiling.merge, tiling.tile,
                                       tiles=found["tiles"])
        merged = {k: (v[kept] if isinstance(v, np.ndarray) else [v[i] for i in kept]) for k, v in found.items()}
        merged["boxes"] = boxes.astype(np.float32)
        if len(kept) > settings.top_k and distributed.current().is_main:
            warn(f"{path.name}: {len(kept)} objects after merging, {settings.top_k} kept (--top-k); raise --top-k "
                 "for a scene holding more")
        record = task.scene_record(str(path), image_id, (scene.height, scene.width), merged, run.bundle.categories,
                                   settings)
        record["tiling"] = tiling.describe(merge=tiling.merge, tiles=len(windows), found=int(len(found["scores"])),
                                           merged=int(len(kept)))
        record["georef"] = georef(scene)
    return record
