"""YOLO folders: ``data.yaml`` (``names``, optional ``path`` / ``train`` / ``val`` / ``test``), images in
``images/<split>/`` (or ``<split>/images/``, Roboflow's layout) and one ``labels/<split>/<stem>.txt``
per image with lines ``class cx cy w h`` normalised to [0, 1] (or ``class x1 y1 x2 y2 ...``
polygons, read as their box; ``read_yolo_polygons`` keeps the polygons themselves, for instance
masks). An image without a label file has no objects. Split entries of the
yaml are resolved as ultralytics does (see ``_split_entry``), Roboflow's ``../train/images`` included.

Category ids are class index + 1 (YOLO class 0 is ``category_id`` 1): COCO evaluation and results
files need ids, and COCO's start at 1 (many detection tools keep 0 for background). Predictions
carry these ids unless ``inference.category_ids`` is ``yolo`` (``--category-ids yolo``), which
writes the class index itself. Image ids are 1..M in sorted file order.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, NamedTuple

from dinotune.config.yaml_files import read_yaml
from dinotune.data.coco import check_categories
from dinotune.data.images import SkipReport, header_size, is_image_file, list_image_files, symlink_problem
from dinotune.data.paths import join_inside
from dinotune.data.splits import SPLIT_ALIASES
from dinotune.errors import DataError
from dinotune.tasks.detect.coco import Annotation, DetectionReport, DetectionSource, ImageRecord, clamp_box

__all__ = ["read_yolo", "read_yolo_polygons", "YoloPolygons", "find_yaml"]

YAML_NAMES = ("data.yaml", "data.yml", "dataset.yaml", "dataset.yml")
_TOL = 0.01  # normalised coordinates may overshoot [0, 1] by this much (rounding in exporters)


def find_yaml(root: Path) -> Path | None:
    if root.is_file() and root.suffix.lower() in (".yaml", ".yml"):
        return root
    return next((root / n for n in YAML_NAMES if (root / n).is_file()), None)


def _read_yaml(path: Path) -> dict[str, Any]:
    data = read_yaml(path, DataError)  # bounded: size, alias expansion, depth; duplicate keys refused
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a mapping with 'names' (and optionally path, train, val)")
    return data


def _names(data: dict[str, Any], where: Path) -> list[str]:
    names = data.get("names")
    if isinstance(names, dict):
        keys = sorted(names)
        if not all(isinstance(k, int) for k in keys) or keys != list(range(len(keys))):
            raise DataError(f"{where}: 'names' as a mapping needs the keys 0..{len(keys) - 1}, got {keys[:10]}")
        names = [names[k] for k in keys]
    if not isinstance(names, list) or not names:
        raise DataError(f"{where}: 'names' must be a non-empty list (or mapping index: name) of class names")
    if "nc" in data and data["nc"] != len(names):
        raise DataError(f"{where}: nc is {data['nc']} but 'names' lists {len(names)} classes")
    return [str(n) for n in names]


def _label_path(image: Path) -> Path:
    """Ultralytics' rule: the last ``images`` folder of the path becomes ``labels``, suffix .txt."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            return Path(*parts).with_suffix(".txt")
    return image.with_suffix(".txt")


def _split_images(data: dict[str, Any], base: Path, root: Path, split: str, where: Path,
                  report: SkipReport) -> tuple[list[Path], str]:
    """Image files of ``split`` and a description of where they came from."""
    key = next((k for k in SPLIT_ALIASES[split] if data.get(k)), None)
    if key is None:
        for alias in SPLIT_ALIASES[split]:
            for folder in (root / "images" / alias, root / alias / "images"):
                if folder.is_dir():
                    return list_image_files(folder, report, recursive=True), str(folder)
        looked = ", ".join(f"images/{a}/, {a}/images/" for a in SPLIT_ALIASES[split])
        raise DataError(f"{where}: no {split!r} entry and no image folder for it under {root} (looked for {looked})")
    entries = data[key] if isinstance(data[key], list) else [data[key]]
    files: list[Path] = []
    for entry in entries:
        p, tried = _split_entry(str(entry), base)
        if p.is_dir():
            files += list_image_files(p, report, recursive=True)
        elif p.is_file() and p.suffix.lower() == ".txt":  # a list of image paths
            files += _listed_images(p, base, report)
        else:
            raise DataError(f"{where}: {key}: {entry!r} -> {' or '.join(map(str, tried))} is not a folder or a "
                            ".txt list of images")
    return sorted(files), f"{where} {key}"


def _split_entry(entry: str, base: Path) -> tuple[Path, list[Path]]:
    """Where a data.yaml split entry points, and the paths tried (for the error message).

    Ultralytics' rule (``check_det_dataset``): relative to the dataset root ``base``; when that does
    not exist and the entry starts with ``../``, the same path without it. Roboflow exports write
    ``train: ../train/images`` next to a ``train/`` folder, so the second try is the one that
    exists. These entries are the user's own configuration, so ``..`` is allowed here (unlike the
    file names inside annotation files and image lists, see ``dinotune.data.paths``)."""
    p = Path(entry).expanduser()
    if p.is_absolute():
        return p, [p]
    first = Path(os.path.normpath(base / p))
    if first.exists() or not entry.replace("\\", "/").startswith("../"):
        return first, [first]
    second = Path(os.path.normpath(base / entry[3:]))
    return second, [first, second]


def _listed_images(list_file: Path, base: Path, report: SkipReport) -> list[Path]:
    """The images of a ``.txt`` list, one path a line (ultralytics' rule: ``./x`` is relative to the
    list's folder, other relative paths to the dataset root ``base``). A relative path that leaves
    its folder is refused, naming the list, the line and the path (see ``dinotune.data.paths``);
    absolute paths are allowed, as such lists are usually written by the user's own scripts."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{list_file}: cannot read the image list ({exc})") from None
    files: list[Path] = []
    for n, line in enumerate(lines, start=1):
        text = line.strip()
        if not text:
            continue
        q = Path(text).expanduser()
        if not q.is_absolute():
            q, problem = join_inside(list_file.parent if text.startswith("./") else base, text)
            if problem:
                raise DataError(f"{list_file}, line {n}: {problem}")
        if not q.is_file():
            report.add(q, f"listed in {list_file} line {n} but " + (symlink_problem(q) or "missing"))
        elif is_image_file(q):
            files.append(q)
    return files


def _parse_labels(path: Path, n_classes: int
                  ) -> list[tuple[int, float, float, float, float, int, list[float] | None]]:
    """``(class, cx, cy, w, h, line, polygon)`` per object; polygon lines (YOLO-seg) become their
    box and keep the normalised ``[x1, y1, ..., xn, yn]`` as ``polygon`` (None for box lines)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the label file ({exc})") from None
    out = []
    for n, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 5 and (len(parts) < 7 or len(parts) % 2 == 0):
            raise DataError(f"{path}, line {n}: expected 'class cx cy w h' (5 numbers) or a polygon 'class x1 y1 "
                            f"... xn yn' (n >= 3), got {len(parts)} values: {line.strip()!r}")
        try:
            values = [float(v) for v in parts]
        except ValueError:
            raise DataError(f"{path}, line {n}: not numbers: {line.strip()!r}") from None
        cls = values[0]
        if not all(math.isfinite(v) for v in values):
            raise DataError(f"{path}, line {n}: values must be finite numbers: {line.strip()!r}")
        if cls != int(cls) or not 0 <= cls < n_classes:
            raise DataError(f"{path}, line {n}: class {parts[0]} out of range (data.yaml names "
                            f"{n_classes} classes: 0..{n_classes - 1})")
        coords = values[1:]
        if any(v < -_TOL or v > 1 + _TOL for v in coords):
            raise DataError(f"{path}, line {n}: coordinates must be normalised to [0, 1]: {line.strip()!r}")
        polygon = None
        if len(coords) == 4:
            cx, cy, w, h = coords
            if w < 0 or h < 0:
                raise DataError(f"{path}, line {n}: negative width or height: {line.strip()!r}")
        else:
            xs, ys = coords[0::2], coords[1::2]
            cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
            w, h = max(xs) - min(xs), max(ys) - min(ys)
            polygon = coords
        out.append((int(cls), cx, cy, w, h, n, polygon))
    return out


class YoloPolygons(NamedTuple):
    """``read_yolo_polygons``: the source, each object's polygon in original pixels
    (``annotation id -> [[x1, y1, ..., xn, yn]]``, a COCO polygon list), and the box-only lines
    left out (``box_only`` in all, the first few named as ``"<label file>, line <n>"``)."""

    source: DetectionSource
    polygons: dict[int, list[list[float]]]
    box_only: int
    box_only_lines: list[str]


def read_yolo(
    root: str | Path,
    split: Literal["train", "val", "test"],
    categories: list[dict[str, Any]] | None,
    min_box_size: float,
) -> DetectionSource:
    """Read one split of a YOLO folder (or its ``data.yaml``). With ``categories`` (a checkpoint's
    list), labels follow that list by id (class index + 1) and ids it lacks are refused."""
    return _read(root, split, categories, min_box_size, polygons=False).source


def read_yolo_polygons(
    root: str | Path,
    split: Literal["train", "val", "test"],
    categories: list[dict[str, Any]] | None,
    min_box_size: float,
    show: int = 5,
) -> YoloPolygons:
    """``read_yolo`` for YOLO-seg labels (``class x1 y1 ... xn yn``, n >= 3): each object's box is
    its polygon's extent (clamped as ever) and the polygon is kept in pixels. A plain box line
    (``class cx cy w h``) has no outline to make a mask from: it is left out and counted, the
    first ``show`` named."""
    return _read(root, split, categories, min_box_size, polygons=True, show=show)


def _read(root: str | Path, split: str, categories: list[dict[str, Any]] | None, min_box_size: float,
          polygons: bool, show: int = 5) -> YoloPolygons:
    root = Path(root).expanduser()
    yaml_path = find_yaml(root)
    if yaml_path is None:
        raise DataError(f"{root}: no {' / '.join(YAML_NAMES)} (a YOLO folder needs one with the class names)")
    root = yaml_path.parent
    data = _read_yaml(yaml_path)
    names = _names(data, yaml_path)
    base = Path(str(data["path"])).expanduser() if data.get("path") else root
    base = base if base.is_absolute() else root / base
    if not base.is_dir():
        base = root  # a 'path' written for another machine: fall back to the yaml's folder
    report = DetectionReport()
    files, origin = _split_images(data, base, root, split, yaml_path, report.skipped)
    if not files:
        raise DataError(f"{origin}: no image files for the {split!r} split")

    file_cats = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    cats = check_categories(categories, "checkpoint categories") if categories is not None else file_cats
    label_of = {c["id"]: i for i, c in enumerate(cats)}

    with ThreadPoolExecutor(max_workers=8) as pool:
        sizes = list(pool.map(header_size, files))
    images: list[ImageRecord] = []
    annotations: dict[int, list[Annotation]] = {}
    n_objects = 0
    outlines: dict[int, list[list[float]]] = {}  # polygons in pixels, when asked for
    box_only, box_only_lines = 0, []
    for path, size in zip(files, sizes):
        if size is None:
            report.skipped.add(path, "cannot be opened as an image")
            continue
        width, height = size
        image_id = len(images) + 1
        rel = path.relative_to(base) if path.is_relative_to(base) else path
        images.append(ImageRecord(image_id, path, width, height, str(rel)))
        objects: list[Annotation] = []
        label_file = _label_path(path)
        for cls, cx, cy, w, h, line, polygon in (_parse_labels(label_file, len(names)) if label_file.is_file()
                                                 else []):
            cid = cls + 1
            if cid not in label_of:
                raise DataError(f"{label_file}, line {line}: class {cls} ({names[cls]!r}, category id {cid}) "
                                "is not among the checkpoint's categories")
            if polygons and polygon is None:  # a box has no outline: nothing to train a mask on
                box_only += 1
                if len(box_only_lines) < show:
                    box_only_lines.append(f"{label_file}, line {line}")
                continue
            box, clamped = clamp_box((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width,
                                     (cy + h / 2) * height, width, height, min_box_size)
            if not report.admit(box, clamped):
                continue
            n_objects += 1
            objects.append(Annotation(box, label_of[cid], cid, False, (box[2] - box[0]) * (box[3] - box[1]),
                                      n_objects))
            if polygons:
                outlines[n_objects] = [[v * (width if k % 2 == 0 else height) for k, v in enumerate(polygon)]]
        annotations[image_id] = objects
        report.empty_images += int(not objects)
    if not images:
        raise DataError(f"{origin}: none of the {len(files)} image files could be opened")
    source = DetectionSource(f"{yaml_path} ({split})", images, annotations, cats, report)
    return YoloPolygons(source, outlines, box_only, box_only_lines)
