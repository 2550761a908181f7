"""Instance segmentation data in memory (``InstanceSource``) and its readers: COCO instances JSON
with polygon / RLE masks, and YOLO-seg polygon labels, found by detection's rules.

An ``InstanceSource`` is a ``DetectionSource`` (boxes, labels, categories, report, ground truth)
plus ``segmentations``: annotation id (``Annotation.id``) -> its COCO ``segmentation`` in ORIGINAL
image pixels, a polygon list ``[[x0, y0, x1, y1, ...], ...]`` or an RLE dict ``{"size": [h, w],
"counts": str | list}``. Nothing is rasterised here (``data.py`` decodes one item's masks at a
time).

Masks come from untrusted files, so each one is checked before it is kept (``check_segmentation``);
an annotation whose mask cannot be trusted is left out (never trained on a wrong mask, never in the
evaluation ground truth), counted in ``mask_report``, and a warning names the file, the annotation
and the problem (the first few; the rest counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dinotune.data.coco import CocoAnnotation, is_int, read_coco_file, short
from dinotune.errors import DataError
from dinotune.tasks.detect.coco import DetectionSource, ImageRecord, coco_source
from dinotune.tasks.detect.data import locate_detection_data
from dinotune.tasks.detect.yolo import read_yolo_polygons
from dinotune.tasks.instance.masks import area as mask_area
from dinotune.tasks.instance.masks import mask_box
from dinotune.utils import info, warn

__all__ = ["InstanceSource", "MaskReport", "read_coco_instances", "read_yolo_instances", "find_instance_data",
           "check_segmentation", "segmentation_box"]

SHOW = 5  # how many left-out annotations a warning names


@dataclass
class MaskReport:
    """What reading the masks left out or filled in (beside ``DetectionReport``'s box counts)."""

    skipped: int = 0  # annotations left out: no usable mask (also not in the evaluation ground truth)
    examples: list[str] = field(default_factory=list)  # the first SHOW of them, "where: problem"
    parts_dropped: int = 0  # broken polygon parts left out of annotations that kept valid ones
    boxes_from_masks: int = 0  # annotations without a bbox: their box is the mask's extent
    renumbered: int = 0  # annotations without an integer id, or with a duplicate one: given a fresh id

    def skip(self, where: str, problem: str) -> None:
        self.skipped += 1
        if len(self.examples) < SHOW:
            self.examples.append(f"{where}: {problem}")

    def summary(self) -> str:
        if not self.skipped:
            return "no annotation left out for its mask"
        more = self.skipped - len(self.examples)
        return (f"{self.skipped} annotation(s) left out, no usable mask (not trained on, not evaluated): "
                + "; ".join(self.examples) + (f"; ... and {more} more" if more else ""))

    def print(self, name: str) -> None:
        if self.skipped:
            warn(f"{name}: {self.summary()}")
        notes = [f"{self.parts_dropped} broken polygon part(s) left out of masks that kept their valid parts"
                 if self.parts_dropped else "",
                 f"{self.boxes_from_masks} box(es) taken from the mask's extent (no bbox given)"
                 if self.boxes_from_masks else "",
                 f"{self.renumbered} annotation(s) without an integer id or with a duplicate one given fresh ids"
                 if self.renumbered else ""]
        if any(notes):
            info(f"{name}: " + ", ".join(n for n in notes if n))


@dataclass
class InstanceSource(DetectionSource):
    """A detection source whose every training object (``targets(image_id)``) and crowd region has
    a ``segmentation`` (annotation id -> COCO polygons or RLE in original pixels)."""

    segmentations: dict[int, Any] = field(default_factory=dict)
    mask_report: MaskReport = field(default_factory=MaskReport)

    def with_images(self, images: list[ImageRecord]) -> InstanceSource:
        out = super().with_images(images)  # dataclasses.replace: still an InstanceSource
        kept = {a.id for anns in out.annotations.values() for a in anns}
        return replace(out, segmentations={i: s for i, s in self.segmentations.items() if i in kept})

    def coco_gt(self) -> dict[str, Any]:
        """``DetectionSource.coco_gt`` with every annotation's ``segmentation`` (crowd regions
        included: pycocotools ignores them for masks as for boxes). COCO sources keep the file's
        entries (their masks checked, see ``read_coco_instances``); others get synthesised ones whose
        ids are the annotation ids and whose ``area`` is the mask's."""
        gt = super().coco_gt()
        if self.gt_images is not None and self.gt_annotations is not None:
            return gt
        anns = []
        for im in self.images:
            for a in self.annotations.get(im.id, ()):
                if a.id not in self.segmentations:
                    raise ValueError(f"{self.name}: annotation id {a.id} of image {im.id} has no segmentation")
                x0, y0, x1, y1 = a.bbox
                anns.append({"id": a.id, "image_id": im.id, "category_id": a.category_id,
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": a.area or (x1 - x0) * (y1 - y0),
                             "iscrowd": int(a.iscrowd), "segmentation": self.segmentations[a.id]})
        gt["annotations"] = anns
        return gt


# ------------------------------------------------------------------------------------ mask checks
def check_segmentation(seg: Any, height: int, width: int) -> tuple[Any, str | None, int]:
    """Check a COCO ``segmentation`` of an ``height x width`` image. Returns ``(segmentation to keep,
    None, broken polygon parts left out)``, or ``(None, the problem, 0)`` when nothing usable is left.

    Polygons: a list of ``[x0, y0, x1, y1, ...]`` lists, each of at least 3 points (6 numbers), an
    even count, finite numbers, within one image size of the image (x in [-W, 2W], y in [-H, 2H]:
    pycocotools' rasteriser works along the outline, so far-away points would cost memory and time).
    Broken parts are left out when others are valid. RLE: ``size`` equal to the image's
    ``[height, width]`` and counts (a list, or pycocotools' compressed string) of non-negative runs
    that sum to ``height * width`` (pycocotools decodes a short one into uninitialised memory)."""
    if seg is None or (isinstance(seg, (list, dict)) and not seg):
        return None, "no segmentation", 0
    if isinstance(seg, dict):
        problem = _rle_problem(seg, height, width)
        return (None, problem, 0) if problem else (seg, None, 0)
    if not isinstance(seg, list):
        return None, f"segmentation must be a list of polygons or an RLE dict, got {short(seg, 60)}", 0
    if not any(isinstance(p, (list, tuple)) for p in seg):
        return None, f"polygons must be a list of [x0, y0, x1, y1, ...] lists, got {short(seg, 60)}", 0
    keep, problems = [], []
    for k, part in enumerate(seg):
        problem = _polygon_problem(part, height, width)
        if problem:
            problems.append(f"polygon {k} {problem}")
        else:
            keep.append(part)
    if not keep:
        return None, "; ".join(problems[:2]) + (f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""), 0
    return keep, None, len(problems)


def _polygon_problem(part: Any, height: int, width: int) -> str | None:
    if not isinstance(part, (list, tuple)):
        return f"is not a list of numbers: {short(part, 40)}"
    if len(part) < 6:
        return f"has {len(part)} numbers (a polygon needs at least 3 points, 6 numbers)"
    if len(part) % 2:
        return f"has an odd count of numbers ({len(part)}), not x, y pairs"
    try:
        arr = np.asarray(part)  # no dtype: strings and None stay non-numeric and are caught here
    except (ValueError, TypeError):  # ragged nesting
        arr = np.asarray([], dtype=object)
    if arr.ndim != 1 or arr.dtype.kind not in "iuf" or not np.isfinite(arr).all():
        return f"holds values that are not finite numbers: {short(part, 40)}"
    xs, ys = arr[0::2], arr[1::2]
    if xs.min() < -width or xs.max() > 2 * width or ys.min() < -height or ys.max() > 2 * height:
        return f"has points far outside the {width}x{height} image"
    return None


def _rle_problem(seg: dict[str, Any], height: int, width: int) -> str | None:
    size, counts = seg.get("size"), seg.get("counts")
    if size is None or counts is None:
        return f"an RLE needs 'size' and 'counts', got the keys {sorted(map(str, seg))}"
    if not (isinstance(size, list) and len(size) == 2 and all(is_int(v) for v in size)):
        return f"RLE size must be [height, width], got {short(size, 40)}"
    if size != [height, width]:
        return f"RLE size {size} is not its image's [height, width] [{height}, {width}]"
    if isinstance(counts, list):
        try:
            arr = np.asarray(counts)
        except (ValueError, TypeError):  # ragged nesting
            arr = np.asarray([], dtype=object)
        if arr.ndim != 1 or arr.dtype.kind not in "iu" or (arr < 0).any():
            return f"RLE counts must be non-negative integers, got {short(counts, 40)}"
        total = sum(counts)  # Python integers: no overflow to fake the right total
    elif isinstance(counts, str):
        runs = _compressed_counts(counts)
        if runs is None:
            return f"RLE counts {short(counts, 40)} is not a valid compressed RLE string"
        total = int(runs.sum())
    else:
        return f"RLE counts must be a list of integers or a compressed string, got {short(counts, 40)}"
    if total != height * width:
        return f"RLE counts cover {total} pixels, not height x width = {height * width}"
    return None


def _compressed_counts(text: str) -> np.ndarray | None:
    """The run lengths of pycocotools' compressed RLE string (its ``rleFrString``: each run a
    little-endian sequence of 5-bit groups, one character each (value + 48); 0x20 says more
    follow, 0x10 on the last makes it negative; from the third run on, each is stored as the
    difference to the run two before). pycocotools has no call that returns them and decodes a
    string whose runs fall short of the mask without complaint, hence this check. None if
    malformed (bad characters, cut off, a run negative or over 32 bits)."""
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        return None
    c = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0 or (c < 0).any() or (c > 63).any():
        return None
    last = (c & 0x20) == 0  # the last character of each run
    if not last[-1]:
        return None
    ends = np.flatnonzero(last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 7:  # over 35 bits: no real run
        return None
    pos = np.arange(c.size) - np.repeat(starts, lengths)
    x = np.add.reduceat((c & 0x1F) << (5 * pos), starts)
    negative = (c[ends] & 0x10) != 0
    x[negative] -= np.left_shift(1, 5 * lengths[negative])
    runs = x.copy()
    runs[1::2] = np.cumsum(x[1::2])  # run 3 = x3 + run 1, run 5 = x5 + run 3, ...
    runs[2::2] = np.cumsum(x[2::2])  # run 4 = x4 + run 2, ...
    if (runs < 0).any() or (runs >= 2**32).any():
        return None
    return runs


def segmentation_box(seg: Any, height: int, width: int) -> tuple[float, float, float, float]:
    """``xywh`` extent of a checked segmentation: the polygons' points, or the RLE's pixels."""
    if isinstance(seg, list):
        pts = np.concatenate([np.asarray(p, dtype=np.float64) for p in seg]).reshape(-1, 2)
        (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
        return float(x0), float(y0), float(x1 - x0), float(y1 - y0)
    x, y, w, h = mask_box(seg, (height, width))
    return x, y, w, h


# ---------------------------------------------------------------------------------------- readers
def read_coco_instances(json_path: str | Path, image_dir: str | Path | None,
                        categories: list[dict[str, Any]] | None, min_box_size: float) -> InstanceSource:
    """A COCO instances JSON with masks (polygons, RLE with compressed or list counts) as an
    instance source: the file validated by ``read_coco_file``, every annotation's mask checked
    (``check_segmentation``; left out and reported when unusable), a missing ``bbox`` taken from the
    mask's extent and a missing ``area`` from its pixels, then boxes as ``read_coco`` makes them
    (crowd regions evaluation-only). The evaluation ground truth keeps the (checked) masks."""
    coco = read_coco_file(json_path, image_dir, categories, require_bbox=False, drop_unused_parents=True)
    sizes = {im.id: (im.height, im.width) for im in coco.images}
    report = MaskReport()
    kept, segmentations = [], {}
    for a, aid in zip(coco.annotations, _unique_ids(coco.annotations, report)):
        h, w = sizes[a.image_id]
        seg, problem, dropped = check_segmentation(a.entry.get("segmentation"), h, w)
        if problem:
            report.skip(a.where, problem)
            continue
        report.parts_dropped += dropped
        entry = {**a.entry, "id": aid, "segmentation": seg}
        bbox = a.bbox
        if bbox is None:
            bbox = segmentation_box(seg, h, w)
            entry["bbox"] = list(bbox)
            report.boxes_from_masks += 1
        if "area" not in entry:  # COCO's small / medium / large go by the mask's area
            entry["area"] = float(mask_area(seg, (h, w)))
        kept.append(replace(a, bbox=bbox, entry=entry))
        segmentations[aid] = seg
    if coco.annotations and not kept:
        raise DataError(f"{coco.path}: none of its {len(coco.annotations)} annotations has a usable mask "
                        f"(instance segmentation needs polygons or RLE; a detection-only file?): "
                        + "; ".join(report.examples))
    report.print(str(coco.path))
    return _instance_source(coco_source(replace(coco, annotations=kept), min_box_size, keep_segmentation=True),
                            segmentations, report)


def read_yolo_instances(root: str | Path, split: Literal["train", "val", "test"],
                        categories: list[dict[str, Any]] | None, min_box_size: float) -> InstanceSource:
    """One split of a YOLO-seg folder (or its ``data.yaml``): lines ``class x1 y1 ... xn yn``
    (normalised, n >= 3), box = the polygon's extent, mask = the polygon (one part, in pixels).
    Plain box lines (``class cx cy w h``) have no mask: left out and reported."""
    got = read_yolo_polygons(root, split, categories, min_box_size, show=SHOW)
    source = got.source
    report = MaskReport(skipped=got.box_only,
                        examples=[f"{where}: a box line (class cx cy w h) has no polygon to make a mask from"
                                  for where in got.box_only_lines])
    if got.box_only and not got.polygons:
        raise DataError(f"{source.name}: every label line is a box (class cx cy w h); instance segmentation needs "
                        f"YOLO-seg polygon lines (class x1 y1 ... xn yn), e.g. {got.box_only_lines[0]}")
    for im in source.images:  # COCO's small / medium / large go by the mask's area
        for a in source.annotations.get(im.id, ()):
            a.area = float(mask_area(got.polygons[a.id], (im.height, im.width)))
    report.print(source.name)
    return _instance_source(source, got.polygons, report)


def find_instance_data(
    data: str | Path,
    split: Literal["train", "val", "test"],
    images: str | Path = "",
    *,
    categories: list[dict[str, Any]] | None = None,
    min_box_size: float,
    val_fraction: float = 0.0,
    seed: int = 0,
) -> InstanceSource:
    """One split, found as ``find_detection_data`` finds it (a COCO JSON, a folder holding
    ``_annotations.coco.json``, a COCO folder with ``annotations/instances_<split>*.json``, a YOLO
    ``data.yaml`` or its folder). Pascal VOC XML has boxes only: refused. ``val_fraction`` / ``seed``
    are accepted for the same signature (they only split VOC folders)."""
    del val_fraction, seed
    kind, path = locate_detection_data(data, split, what="instance segmentation")
    if kind == "coco":
        return read_coco_instances(path, images or None, categories, min_box_size)
    if kind == "yolo":
        return read_yolo_instances(path, split, categories, min_box_size)
    raise DataError(f"{path}: a Pascal VOC folder (Annotations/*.xml) has boxes but no instance masks; instance "
                    "segmentation needs COCO JSON with polygons / RLE or YOLO-seg polygon labels")


def _unique_ids(annotations: list[CocoAnnotation], report: MaskReport) -> list[int]:
    """An id per annotation: its own when it is an integer not used before, else a fresh one
    above every id in the file (masks are looked up by id, so two must never share one)."""
    fresh = max((a.entry["id"] for a in annotations if is_int(a.entry.get("id"))), default=0) + 1
    seen: set[int] = set()
    out = []
    for a in annotations:
        aid = a.entry.get("id")
        if not is_int(aid) or aid in seen:
            aid, fresh = fresh, fresh + 1
            report.renumbered += 1
        seen.add(aid)
        out.append(aid)
    return out


def _instance_source(source: DetectionSource, segmentations: dict[int, Any], report: MaskReport) -> InstanceSource:
    """``source`` as an ``InstanceSource``, with the masks of its annotations (training and crowd)."""
    used = {a.id for anns in source.annotations.values() for a in anns}
    return InstanceSource(**{f.name: getattr(source, f.name) for f in fields(DetectionSource)},
                          segmentations={i: s for i, s in segmentations.items() if i in used}, mask_report=report)
