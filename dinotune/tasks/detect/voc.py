"""Pascal VOC XML detection folders (what the VOC devkit, labelImg and CVAT write) read into a
``DetectionSource``.

Layout: ``Annotations/*.xml`` (or ``annotations/``) beside ``JPEGImages/`` (or ``images/``); the
folder given may also hold ``VOC2007/`` or ``VOCdevkit/VOC2012/``. One XML per image::

    <annotation><filename>000005.jpg</filename><size><width>500</width><height>375</height></size>
      <object><name>chair</name><difficult>0</difficult>
        <bndbox><xmin>263</xmin><ymin>211</ymin><xmax>324</xmax><ymax>339</ymax></bndbox></object>
    </annotation>

Splits: ``ImageSets/Main/{train,val,test}.txt`` (one image id, the XML's stem, a line) where they
exist. Without a val list, ``val_fraction`` of the training images (a seeded draw, the same for
every read) is held out for validation; with neither, there is no validation split. The training
split is ``train.txt``, else every XML not listed for val / test.

Boxes: VOC coordinates are 1-based pixel indices with ``xmax`` / ``ymax`` inclusive, so a box
covers the pixels ``xmin..xmax``. They are read as detectron2 reads them: ``[xmin - 1, ymin - 1,
xmax, ymax]`` in 0-based continuous pixels (a box's width is ``xmax - xmin + 1`` pixels), and
predictions come back in that frame (COCO ``xywh``). A box reaching outside ``<size>`` is clamped
and counted; one wholly outside it, inverted (``xmax < xmin``) or not numbers is an error naming
the file and the object. ``difficult`` objects are kept for evaluation as crowd regions are
(pycocotools ignores the detections that match them) and never trained on. ``<size>`` missing or 0
is read from the image header; a ``<size>`` that differs from the image file is handled as the COCO
reader's (a plausible rescale is kept with its boxes rescaled, anything else is skipped with the
reason, see ``data.scan_source``).

Classes: the object names of every split (the images of the ``ImageSets/Main`` split lists, else of
every XML), sorted, with category ids 1..K, so a class seen only in validation images is still one
of the model's; with ``categories`` (the training split's, a checkpoint's) names are looked up
there and others refused.

The XML files are untrusted: each is at most ``MAX_XML_BYTES``; a document type declaration is
refused before its internal subset is read (expat stops at ``<!DOCTYPE``, so no entity is ever
defined or expanded: no "billion laughs", no external entities); ``<filename>`` and list ids must
stay inside their folders (see ``dinotune.data.paths``).
"""

from __future__ import annotations

import glob
import math
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.parsers import expat

from dinotune.data.coco import check_categories, listing
from dinotune.data.images import header_size, is_image_file
from dinotune.data.paths import escape_problem, read_list_ids
from dinotune.data.splits import SPLIT_ALIASES, subset_indices
from dinotune.errors import DataError
from dinotune.tasks.detect.coco import (
    Annotation,
    DetectionReport,
    DetectionSource,
    ImageRecord,
    clamp_box,
)
from dinotune.utils import info

__all__ = ["read_voc", "find_voc_root", "parse_voc_xml", "MAX_XML_BYTES"]

ANNOTATION_DIRS = ("Annotations", "annotations")
IMAGE_DIRS = ("JPEGImages", "images")
MAX_XML_BYTES = 4 << 20  # one image's annotation; thousands of objects fit in far less


# ------------------------------------------------------------------------------------- the folder
def _folders(root: Path) -> tuple[Path, Path] | None:
    """``(annotation folder, image folder)`` of a VOC root, or None when ``root`` is not one."""
    ann = next((root / a for a in ANNOTATION_DIRS if (root / a).is_dir() and next((root / a).glob("*.xml"), None)),
               None)
    images = next((root / i for i in IMAGE_DIRS if (root / i).is_dir()), None)
    return (ann, images) if ann is not None and images is not None else None


def find_voc_root(path: Path) -> Path | None:
    """The VOC folder at ``path`` (or in its ``VOC*/`` or ``VOCdevkit/VOC*/``), or None.
    Several sets below ``path`` (VOC2007 and VOC2012) are an error: the user picks one."""
    if _folders(path) is not None:
        return path
    found = [p for p in sorted(path.glob("VOC*")) + sorted(path.glob("VOCdevkit/VOC*"))
             if p.is_dir() and _folders(p) is not None]
    if len(found) > 1:
        raise DataError(f"{path}: several Pascal VOC sets ({', '.join(str(p) for p in found)}); pass one as --data")
    return found[0] if found else None


# ----------------------------------------------------------------------------------- one XML file
class _Refused(Exception):
    pass


def _refuse_doctype(*_: Any) -> None:
    raise _Refused("a <!DOCTYPE> declaration: document types and entities are refused in annotation files "
                   "(they can expand to gigabytes or pull in other files), and VOC annotations need none")


def _refuse_entity(*_: Any) -> None:
    raise _Refused("an <!ENTITY> declaration: entities are refused in annotation files (they can expand to "
                   "gigabytes or pull in other files)")


def parse_voc_xml(path: Path) -> ET.Element:
    """The root element of an untrusted XML file: at most ``MAX_XML_BYTES``, parsed by expat with
    a document type declaration refused at its start (so no entity is ever declared), built into
    an ElementTree. DataError naming the file otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_XML_BYTES + 1)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the annotation ({exc})") from None
    if len(data) > MAX_XML_BYTES:
        raise DataError(f"{path}: larger than {MAX_XML_BYTES >> 20} MiB; refused (one image's VOC annotation "
                        "needs far less)")
    builder = ET.TreeBuilder()
    parser = expat.ParserCreate()
    parser.StartDoctypeDeclHandler = _refuse_doctype
    parser.EntityDeclHandler = _refuse_entity
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(data, True)
        return builder.close()
    except _Refused as exc:
        raise DataError(f"{path}: refused: {exc}") from None
    except expat.ExpatError as exc:
        raise DataError(f"{path}: not well-formed XML ({expat.ErrorString(exc.code)} at line {exc.lineno}, "
                        f"column {exc.offset})") from None
    except (AssertionError, IndexError) as exc:  # TreeBuilder: an empty document
        raise DataError(f"{path}: not well-formed XML ({exc or 'no element'})") from None


@dataclass
class _Object:
    name: str
    box: tuple[float, float, float, float]  # xyxy, 0-based continuous pixels (see the module docstring)
    difficult: bool
    where: str  # "a.xml: object[2] ('dog')"


@dataclass
class _Entry:
    xml: Path
    image: Path
    width: int
    height: int
    objects: list[_Object]


def _text(parent: ET.Element, tag: str) -> str | None:
    node = parent.find(tag)
    return None if node is None or node.text is None else node.text.strip()


def _number(parent: ET.Element, tag: str, where: str) -> float:
    text = _text(parent, tag)
    if text is None or text == "":
        raise DataError(f"{where}: no <{tag}>")
    try:
        value = float(text)
    except ValueError:
        raise DataError(f"{where}: <{tag}> is not a number: {text[:40]!r}") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: <{tag}> is not a finite number: {text[:40]!r}")
    return value


def _image_of(xml: Path, file_name: str | None, image_dir: Path) -> Path:
    """The image an XML describes: ``<filename>`` inside the image folder, else a file of the XML's
    stem there (VOC ids are stems; exporters disagree on extensions)."""
    if file_name:
        problem = escape_problem(file_name)
        if problem:
            raise DataError(f"{xml}: <filename> {file_name!r} {problem}; it must lie inside {image_dir}")
        if (image_dir / file_name).is_file():
            return image_dir / file_name
    for cand in sorted(image_dir.glob(glob.escape(xml.stem) + ".*")):
        if is_image_file(cand) and cand.is_file():
            return cand
    raise DataError(f"{xml}: its image {image_dir / (file_name or xml.stem + '.*')} is missing")


def _read_entry(xml: Path, image_dir: Path) -> _Entry:
    root = parse_voc_xml(xml)
    if root.tag != "annotation":
        raise DataError(f"{xml}: not a Pascal VOC annotation (the root element is <{root.tag}>, not <annotation>)")
    image = _image_of(xml, _text(root, "filename"), image_dir)
    width = height = 0.0
    size = root.find("size")
    if size is not None:
        width, height = (_number(size, t, f"{xml}: <size>") if _text(size, t) else 0.0 for t in ("width", "height"))
        if width < 0 or height < 0:
            raise DataError(f"{xml}: <size> {width:g} x {height:g} is negative")
    if not width or not height:  # not written (or 0, as some tools write): the image header says
        found = header_size(image)
        if found is None:
            raise DataError(f"{xml}: no <size> and its image {image} cannot be opened to read it")
        width, height = found
    objects = []
    for i, obj in enumerate(root.findall("object")):
        name = _text(obj, "name")
        where = f"{xml}: object[{i}]" + (f" ({name!r})" if name else "")
        if not name:
            raise DataError(f"{where}: no <name>")
        difficult = _text(obj, "difficult") or "0"
        if difficult not in ("0", "1"):
            raise DataError(f"{where}: <difficult> must be 0 or 1, got {difficult[:20]!r}")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise DataError(f"{where}: no <bndbox>")
        xmin, ymin, xmax, ymax = (_number(bndbox, t, f"{where} <bndbox>") for t in ("xmin", "ymin", "xmax", "ymax"))
        if xmax < xmin or ymax < ymin:
            raise DataError(f"{where}: <bndbox> is inverted (xmin {xmin:g}, xmax {xmax:g}, ymin {ymin:g}, "
                            f"ymax {ymax:g})")
        box = (xmin - 1, ymin - 1, xmax, ymax)  # 1-based inclusive pixel indices -> 0-based continuous
        if box[2] <= 0 or box[3] <= 0 or box[0] >= width or box[1] >= height:
            raise DataError(f"{where}: <bndbox> ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}) lies outside the "
                            f"{width:g} x {height:g} image")
        objects.append(_Object(name, box, difficult == "1", where))
    return _Entry(xml, image, int(round(width)), int(round(height)), objects)


# ----------------------------------------------------------------------------------------- splits
def _list_ids(list_file: Path) -> list[str]:
    """The image ids of an ``ImageSets/Main`` list (``read_list_ids``: ids are XML stems)."""
    return read_list_ids(list_file, ".xml", "Annotations/")


def _split_lists(root: Path) -> dict[str, Path | None]:
    """``ImageSets/Main`` list of each split (val also valid / validation), None where absent."""
    main = root / "ImageSets" / "Main"
    return {s: next((main / f"{a}.txt" for a in names if (main / f"{a}.txt").is_file()), None)
            for s, names in SPLIT_ALIASES.items()}


def _split_ids(root: Path, ann_dir: Path, split: str, val_fraction: float, seed: int) -> tuple[list[str], str]:
    """The ids (XML stems) of ``split`` and where they came from (see the module docstring)."""
    main = root / "ImageSets" / "Main"
    lists = _split_lists(root)
    if split != "train" and lists[split] is not None:
        return _list_ids(lists[split]), str(lists[split])
    looked = ", ".join(str(main / f"{a}.txt") for a in SPLIT_ALIASES[split])
    if split == "test":
        raise DataError(f"{root}: no test split (looked for {looked})")
    if lists["train"] is not None:
        base, origin = _list_ids(lists["train"]), str(lists["train"])
    else:
        listed = {i for s in ("val", "test") if lists[s] is not None for i in _list_ids(lists[s])}
        base = sorted(p.stem for p in ann_dir.glob("*.xml") if p.stem not in listed)
        origin = f"{ann_dir} (every XML" + (" not listed for val / test)" if listed else ")")
    if lists["val"] is not None or val_fraction <= 0:
        if split == "val":
            raise DataError(f"{root}: no val split (looked for {looked}); hold out part of the training images "
                            "with --val-fraction (e.g. 0.2), or pass --val-data")
        return base, origin
    if len(base) < 2:
        raise DataError(f"{origin}: {len(base)} image(s), too few to hold out a validation part (--val-fraction)")
    n_val = min(len(base) - 1, max(1, round(val_fraction * len(base))))
    held = set(subset_indices(len(base), n_val, seed))
    if split == "val":
        return [i for k, i in enumerate(base) if k in held], f"{origin}, held out (--val-fraction {val_fraction:g})"
    info(f"{root}: no val list in {main}: {n_val} of {len(base)} training images held out for validation "
         f"(--val-fraction {val_fraction:g}, seed {seed})")
    return [i for k, i in enumerate(base) if k not in held], origin


def _other_names(root: Path, ann_dir: Path, read: set[str], number: dict[str, int]) -> set[str]:
    """The object names of the images of every split (those of the ``ImageSets/Main`` split lists,
    else every XML) besides those already ``read``."""
    lists = [p for p in _split_lists(root).values() if p is not None]
    stems = {i for p in lists for i in _list_ids(p)} if lists else set(number)
    rest = sorted(i for i in stems - read if i in number)

    def names(stem: str) -> set[str]:
        tree = parse_voc_xml(ann_dir / f"{stem}.xml")
        return {t for t in (_text(o, "name") for o in tree.findall("object")) if t}

    with ThreadPoolExecutor(max_workers=8) as pool:
        return set().union(*pool.map(names, rest))


# -------------------------------------------------------------------------------------- the reader
def read_voc(root: str | Path, split: str, categories: list[dict[str, Any]] | None, min_box_size: float, *,
             val_fraction: float = 0.0, seed: int = 0) -> DetectionSource:
    """One split of a Pascal VOC XML folder (see the module docstring). Image ids are the
    positions of the XML stems in sorted order + 1, the same whichever split is read."""
    root = Path(root).expanduser()
    folders = _folders(root)
    if folders is None:
        raise DataError(f"{root}: not a Pascal VOC folder (needs {' or '.join(ANNOTATION_DIRS)}/*.xml beside "
                        f"{' or '.join(IMAGE_DIRS)}/)")
    ann_dir, image_dir = folders
    ids, origin = _split_ids(root, ann_dir, split, val_fraction, seed)
    ids = list(dict.fromkeys(ids))  # an id listed twice is one image
    if not ids:
        raise DataError(f"{origin}: the {split} split lists no images")
    number = {stem: k + 1 for k, stem in enumerate(sorted(p.stem for p in ann_dir.glob("*.xml")))}
    missing = [i for i in ids if i not in number]
    if missing:
        raise DataError(f"{origin}: {len(missing)} listed image id(s) have no {ann_dir.name}/<id>.xml: "
                        + listing(missing))

    def read(stem: str) -> _Entry | str:
        try:
            return _read_entry(ann_dir / f"{stem}.xml", image_dir)
        except DataError as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=8) as pool:
        entries = list(pool.map(read, ids))
    problems = [e for e in entries if isinstance(e, str)]
    if problems:
        raise DataError(f"{len(problems)} of {len(ids)} annotation files of {root} ({split}) are refused: "
                        + listing(problems))
    good = [e for e in entries if not isinstance(e, str)]
    if categories is not None:
        cats = check_categories(categories, "training / checkpoint categories")
    else:
        names = {o.name for e in good for o in e.objects} | _other_names(root, ann_dir, set(ids), number)
        cats = [{"id": k + 1, "name": n} for k, n in enumerate(sorted(names))]
    label_of: dict[str, int] = {}
    for k, c in enumerate(cats):
        label_of.setdefault(str(c["name"]), k)
    unknown = [f"{o.where}" for e in good for o in e.objects if o.name not in label_of]
    if unknown:
        raise DataError(f"{len(unknown)} object(s) of {root} ({split}) have classes the checkpoint (or the training "
                        f"split) does not have ({', '.join(c['name'] for c in cats[:12])}): " + listing(unknown))

    report = DetectionReport()
    images: list[ImageRecord] = []
    annotations: dict[int, list[Annotation]] = {}
    n_objects = 0
    for entry, stem in zip(good, ids):
        image_id = number[stem]
        images.append(ImageRecord(image_id, entry.image, entry.width, entry.height,
                                  str(entry.image.relative_to(image_dir))))
        objects: list[Annotation] = []
        for o in entry.objects:
            box, clamped = clamp_box(*o.box, entry.width, entry.height, min_box_size)
            report.difficult += int(o.difficult)
            if not report.admit(box, clamped, o.difficult):
                continue
            label, n_objects = label_of[o.name], n_objects + 1
            objects.append(Annotation(box, label, int(cats[label]["id"]), o.difficult,
                                      (box[2] - box[0]) * (box[3] - box[1]), n_objects))
        annotations[image_id] = objects
        report.empty_images += int(not any(not a.iscrowd for a in objects))
    return DetectionSource(f"{root} ({split})", images, annotations, cats, report)
