"""COCO instances JSON rasterised to semantic masks: 0 = background, 1..C = categories in id order
(non-contiguous ids mapped), crowd regions = ignore. The JSON is validated by the shared reader
(``dinotune.data.coco``, as for detection); this module keeps compact shapes per image, and the
drawing happens lazily in ``sources.rasterize_coco``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dinotune.data.coco import read_coco_file, short
from dinotune.data.images import SkipReport
from dinotune.errors import DataError
from dinotune.tasks.segment.sources import CocoShapes, SegmentationSource

__all__ = ["read_coco_semantic"]


def _coco_shape(seg: Any, h: int, w: int, where: str) -> Any:
    """A compact drawable shape: float32 polygons (those with >= 3 points) or a compressed RLE."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        polys = []
        for p in seg:
            try:
                arr = np.asarray(p, dtype=np.float32).reshape(-1)
            except (TypeError, ValueError):
                raise DataError(f"{where}: segmentation polygons must be lists of numbers, got {short(p)}") from None
            if len(arr) >= 6 and np.isfinite(arr).all():
                polys.append(arr)
        return polys or None
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        size = seg["size"]
        if not (isinstance(size, list) and len(size) == 2 and [int(v) for v in size] == [h, w]):
            raise DataError(f"{where}: RLE size {short(size)} differs from the image's [height, width] [{h}, {w}]")
        if isinstance(seg["counts"], list):
            return mask_utils.frPyObjects(seg, h, w)
        counts = seg["counts"]
        return {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    raise DataError(f"{where}: segmentation must be a list of polygons or an RLE dict, got {short(seg)}")


def read_coco_semantic(json_path: str | Path, image_dir: str | Path | None = None,
                       categories: list[dict[str, Any]] | None = None,
                       ignore_index: int = 255) -> SegmentationSource:
    """A COCO instances JSON as semantic masks: label 0 = background, 1..C = the categories in id
    order (or in the order of ``categories``, a checkpoint's ``[{"id", "name"}]`` without
    background), so ``K = C + 1`` with names ``["background", *names]``. Crowd regions become
    ``ignore_index``; overlaps: see ``rasterize_coco``. Annotations without a segmentation are
    left out (counted in the report). ``image_dir`` is found next to the JSON when not given."""
    coco = read_coco_file(json_path, image_dir, categories, require_bbox=False)
    label_of = {cid: label + 1 for cid, label in coco.label_of.items()}
    sizes = {im.id: (im.height, im.width) for im in coco.images}
    objects: dict[int, list[tuple[float, int, Any]]] = {im.id: [] for im in coco.images}
    crowds: dict[int, list[Any]] = {im.id: [] for im in coco.images}
    no_shape = 0
    for a in coco.annotations:
        seg = a.entry.get("segmentation")
        shape = _coco_shape(seg, *sizes[a.image_id], f"{coco.path}: {a.where}") if seg else None
        if shape is None:
            no_shape += 1
            continue
        if a.iscrowd:
            crowds[a.image_id].append(shape)
        else:
            area = float(a.entry["area"]) if "area" in a.entry else \
                a.bbox[2] * a.bbox[3] if a.bbox is not None else 0.0
            objects[a.image_id].append((area, label_of[a.category_id], shape))
    if coco.annotations and no_shape == len(coco.annotations):
        raise DataError(f"{coco.path}: no annotation has a 'segmentation' (a detection-only file?); semantic "
                        "masks need polygons or RLE")

    pairs, shapes = [], []
    for im in coco.images:
        objs = sorted(objects[im.id], key=lambda o: -o[0])  # largest first: smaller objects drawn on top
        drawn = [(label, shape) for _, label, shape in objs] + [(ignore_index, s) for s in crowds[im.id]]
        pairs.append((im.path, None))
        shapes.append(CocoShapes(im.height, im.width, drawn))
    report = SkipReport()
    if no_shape:
        report.add(coco.path, f"{no_shape} annotations without a segmentation left out of the masks")
    return SegmentationSource(str(coco.path), pairs, ["background", *[c["name"] for c in coco.categories]],
                              ignore_index, "coco", shapes, report, [dict(c) for c in coco.categories])
