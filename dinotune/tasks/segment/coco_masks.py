"""COCO instances JSON rasterised to semantic masks: 0 = background, 1..C = categories in id order
(non-contiguous ids mapped), crowd regions = ignore. Drawing happens lazily in
``sources.rasterize_coco``; this module validates the JSON and keeps compact shapes per image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dinotune.data.images import SkipReport, header_size
from dinotune.tasks.detect.coco import (
    DataError,
    _entry,
    _find_image_dir,
    _id_list,
    _is_int,
    _is_number,
    _short,
    check_categories,
    load_json,
)
from dinotune.tasks.segment.sources import _SHOW, CocoShapes, SegmentationSource

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
                raise DataError(f"{where}: segmentation polygons must be lists of numbers, got {_short(p)}") from None
            if len(arr) >= 6 and np.isfinite(arr).all():
                polys.append(arr)
        return polys or None
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        size = seg["size"]
        if not (isinstance(size, list) and len(size) == 2 and [int(v) for v in size] == [h, w]):
            raise DataError(f"{where}: RLE size {_short(size)} differs from the image's [height, width] [{h}, {w}]")
        if isinstance(seg["counts"], list):
            return mask_utils.frPyObjects(seg, h, w)
        counts = seg["counts"]
        return {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    raise DataError(f"{where}: segmentation must be a list of polygons or an RLE dict, got {_short(seg)}")


def read_coco_semantic(json_path: str | Path, image_dir: str | Path | None = None,
                       categories: list[dict[str, Any]] | None = None,
                       ignore_index: int = 255) -> SegmentationSource:
    """A COCO instances JSON as semantic masks: label 0 = background, 1..C = the categories in id
    order (or in the order of ``categories``, a checkpoint's ``[{"id", "name"}]`` without
    background), so ``K = C + 1`` with names ``["background", *names]``. Crowd regions become
    ``ignore_index``; overlaps: see ``rasterize_coco``. Annotations without a segmentation are
    left out (counted in the report). ``image_dir`` is found next to the JSON when not given."""
    json_path = Path(json_path).expanduser()
    where = str(json_path)
    data = load_json(json_path)
    keys = ("images", "annotations", "categories")
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in keys):
        raise DataError(f"{where}: expected a COCO instances object with 'images', 'annotations' and "
                        "'categories' lists")
    file_cats: dict[int, str] = {}
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not _is_int(c.get("id")):
            raise DataError(f"{where}: {_entry('categories', i, c)}: needs an integer 'id', got {_short(c)}")
        file_cats[c["id"]] = str(c.get("name", c["id"]))
    cats = check_categories(categories, "checkpoint categories") if categories is not None else \
        [{"id": cid, "name": file_cats[cid]} for cid in sorted(file_cats)]
    label_of = {c["id"]: i + 1 for i, c in enumerate(cats)}

    entries: dict[int, dict[str, Any]] = {}
    for i, e in enumerate(data["images"]):
        if not isinstance(e, dict) or not _is_int(e.get("id")) or not isinstance(e.get("file_name"), str):
            raise DataError(f"{where}: {_entry('images', i, e)}: needs an integer 'id' and a 'file_name'")
        if e["id"] in entries:
            raise DataError(f"{where}: {_entry('images', i, e)}: duplicate image id")
        entries[e["id"]] = e
    folder = Path(image_dir).expanduser() if image_dir else _find_image_dir(
        json_path, [e["file_name"] for e in entries.values()])
    if not folder.is_dir():
        raise DataError(f"{where}: image folder {folder} does not exist")
    missing = [str(folder / e["file_name"]) for e in entries.values() if not (folder / e["file_name"]).is_file()]
    if missing:
        raise DataError(f"{where}: {len(missing)} of {len(entries)} image files are missing (image folder {folder}): "
                        + "; ".join(missing[:_SHOW]) + (" ..." if len(missing) > _SHOW else ""))
    sizes: dict[int, tuple[int, int]] = {}
    for i, e in entries.items():
        h, w = e.get("height"), e.get("width")
        if not (_is_number(h) and _is_number(w) and h > 0 and w > 0):
            size = header_size(folder / e["file_name"])
            if size is None:
                raise DataError(f"{where}: image id {i} has no width/height and {folder / e['file_name']} "
                                "cannot be opened to read them")
            w, h = size
        sizes[i] = (int(h), int(w))

    objects: dict[int, list[tuple[float, int, Any]]] = {i: [] for i in entries}
    crowds: dict[int, list[Any]] = {i: [] for i in entries}
    no_shape = 0
    for i, a in enumerate(data["annotations"]):
        name = f"{where}: {_entry('annotations', i, a)}"
        if not isinstance(a, dict) or not _is_int(a.get("image_id")) or not _is_int(a.get("category_id")):
            raise DataError(f"{name}: needs integer 'image_id' and 'category_id'")
        if a["image_id"] not in entries:
            raise DataError(f"{name}: image_id {a['image_id']} is not among the images")
        if a["category_id"] not in label_of:
            known = "the checkpoint's" if categories is not None else "the file's"
            raise DataError(f"{name}: category_id {a['category_id']} is not among {known} categories "
                            f"(ids {_id_list(label_of)})")
        h, w = sizes[a["image_id"]]
        shape = _coco_shape(a.get("segmentation"), h, w, name) if a.get("segmentation") else None
        if shape is None:
            no_shape += 1
            continue
        if a.get("iscrowd", 0):
            crowds[a["image_id"]].append(shape)
        else:
            bbox = a.get("bbox")
            area = float(a["area"]) if _is_number(a.get("area")) else \
                float(bbox[2] * bbox[3]) if isinstance(bbox, list) and len(bbox) == 4 else 0.0
            objects[a["image_id"]].append((area, label_of[a["category_id"]], shape))
    if data["annotations"] and no_shape == len(data["annotations"]):
        raise DataError(f"{where}: no annotation has a 'segmentation' (a detection-only file?); semantic "
                        "masks need polygons or RLE")

    pairs, coco = [], []
    for i, e in entries.items():
        objs = sorted(objects[i], key=lambda o: -o[0])  # largest first: smaller objects drawn on top
        shapes = [(label, shape) for _, label, shape in objs] + [(ignore_index, s) for s in crowds[i]]
        pairs.append((folder / e["file_name"], None))
        coco.append(CocoShapes(*sizes[i], shapes))
    report = SkipReport()
    if no_shape:
        report.add(json_path, f"{no_shape} annotations without a segmentation left out of the masks")
    return SegmentationSource(where, pairs, ["background", *[c["name"] for c in cats]], ignore_index, "coco",
                              coco, report, [dict(c) for c in cats])

