"""COCO instances JSON, read and validated once: detection boxes and semantic masks both start here.

``read_coco_file`` checks everything both readers rely on and returns plain records: the
categories in label order (the file's sorted by id, or a checkpoint's list; on request without
the unused parent categories Roboflow exports carry, see ``unused_parents``), every image with its
file and size (read from the header when the JSON lacks it), and every annotation with its image,
category, box and crowd flag. What a task makes of them (clamped training boxes, rasterised
masks) is the task's business. Errors are ``DataError`` naming the file and the entry, e.g.
``instances_val2017.json: annotations[17] (id 123): bbox must be 4 numbers, got [1, 2, 3]``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from dinotune.data.images import header_size
from dinotune.data.paths import escape_problem
from dinotune.data.splits import SPLIT_ALIASES
from dinotune.errors import DataError

__all__ = [
    "SHOW", "CocoImage", "CocoAnnotation", "CocoFile", "read_coco_file", "find_coco_json", "find_coco_jsons",
    "load_json", "check_categories", "id_list", "short", "unused_parents",
]

SHOW = 5  # how many offending entries an error message lists


@dataclass
class CocoImage:
    id: int
    file_name: str
    path: Path
    width: int
    height: int
    entry: dict[str, Any]  # the JSON object as written (kept for evaluation ground truth)
    where: str  # "images[3] (id 17)", for messages


@dataclass
class CocoAnnotation:
    image_id: int
    category_id: int
    bbox: tuple[float, float, float, float] | None  # xywh in pixels as written; None when absent
    iscrowd: bool
    entry: dict[str, Any]
    where: str  # "annotations[5] (id 9)"


@dataclass
class CocoFile:
    """A validated COCO instances file. ``categories``: ``[{"id", "name"}]`` in label order;
    ``annotations`` holds only those whose category is among them; ``dropped``: the file's
    categories left out as unused parents (``unused_parents``), ``[{"id", "name", "children"}]``."""

    path: Path
    image_dir: Path
    categories: list[dict[str, Any]]
    images: list[CocoImage]
    annotations: list[CocoAnnotation]
    dropped: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label_of(self) -> dict[int, int]:
        """category id -> position in ``categories``."""
        return {c["id"]: i for i, c in enumerate(self.categories)}


# ------------------------------------------------------------------------------- small checks
def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def short(v: Any, limit: int = 80) -> str:
    """``repr(v)`` cut to ``limit`` characters, for messages."""
    text = repr(v)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def entry_name(kind: str, index: int, entry: Any) -> str:
    ident = entry.get("id") if isinstance(entry, dict) else None
    return f"{kind}[{index}]" + (f" (id {ident})" if ident is not None else "")


def id_list(ids: Iterable[int], limit: int = 12) -> str:
    ids = sorted(ids)
    return ", ".join(map(str, ids[:limit])) + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def listing(items: list[str]) -> str:
    """The first ``SHOW`` items joined, with an ellipsis when there are more."""
    return "; ".join(items[:SHOW]) + (" ..." if len(items) > SHOW else "")


def load_json(path: Path) -> Any:
    """Parsed JSON, or a DataError saying where the file is broken (and whether it looks cut off)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
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


def check_categories(categories: Iterable[Any], where: str) -> list[dict[str, Any]]:
    """A checkpoint's category list, validated: ``[{"id": int, "name": str}, ...]``."""
    out, seen = [], set()
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or not is_int(c.get("id")):
            raise DataError(f"{where}: categories[{i}] must be a dict with an integer 'id', got {short(c)}")
        if c["id"] in seen:
            raise DataError(f"{where}: categories[{i}]: duplicate category id {c['id']}")
        seen.add(c["id"])
        out.append({"id": int(c["id"]), "name": str(c.get("name", c["id"]))})
    return out


# ------------------------------------------------------------------------------ finding files
def find_coco_jsons(root: Path, split: str) -> tuple[list[Path], list[str]]:
    """JSON files of ``split`` (``train`` / ``val``) under a COCO-style folder, by the first
    pattern that matches, and the patterns looked for."""
    looked = []
    for alias in SPLIT_ALIASES[split]:
        for pattern in (f"annotations/instances_{alias}*.json", f"annotations/{alias}*.json",
                        f"{alias}/_annotations.coco.json", f"{alias}/annotations.json"):
            looked.append(pattern)
            found = sorted(Path(root).glob(pattern))
            if found:
                return found, looked
    return [], looked


def find_coco_json(root: Path, split: str) -> tuple[Path | None, list[str]]:
    """The one annotation file of ``split`` under ``root`` (None if there is none) and the
    patterns looked for; several matching files are an error (the user must pick one)."""
    found, looked = find_coco_jsons(root, split)
    if len(found) > 1:
        raise DataError(f"{root}: several {split} annotation files match ({', '.join(p.name for p in found)}); "
                        "pass the JSON file itself")
    return (found[0] if found else None), looked


def _image_dir_candidates(json_path: Path) -> list[Path]:
    stem = json_path.stem
    split = stem.split("_", 1)[1] if stem.startswith("instances_") and "_" in stem else stem
    parent = json_path.parent
    root = parent.parent if parent.name.lower() == "annotations" else parent
    return list(dict.fromkeys([root / split, root / "images" / split, root / "images", root, parent]))


def find_image_dir(json_path: Path, file_names: list[str]) -> Path:
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


# ------------------------------------------------------------------------------------ reading
def read_coco_file(json_path: str | Path, image_dir: str | Path | None = None,
                   categories: list[dict[str, Any]] | None = None, require_bbox: bool = True,
                   drop_unused_parents: bool = False) -> CocoFile:
    """Read and validate a COCO instances JSON.

    Args:
        json_path: the file.
        image_dir: its image folder (found next to the JSON when None: ``.../annotations/
            instances_val2017.json`` -> ``.../val2017/``, ``.../images/val2017/``, ``.../images/``).
        categories: a checkpoint's ``[{"id", "name"}]``: labels follow that list, and annotations
            of other categories are refused (all listed at once).
        require_bbox: every annotation must have a valid ``bbox`` (detection); otherwise a bbox is
            checked only where present (semantic masks come from ``segmentation``).
        drop_unused_parents: without ``categories``, leave out the categories no annotation uses
            that are the ``supercategory`` of others (``unused_parents``); listed in ``dropped``.
    """
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
    file_cats = _file_categories(data["categories"], where)
    cats = (check_categories(categories, "checkpoint categories") if categories is not None
            else [{"id": cid, "name": file_cats[cid]} for cid in sorted(file_cats)])
    entries = _image_entries(data["images"], where)
    folder = Path(image_dir).expanduser() if image_dir else find_image_dir(
        json_path, [e["file_name"] for _, e in entries])
    if image_dir and not folder.is_dir():
        raise DataError(f"{where}: image folder {folder} does not exist")
    images = _images(entries, folder, where)
    known = {c["id"] for c in cats}
    annotations, foreign = [], []
    for i, a in enumerate(data["annotations"]):
        ann = _annotation(a, i, where, {im.id for im in images}, file_cats, require_bbox)
        if ann.category_id in known:
            annotations.append(ann)
        else:
            foreign.append(f"{ann.where}: category_id {ann.category_id} ({file_cats[ann.category_id]!r})")
    if foreign:
        raise DataError(f"{where}: {len(foreign)} annotations have categories the checkpoint (or the training "
                        f"data) does not have (its ids: {id_list(known)}): " + listing(foreign))
    dropped: list[dict[str, Any]] = []
    if categories is None and drop_unused_parents:
        dropped = unused_parents(data["categories"], {a.category_id for a in annotations})
        gone = {c["id"] for c in dropped}
        cats = [c for c in cats if c["id"] not in gone]
    return CocoFile(json_path, folder, cats, images, annotations, dropped)


def unused_parents(raw: list[dict[str, Any]], used: set[int]) -> list[dict[str, Any]]:
    """The categories (of a validated ``categories`` list) that no annotation uses (ids not in
    ``used``) and that other categories name as their ``supercategory``: a Roboflow COCO export
    writes ``{"id": 0, "name": "cells", "supercategory": "none"}`` above its real classes
    (``"supercategory": "cells"``), and it would otherwise be trained as a class that never
    appears. Returned as ``[{"id", "name", "children"}]`` (children: how many name it); none when
    every category would go."""
    parents = Counter(str(c["supercategory"]) for c in raw if c.get("supercategory") is not None)
    out = []
    for c in raw:
        name = str(c.get("name", c["id"]))
        children = parents[name] - (str(c.get("supercategory")) == name)  # a category is not its own child
        if c["id"] not in used and children > 0:
            out.append({"id": int(c["id"]), "name": name, "children": children})
    return out if len(out) < len(raw) else []


def _file_categories(raw: list[Any], where: str) -> dict[int, str]:
    out: dict[int, str] = {}
    for i, c in enumerate(raw):
        if not isinstance(c, dict) or not is_int(c.get("id")):
            raise DataError(f"{where}: {entry_name('categories', i, c)}: needs an integer 'id', got {short(c)}")
        if c["id"] in out:
            raise DataError(f"{where}: {entry_name('categories', i, c)}: duplicate category id {c['id']}")
        out[c["id"]] = str(c.get("name", c["id"]))
    return out


def _image_entries(raw: list[Any], where: str) -> list[tuple[str, dict[str, Any]]]:
    """``(entry name, entry)`` of every image, checked; a ``file_name`` leading outside the image
    folder (absolute, or climbing with ``..``) is refused before any file is looked at, all such
    entries listed at once (see ``dinotune.data.paths``)."""
    seen: dict[int, int] = {}
    out, escaping = [], []
    for i, e in enumerate(raw):
        if not isinstance(e, dict):
            raise DataError(f"{where}: images[{i}] must be an object, got {short(e)}")
        if not is_int(e.get("id")):
            raise DataError(f"{where}: images[{i}]: 'id' must be an integer, got {short(e.get('id'))}")
        name = entry_name("images", i, e)
        if e["id"] in seen:
            raise DataError(f"{where}: {name}: duplicate image id (also images[{seen[e['id']]}])")
        if not isinstance(e.get("file_name"), str) or not e["file_name"]:
            raise DataError(f"{where}: {name}: 'file_name' must be a non-empty string")
        problem = escape_problem(e["file_name"])
        if problem:
            escaping.append(f"{name}: file_name {e['file_name']!r} {problem}")
        for key in ("width", "height"):
            if key in e and not (is_number(e[key]) and e[key] > 0):
                raise DataError(f"{where}: {name}: {key!r} must be a positive number, got {short(e[key])}")
        seen[e["id"]] = i
        out.append((name, e))
    if escaping:
        raise DataError(f"{where}: {len(escaping)} image file_name(s) lead outside the image folder (a COCO "
                        "file_name is a path relative to it): " + listing(escaping))
    return out


def _images(entries: list[tuple[str, dict[str, Any]]], folder: Path, where: str) -> list[CocoImage]:
    images, missing = [], []
    for name, e in entries:
        path = folder / e["file_name"]
        if not path.is_file():
            missing.append(f"{name}: {path}")
            continue
        w, h = e.get("width"), e.get("height")
        if w is None or h is None:  # not in the file: read the image header
            size = header_size(path)
            if size is None:
                raise DataError(f"{where}: {name} has no width/height and {path} cannot be opened to read them")
            w, h = size
        images.append(CocoImage(e["id"], e["file_name"], path, int(w), int(h), e, name))
    if missing:
        raise DataError(f"{where}: {len(missing)} of {len(entries)} image files are missing "
                        f"(image folder {folder}): " + listing(missing))
    return images


def _annotation(a: Any, i: int, where: str, image_ids: set[int], file_cats: dict[int, str],
                require_bbox: bool) -> CocoAnnotation:
    if not isinstance(a, dict):
        raise DataError(f"{where}: annotations[{i}] must be an object, got {short(a)}")
    name = entry_name("annotations", i, a)
    for key in ("image_id", "category_id"):
        if not is_int(a.get(key)):
            raise DataError(f"{where}: {name}: {key!r} must be an integer, got {short(a.get(key))}")
    bbox = a.get("bbox")
    if bbox is not None or require_bbox:
        if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(is_number(v) for v in bbox)):
            raise DataError(f"{where}: {name}: bbox must be 4 numbers [x, y, width, height], got {short(bbox)}")
        bbox = tuple(float(v) for v in bbox)
    if a["image_id"] not in image_ids:
        raise DataError(f"{where}: {name}: image_id {a['image_id']} is not among the images")
    if a["category_id"] not in file_cats:
        raise DataError(f"{where}: {name}: category_id {a['category_id']} is not among the categories "
                        f"(ids {id_list(file_cats)})")
    crowd = a.get("iscrowd", 0)
    if crowd not in (0, 1, True, False):
        raise DataError(f"{where}: {name}: iscrowd must be 0 or 1, got {short(crowd)}")
    if "area" in a and not is_number(a["area"]):
        raise DataError(f"{where}: {name}: area must be a number, got {short(a['area'])}")
    return CocoAnnotation(a["image_id"], a["category_id"], bbox, bool(crowd), a, name)
