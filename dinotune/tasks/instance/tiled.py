"""Instance masks in tiled prediction: each kept detection's mask, thresholded in its tile, becomes
polygons in scene pixels (COCO polygon segmentations: a list of ``[x1, y1, x2, y2, ...]`` rings),
which survive the merge with their box and go to the GeoJSON as they are. A scene-sized raster
mask per object would not fit in memory; a polygon is a few hundred numbers.

The outline is traced by GDAL (``rasterio.features.shapes``) along pixel edges and simplified by
half a pixel (shapely), holes dropped as COCO polygons cannot express them.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from dinotune.geo.scene import Window, require_geo
from dinotune.tasks.instance.masks import iter_original_masks

SIMPLIFY = 0.5  # pixels: removes the staircase of pixel edges, keeps the shape


def mask_polygons(mask: np.ndarray, offset: tuple[float, float] = (0.0, 0.0)) -> list[list[float]]:
    """The outer rings of an ``h x w`` boolean mask's parts as COCO polygons, moved by ``offset``
    ``(x, y)``; parts smaller than a pixel dropped."""
    import shapely
    from rasterio import features

    rings: list[list[float]] = []
    if not mask.any():
        return rings
    for geometry, _ in features.shapes(mask.astype(np.uint8), mask=mask, connectivity=8):
        polygon = shapely.geometry.shape(geometry).simplify(SIMPLIFY)
        for part in getattr(polygon, "geoms", [polygon]):
            if part.is_empty or part.area < 1.0:
                continue
            xy = np.asarray(part.exterior.coords)[:-1] + np.asarray(offset)
            rings.append([round(float(v), 2) for v in xy.reshape(-1)])
    return rings


def tile_polygons(logits: np.ndarray, keep: np.ndarray, tile: Sequence[int], canvas_size: int, threshold: float,
                  window: Window, valid: tuple[int, int]) -> list[list[list[float]]]:
    """Polygons (scene pixels) of one tile's kept detections: ``logits`` ``k x Hm x Wm`` mask logits
    on the ``canvas_size`` canvas, rows ``keep``; ``tile`` the tile's ``(h, w)``; ``valid`` its
    ``(h, w)`` inside the scene; a pixel is in where its logit is above ``threshold``."""
    require_geo("instance masks in tiled prediction")
    out: list[list[list[float]]] = []
    if not len(keep):
        return out
    vh, vw = valid
    for masks in iter_original_masks(np.asarray(logits)[keep], tile, canvas_size, threshold):
        out += [mask_polygons(m[:vh, :vw], (window.col, window.row)) for m in masks]
    return out


def polygons_area(rings: list[list[float]]) -> float:
    """Area in pixels of COCO polygon rings (parts do not overlap: they are one mask's)."""
    import shapely

    return float(sum(shapely.Polygon(np.asarray(r).reshape(-1, 2)).area for r in rings if len(r) >= 6))


def add_polygons(record: dict[str, Any], polygons: list[list[list[float]]]) -> dict[str, Any]:
    """``record``'s detections (the first of ``polygons``' order, as kept) with ``segmentation`` (COCO
    polygons in scene pixels) and ``area``."""
    for detection, rings in zip(record["detections"], polygons):
        detection["segmentation"] = rings
        detection["area"] = round(polygons_area(rings), 2)
    return record
