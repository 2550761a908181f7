"""Detection data in memory (``DetectionSource``) and the COCO instances-JSON reader.

Every source (COCO JSON, YOLO folder) becomes one ``DetectionSource``: image records, boxes in
original-image pixels (``xyxy``) with contiguous labels and original category ids, the category
list in label order, counters of what was clamped / dropped, and ``coco_gt()`` for pycocotools.
Errors are ``DataError`` naming the file and the entry, e.g.
``instances_val2017.json: annotations[17] (id 123): bbox must be 4 numbers, got [1, 2, 3]``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable


from dinotune.data.images import SkipReport, header_size
from dinotune.tasks.classify.data import DataError
from dinotune.utils import info

__all__ = [
    "DataError", "ImageRecord", "Annotation", "DetectionReport", "DetectionSource", "read_coco",
    "clamp_box", "check_categories",
]

_SHOW = 5  # how many offending entries an error message lists


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

    def summary(self) -> str:
        parts = [f"{self.clamped} boxes clamped to the image", f"{self.dropped} degenerate boxes dropped",
                 f"{self.crowd} crowd regions (evaluation only)", f"{self.empty_images} images without objects"]
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
    # COCO sources: the original image entries and annotations (segmentation dropped to save memory)
    # for evaluation; None for sources whose ground truth is synthesised from ``annotations``.
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


def check_categories(categories: Iterable[Any], where: str) -> list[dict[str, Any]]:
    """A checkpoint's category list, validated: ``[{"id": int, "name": str}, ...]``."""
    out, seen = [], set()
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or not _is_int(c.get("id")):
            raise DataError(f"{where}: categories[{i}] must be a dict with an integer 'id', got {_short(c)}")
        if c["id"] in seen:
            raise DataError(f"{where}: categories[{i}]: duplicate category id {c['id']}")
        seen.add(c["id"])
        out.append({"id": int(c["id"]), "name": str(c.get("name", c["id"]))})
    return out


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _short(v: Any, limit: int = 80) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _entry(kind: str, index: int, entry: Any) -> str:
    ident = entry.get("id") if isinstance(entry, dict) else None
    return f"{kind}[{index}]" + (f" (id {ident})" if ident is not None else "")


# ------------------------------------------------------------------------------------ COCO reading
def load_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the file ({exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON at line {exc.lineno} column {exc.colno} (char {exc.pos}): {exc.msg}"
            + (" (the file looks truncated)" if not text.rstrip().endswith(("}", "]")) else "")
        ) from None


def _image_dir_candidates(json_path: Path) -> list[Path]:
    stem = json_path.stem
    split = stem.split("_", 1)[1] if stem.startswith("instances_") and "_" in stem else stem
    parent = json_path.parent
    root = parent.parent if parent.name.lower() == "annotations" else parent
    cands = [root / split, root / "images" / split, root / "images", root, parent]
    return list(dict.fromkeys(cands))


def _find_image_dir(json_path: Path, file_names: list[str]) -> Path:
    """The folder that holds the images of ``json_path`` (the candidate with most of the first
    images present), or DataError listing where it looked."""
    sample = file_names[:20]
    best, best_hits = None, 0
    for cand in _image_dir_candidates(json_path):
        if not cand.is_dir():
            continue
        hits = sum((cand / f).is_file() for f in sample)
        if hits > best_hits:
            best, best_hits = cand, hits
    if best is None:
        looked = ", ".join(str(c) for c in _image_dir_candidates(json_path))
        raise DataError(
            f"{json_path}: cannot find its image folder (looked for {sample[0] if sample else 'images'} "
            f"in {looked}); pass the folder explicitly (--train-images / --val-images)"
        )
    return best



def read_coco(
    json_path: str | Path,
    image_dir: str | Path | None = None,
    categories: list[dict[str, Any]] | None = None,
    min_box_size: float = 1.0,
) -> DetectionSource:
    """Read a COCO instances JSON. ``image_dir`` is found next to the JSON when not given
    (``.../annotations/instances_val2017.json`` -> ``.../val2017/``, ``.../images/val2017/``,
    ``.../images/``). With ``categories`` (a checkpoint's list), labels follow that list and
    category ids it lacks are refused."""
    json_path = Path(json_path).expanduser()
    where = str(json_path)
    data = load_json(json_path)
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a COCO object with images, annotations and categories, "
                        f"got a JSON {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(f"{where}: no {key!r} list (is this a COCO instances file? keys: "
                            f"{', '.join(map(str, data)) or 'none'})")
        if not isinstance(data[key], list):
            raise DataError(f"{where}: {key!r} must be a list, got {type(data[key]).__name__}")

    # categories: the file's, then (optionally) mapped onto the checkpoint's
    file_cats: dict[int, str] = {}
    for i, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not _is_int(c.get("id")):
            raise DataError(f"{where}: {_entry('categories', i, c)}: needs an integer 'id', got {_short(c)}")
        if c["id"] in file_cats:
            raise DataError(f"{where}: {_entry('categories', i, c)}: duplicate category id {c['id']}")
        file_cats[c["id"]] = str(c.get("name", c["id"]))
    if categories is not None:
        cats = check_categories(categories, "checkpoint categories")
    else:
        cats = [{"id": cid, "name": file_cats[cid]} for cid in sorted(file_cats)]
    label_of = {c["id"]: i for i, c in enumerate(cats)}

    # images
    image_entries: list[dict[str, Any]] = []
    ids: dict[int, int] = {}
    for i, e in enumerate(data["images"]):
        if not isinstance(e, dict):
            raise DataError(f"{where}: images[{i}] must be an object, got {_short(e)}")
        if not _is_int(e.get("id")):
            raise DataError(f"{where}: images[{i}]: 'id' must be an integer, got {_short(e.get('id'))}")
        if e["id"] in ids:
            raise DataError(f"{where}: {_entry('images', i, e)}: duplicate image id (also images[{ids[e['id']]}])")
        if not isinstance(e.get("file_name"), str) or not e["file_name"]:
            raise DataError(f"{where}: {_entry('images', i, e)}: 'file_name' must be a non-empty string")
        for key in ("width", "height"):
            if key in e and not (_is_number(e[key]) and e[key] > 0):
                raise DataError(f"{where}: {_entry('images', i, e)}: {key!r} must be a positive number, "
                                f"got {_short(e[key])}")
        ids[e["id"]] = i
        image_entries.append(e)

    folder = Path(image_dir).expanduser() if image_dir else _find_image_dir(
        json_path, [e["file_name"] for e in image_entries])
    if image_dir and not folder.is_dir():
        raise DataError(f"{where}: image folder {folder} does not exist")
    records, missing = [], []
    for i, e in enumerate(image_entries):
        path = folder / e["file_name"]
        if not path.is_file():
            missing.append(f"{_entry('images', i, e)}: {path}")
            continue
        w, h = e.get("width"), e.get("height")
        if w is None or h is None:  # not in the file: read the image header
            size = header_size(path)
            if size is None:
                raise DataError(f"{where}: {_entry('images', i, e)} has no width/height and {path} "
                                "cannot be opened to read them")
            w, h = size
        records.append(ImageRecord(e["id"], path, int(w), int(h), e["file_name"]))
    if missing:
        raise DataError(f"{where}: {len(missing)} of {len(image_entries)} image files are missing "
                        f"(image folder {folder}): " + "; ".join(missing[:_SHOW])
                        + (" ..." if len(missing) > _SHOW else ""))
    size_of = {r.id: (r.width, r.height) for r in records}

    # annotations
    report = DetectionReport()
    annotations: dict[int, list[Annotation]] = {r.id: [] for r in records}
    gt_annotations: dict[int, list[dict[str, Any]]] = {r.id: [] for r in records}
    not_in_ckpt: list[str] = []
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            raise DataError(f"{where}: annotations[{i}] must be an object, got {_short(a)}")
        name = _entry("annotations", i, a)
        for key in ("image_id", "category_id"):
            if not _is_int(a.get(key)):
                raise DataError(f"{where}: {name}: {key!r} must be an integer, got {_short(a.get(key))}")
        bbox = a.get("bbox")
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise DataError(f"{where}: {name}: bbox must be 4 numbers [x, y, width, height], got {_short(bbox)}")
        if a["image_id"] not in ids:
            raise DataError(f"{where}: {name}: image_id {a['image_id']} is not among the images")
        if a["category_id"] not in file_cats:
            raise DataError(f"{where}: {name}: category_id {a['category_id']} is not among the categories "
                            f"(ids {_id_list(file_cats)})")
        if a["category_id"] not in label_of:
            not_in_ckpt.append(f"{name}: category_id {a['category_id']} ({file_cats[a['category_id']]!r})")
            continue
        crowd = a.get("iscrowd", 0)
        if crowd not in (0, 1, True, False):
            raise DataError(f"{where}: {name}: iscrowd must be 0 or 1, got {_short(crowd)}")
        if "area" in a and not _is_number(a["area"]):
            raise DataError(f"{where}: {name}: area must be a number, got {_short(a['area'])}")
        x, y, w, h = (float(v) for v in bbox)
        gt = {k: v for k, v in a.items() if k != "segmentation"}
        gt.setdefault("id", i + 1)
        gt.setdefault("iscrowd", 0)
        gt.setdefault("area", max(w, 0.0) * max(h, 0.0))
        gt_annotations[a["image_id"]].append(gt)

        width, height = size_of[a["image_id"]]
        box, clamped = clamp_box(x, y, x + w, y + h, width, height, min_box_size)
        if crowd:
            report.crowd += 1
            if box is None:
                continue
        elif box is None:
            report.dropped += 1
            continue
        elif clamped:
            report.clamped += 1
        area = float(a["area"]) if "area" in a else (box[2] - box[0]) * (box[3] - box[1])
        annotations[a["image_id"]].append(Annotation(box, label_of[a["category_id"]], a["category_id"],
                                                     bool(crowd), area, int(gt["id"])))
    if not_in_ckpt:
        raise DataError(
            f"{where}: {len(not_in_ckpt)} annotations have categories the checkpoint was not trained on "
            f"(its ids: {_id_list(label_of)}): " + "; ".join(not_in_ckpt[:_SHOW])
            + (" ..." if len(not_in_ckpt) > _SHOW else ""))
    report.empty_images = sum(1 for r in records if not any(not a.iscrowd for a in annotations[r.id]))
    gt_images = {e["id"]: {k: v for k, v in e.items()} for e in image_entries if e["id"] in size_of}
    for r in records:  # width / height read from the headers when the file lacks them
        gt_images[r.id].setdefault("width", r.width)
        gt_images[r.id].setdefault("height", r.height)
    return DetectionSource(where, records, annotations, cats, report, gt_images, gt_annotations)


def _id_list(ids: Iterable[int], limit: int = 12) -> str:
    ids = sorted(ids)
    return ", ".join(map(str, ids[:limit])) + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")
