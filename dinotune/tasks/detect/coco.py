"""Detection data in memory (``DetectionSource``) and COCO instances JSON read into it.

Every source (COCO JSON, YOLO folder, Pascal VOC XML) becomes one ``DetectionSource``: image records, boxes in
original-image pixels (``xyxy``) with contiguous labels and original category ids, the category
list in label order, counters of what was clamped / dropped, and ``coco_gt()`` for pycocotools.
The JSON itself is validated by the shared reader (``dinotune.data.coco``), which the
segmentation task's COCO masks use too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


from dinotune.data.coco import CocoFile, read_coco_file
from dinotune.data.images import SkipReport
from dinotune.utils import info

__all__ = ["ImageRecord", "Annotation", "DetectionReport", "DetectionSource", "read_coco", "coco_source", "clamp_box"]


@dataclass
class ImageRecord:
    id: int
    path: Path
    width: int
    height: int
    file_name: str = ""


@dataclass
class Annotation:
    """One object: ``bbox`` is ``xyxy`` in original-image pixels, already clamped to the image."""

    bbox: tuple[float, float, float, float]
    label: int  # contiguous class index 0..K-1
    category_id: int  # the dataset's own id
    iscrowd: bool = False
    area: float = 0.0
    id: int = 0


@dataclass
class DetectionReport:
    """What reading changed or left out. ``skipped`` lists image files that were left out."""

    clamped: int = 0  # boxes reaching outside the image, clamped to it and kept
    dropped: int = 0  # boxes still degenerate after clamping (smaller than min_box_size), dropped
    crowd: int = 0  # iscrowd regions: kept for evaluation, never training targets
    empty_images: int = 0  # images with no box to train on (kept: they are valid negatives)
    skipped: SkipReport = field(default_factory=SkipReport)
    difficult: int = 0  # Pascal VOC "difficult" objects: kept for evaluation as crowd regions are, never trained

    def admit(self, box: tuple[float, float, float, float] | None, clamped: bool, crowd: bool = False) -> bool:
        """Count one object as ``clamp_box`` left it (``box`` None: degenerate) and say whether it is
        kept: a crowd region when it still has a box (counted as crowd either way), any other object
        unless degenerate (counted as dropped, or as clamped when it was)."""
        if crowd:
            self.crowd += 1
            return box is not None
        if box is None:
            self.dropped += 1
            return False
        self.clamped += int(clamped)
        return True

    def summary(self) -> str:
        parts = [f"{self.clamped} boxes clamped to the image", f"{self.dropped} degenerate boxes dropped",
                 f"{self.crowd} crowd regions (evaluation only)", f"{self.empty_images} images without objects"]
        if self.difficult:
            parts.insert(3, f"{self.difficult} of them VOC 'difficult' objects")
        if len(self.skipped):
            parts.append(f"{len(self.skipped)} images skipped")
        return ", ".join(parts)

    def print(self, what: str = "") -> None:
        self.skipped.print("images")
        info((f"{what}: " if what else "") + self.summary())


@dataclass
class DetectionSource:
    """Images, their boxes and the categories of one split of a detection dataset."""

    name: str  # the file or folder it came from (for messages and subset files)
    images: list[ImageRecord]
    annotations: dict[int, list[Annotation]]  # image id -> objects (crowd regions flagged, not removed)
    categories: list[dict[str, Any]]  # {"id", "name"} in label order
    report: DetectionReport = field(default_factory=DetectionReport)
    # COCO sources: the original image entries and annotations (segmentation dropped to save memory
    # unless kept, see ``coco_source``) for evaluation; None for sources whose ground truth is
    # synthesised from ``annotations``.
    gt_images: dict[int, dict[str, Any]] | None = None
    gt_annotations: dict[int, list[dict[str, Any]]] | None = None

    def __len__(self) -> int:
        return len(self.images)

    @property
    def category_index(self) -> dict[int, int]:
        """category id -> contiguous label."""
        return {int(c["id"]): i for i, c in enumerate(self.categories)}

    @property
    def class_names(self) -> list[str]:
        return [str(c["name"]) for c in self.categories]

    @property
    def image_ids(self) -> list[int]:
        return [im.id for im in self.images]

    def num_boxes(self) -> int:
        """Training boxes (crowd regions not counted)."""
        return sum(1 for im in self.images for a in self.annotations.get(im.id, ()) if not a.iscrowd)

    def boxes_per_class(self) -> list[int]:
        """Training boxes of each class, in label order (crowd regions not counted)."""
        counts = [0] * len(self.categories)
        for im in self.images:
            for a in self.annotations.get(im.id, ()):
                if not a.iscrowd:
                    counts[a.label] += 1
        return counts

    def targets(self, image_id: int) -> list[Annotation]:
        """The objects of one image a model is trained on (no crowd regions)."""
        return [a for a in self.annotations.get(image_id, ()) if not a.iscrowd]

    def with_images(self, images: list[ImageRecord]) -> DetectionSource:
        keep = {im.id for im in images}
        return replace(
            self,
            images=list(images),
            annotations={i: a for i, a in self.annotations.items() if i in keep},
            gt_images=None if self.gt_images is None else {i: e for i, e in self.gt_images.items() if i in keep},
            gt_annotations=None if self.gt_annotations is None
            else {i: a for i, a in self.gt_annotations.items() if i in keep},
        )

    def coco_gt(self) -> dict[str, Any]:
        """A COCO instances dict of exactly these images, for pycocotools (``COCO()``, then
        ``coco.dataset = gt; coco.createIndex()``). COCO sources keep their original annotations
        (crowd regions and ids included); other sources get synthesised ones."""
        cats = [{"id": int(c["id"]), "name": str(c["name"])} for c in self.categories]
        if self.gt_images is not None and self.gt_annotations is not None:
            images = [self.gt_images[im.id] for im in self.images]
            anns = [a for im in self.images for a in self.gt_annotations.get(im.id, ())]
        else:
            images = [{"id": im.id, "file_name": im.file_name or im.path.name, "width": im.width,
                       "height": im.height} for im in self.images]
            anns = []
            for im in self.images:
                for a in self.annotations.get(im.id, ()):
                    x0, y0, x1, y1 = a.bbox
                    anns.append({"id": len(anns) + 1, "image_id": im.id, "category_id": a.category_id,
                                 "bbox": [x0, y0, x1 - x0, y1 - y0], "area": a.area or (x1 - x0) * (y1 - y0),
                                 "iscrowd": int(a.iscrowd)})
        return {"info": {"description": f"dinotune ground truth of {self.name}"}, "licenses": [],
                "images": images, "annotations": anns, "categories": cats}


# ----------------------------------------------------------------------------------- shared checks
def clamp_box(x0: float, y0: float, x1: float, y1: float, width: float, height: float,
              min_size: float) -> tuple[tuple[float, float, float, float] | None, bool]:
    """Clamp an ``xyxy`` box into the image. Returns ``(box or None if degenerate, was_clamped)``."""
    c = (min(max(x0, 0.0), width), min(max(y0, 0.0), height),
         min(max(x1, 0.0), width), min(max(y1, 0.0), height))
    if c[2] - c[0] < min_size or c[3] - c[1] < min_size or c[2] - c[0] <= 0 or c[3] - c[1] <= 0:
        return None, False
    clamped = any(abs(a - b) > 1e-3 for a, b in zip(c, (x0, y0, x1, y1)))
    return c, clamped


# ------------------------------------------------------------------------------------ COCO reading
def read_coco(
    json_path: str | Path,
    image_dir: str | Path | None,
    categories: list[dict[str, Any]] | None,
    min_box_size: float,
) -> DetectionSource:
    """A COCO instances JSON (validated by ``read_coco_file``) as a detection source: boxes
    clamped into their image, degenerate ones (after clamping, below ``min_box_size``) dropped,
    crowd regions kept for evaluation only, everything counted in the report. Without
    ``categories`` the file's unused parent categories (a Roboflow export's supercategory) are left
    out, said in one line (see ``dinotune.data.coco.unused_parents``); with them (the training
    split's when reading validation data, a checkpoint's at evaluation) labels follow that list."""
    coco = read_coco_file(json_path, image_dir, categories, require_bbox=True, drop_unused_parents=True)
    return coco_source(coco, min_box_size)


def coco_source(coco: CocoFile, min_box_size: float, *, keep_segmentation: bool = False) -> DetectionSource:
    """The detection source of a validated COCO file (``read_coco`` after ``read_coco_file``; a task
    that checks more, such as masks, edits ``coco.annotations`` in between). Every annotation needs
    a ``bbox`` here. ``keep_segmentation``: the evaluation ground truth keeps each annotation's
    ``segmentation`` (mask AP needs it); off, it is dropped to save memory (box AP does not)."""
    if coco.dropped:
        info(f"{coco.path}: left out {len(coco.dropped)} categor{'y' if len(coco.dropped) == 1 else 'ies'} with no "
             "boxes that other categories name as their supercategory (a grouping, not a class): "
             + ", ".join(f"id {c['id']} {c['name']!r} (parent of {c['children']})" for c in coco.dropped))
    label_of = coco.label_of
    records = [ImageRecord(im.id, im.path, im.width, im.height, im.file_name) for im in coco.images]
    size_of = {r.id: (r.width, r.height) for r in records}
    report = DetectionReport()
    annotations: dict[int, list[Annotation]] = {r.id: [] for r in records}
    gt_annotations: dict[int, list[dict[str, Any]]] = {r.id: [] for r in records}
    for i, a in enumerate(coco.annotations):
        if a.bbox is None:
            raise ValueError(f"{coco.path}: {a.where} has no bbox (read with require_bbox, or fill it in first)")
        x, y, w, h = a.bbox
        # masks are not needed for box AP: dropped unless asked for
        gt = {k: v for k, v in a.entry.items() if keep_segmentation or k != "segmentation"}
        gt.setdefault("id", i + 1)
        gt.setdefault("iscrowd", 0)
        gt.setdefault("area", max(w, 0.0) * max(h, 0.0))
        gt.setdefault("bbox", [x, y, w, h])
        gt_annotations[a.image_id].append(gt)
        width, height = size_of[a.image_id]
        box, clamped = clamp_box(x, y, x + w, y + h, width, height, min_box_size)
        if not report.admit(box, clamped, a.iscrowd):
            continue
        area = float(a.entry["area"]) if "area" in a.entry else (box[2] - box[0]) * (box[3] - box[1])
        annotations[a.image_id].append(Annotation(box, label_of[a.category_id], a.category_id, a.iscrowd,
                                                  area, int(gt["id"])))
    report.empty_images = sum(1 for r in records if not any(not a.iscrowd for a in annotations[r.id]))
    gt_images = {im.id: dict(im.entry) for im in coco.images}
    for r in records:  # width / height read from the headers when the file lacks them
        gt_images[r.id].setdefault("width", r.width)
        gt_images[r.id].setdefault("height", r.height)
    return DetectionSource(str(coco.path), records, annotations, coco.categories, report, gt_images, gt_annotations)
