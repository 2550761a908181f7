"""Segmentation data in memory (``SegmentationSource``), its readers and mask loading.

Layouts: Pascal VOC (palette PNGs, 255 = boundary = ignore), ADE20K (0 = "other" = ignore,
``v`` -> ``v - 1``), folders of images + masks with matching stems, and COCO instances JSONs
rasterised to semantic masks (0 = background, 1..C = categories in id order, crowd = ignore).
``find_segmentation_data`` tells them apart. ``load_mask`` turns a pair into an ``H x W`` label
array and refuses masks that do not fit their image or hold labels outside ``0..K-1``; errors are
``DataError`` naming the file(s), the problem and the values.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import numpy as np
from PIL import Image

from dinotune.data.images import (
    ImageReadError,
    SkipReport,
    check_image,
    describe_error,
    header_size,
    list_image_files,
)
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

__all__ = [
    "DataError", "MaskReadError", "CocoShapes", "SegmentationSource", "VOC_CLASSES", "ADE20K_CLASSES",
    "read_voc", "read_ade20k", "read_folders", "read_coco_semantic", "find_segmentation_data",
    "load_mask", "read_mask_labels", "rasterize_coco", "scan_source", "describe",
]

MaskKind = Literal["index", "ade20k", "coco"]
_SHOW = 5  # offending entries listed in a message
_VAL_ALIASES = ("val", "valid", "validation")

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]

# SceneParsing objectInfo150 (the first name of each entry, as in mmsegmentation), label order.
ADE20K_CLASSES = [
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
]
assert len(VOC_CLASSES) == 21 and len(ADE20K_CLASSES) == 150


class MaskReadError(ImageReadError):
    """A mask file could not be decoded (a run-time read failure, like a broken image)."""


@dataclass(slots=True)
class CocoShapes:
    """What it takes to rasterise one COCO image: its size and ``(label, shape)`` pairs in drawing
    order (non-crowd objects largest area first, then crowd regions with ``label = ignore_index``).
    A shape is a list of float32 polygons (``x0 y0 x1 y1 ...``) or a compressed RLE dict."""

    height: int
    width: int
    shapes: list[tuple[int, Any]]


@dataclass
class SegmentationSource:
    """Image / mask pairs of one split and the classes their labels index into."""

    name: str  # the file or folder it came from (for messages)
    pairs: list[tuple[Path, Path | None]]  # (image, mask file or None for COCO)
    class_names: list[str]  # K names in label order
    ignore_index: int = 255
    mask_kind: MaskKind = "index"
    coco: list[CocoShapes] | None = None  # mask_kind "coco": one entry per pair
    report: SkipReport = field(default_factory=SkipReport)
    # COCO: [{"id", "name"}] of labels 1..K-1 (pass it as ``categories`` when reading other splits or
    # data for a checkpoint, so labels keep their meaning); None for the other layouts
    categories: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if 0 <= self.ignore_index < len(self.class_names):
            raise DataError(f"{self.name}: ignore_index {self.ignore_index} is a class label "
                            f"(0..{self.num_classes - 1}); choose a value outside the labels (255 by default)")
        if self.mask_kind == "coco" and (self.coco is None or len(self.coco) != len(self.pairs)):
            raise ValueError("a COCO source needs one CocoShapes entry per pair")

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, indices: Iterable[int]) -> SegmentationSource:
        """The pairs ``indices`` (in that order), same classes and report."""
        indices = list(indices)
        return replace(self, pairs=[self.pairs[i] for i in indices],
                       coco=None if self.coco is None else [self.coco[i] for i in indices])


# ------------------------------------------------------------------------------------------ masks
def _label_dtype(source: SegmentationSource) -> type:
    return np.uint8 if 0 <= source.ignore_index <= 255 and source.num_classes <= 256 else np.int64


def _decode_mask(mask_path: Path, image_path: Path, kind: MaskKind) -> np.ndarray:
    """The raw values of a label PNG (palette indices, not colours), or an error naming it."""
    if not mask_path.is_file():
        raise DataError(f"{mask_path}: mask file not found (the mask of {image_path})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(mask_path) as im:
                im.load()
                mode = im.mode
                if mode in ("P", "L", "1", "I", "I;16", "I;16B", "I;16L", "I;16N"):
                    raw = np.array(im if mode != "1" else im.convert("L"))
                    return (raw > 0).astype(np.uint8) if mode == "1" else raw
    except Exception as exc:  # PIL raises many types on bad data
        raise MaskReadError(f"{mask_path}: {describe_error(mask_path, exc)}") from None
    hint = " (VOC masks are palette PNGs: keep them as they are, do not convert them to RGB)" \
        if kind == "index" and mode in ("RGB", "RGBA") else ""
    raise DataError(f"{mask_path}: mask has image mode {mode!r}; expected a single-channel label image "
                    f"(palette or grayscale PNG whose values are class indices){hint}")


def rasterize_coco(shapes: CocoShapes, ignore_index: int = 255, dtype: type = np.uint8) -> np.ndarray:
    """``H x W`` labels of one COCO image. Rule: 0 = background; objects are drawn largest area
    first, so where instances overlap the smaller one stays visible on top; crowd regions
    (``ignore_index``) are drawn last and claim only pixels that are still background (an object
    annotated on its own inside a crowd keeps its label)."""
    from pycocotools import mask as mask_utils

    h, w = shapes.height, shapes.width
    out = np.zeros((h, w), dtype=dtype)
    for label, shape in shapes.shapes:
        rle = shape if isinstance(shape, dict) else mask_utils.merge(mask_utils.frPyObjects(shape, h, w))
        m = mask_utils.decode(rle).astype(bool)
        if label == ignore_index:
            m &= out == 0
        out[m] = label
    return out


def _bad_values(values: np.ndarray, limit: int = _SHOW) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return shown + (f", ... ({len(values)} distinct values in all)" if len(values) > limit else "")


def read_mask_labels(source: SegmentationSource, index: int,
                     image_size: tuple[int, int] | None = None) -> np.ndarray:
    """``H x W`` labels of pair ``index`` (``0..K-1`` or ``ignore_index``; uint8 when they fit, else
    int64). ``image_size`` ``(width, height)``: the image's size, checked against the mask's.
    Raises DataError (missing mask, wrong size, labels out of range) or MaskReadError (the mask
    does not decode)."""
    image_path, mask_path = source.pairs[index]
    dtype, ignore, k = _label_dtype(source), source.ignore_index, source.num_classes
    if source.mask_kind == "coco":
        shapes = source.coco[index]
        if image_size is not None and tuple(image_size) != (shapes.width, shapes.height):
            raise DataError(f"{source.name}: {image_path.name} is {shapes.width}x{shapes.height} in the JSON "
                            f"but the image file {image_path} is {image_size[0]}x{image_size[1]}")
        return rasterize_coco(shapes, ignore, dtype)
    if mask_path is None:
        raise DataError(f"{image_path}: no mask file for this image in {source.name}")
    raw = _decode_mask(mask_path, image_path, source.mask_kind)
    if image_size is not None and (raw.shape[1], raw.shape[0]) != tuple(image_size):
        raise DataError(f"{mask_path}: mask is {raw.shape[1]}x{raw.shape[0]} but its image {image_path} is "
                        f"{image_size[0]}x{image_size[1]} (width x height); a mask must have its image's size")
    if source.mask_kind == "ade20k":
        raw = raw.astype(np.int64)
        labels = np.where(raw == 0, ignore, raw - 1)
        bad = np.unique(raw[(labels != ignore) & ((labels < 0) | (labels >= k))])
        if len(bad):
            raise DataError(f"{mask_path}: ADE20K mask values {_bad_values(bad)} are outside 0..{k} "
                            f"(0 = ignore, 1..{k} = the {k} classes)")
        return labels.astype(dtype)
    valid = (raw == ignore) | ((raw >= 0) & (raw < k))
    if not valid.all():
        bad = np.unique(raw[~valid])
        raise DataError(f"{mask_path}: label values {_bad_values(bad)} are outside 0..{k - 1} ({k} classes) "
                        f"and not the ignore index {ignore}")
    return raw.astype(dtype, copy=False)


def load_mask(source: SegmentationSource, index: int) -> np.ndarray:
    """``H x W`` labels of pair ``index``, checked against its image's size (read from the header)."""
    image_path = source.pairs[index][0]
    size = header_size(image_path)
    if size is None:
        raise ImageReadError(f"{image_path}: {describe_error(image_path, OSError('cannot read the header'))}")
    return read_mask_labels(source, index, size)


# ---------------------------------------------------------------------------------------- readers
def _pair_by_stem(image_dir: Path, mask_dir: Path, report: SkipReport) -> list[tuple[Path, Path]]:
    """Images and masks matched by file stem; an image without a mask or a mask without an image
    is a DataError naming the files."""
    images = list_image_files(image_dir, report)
    masks = list_image_files(mask_dir, report)
    by_stem: dict[str, Path] = {}
    for m in masks:
        if m.stem in by_stem:
            raise DataError(f"{mask_dir}: two masks for the image stem {m.stem!r}: {by_stem[m.stem].name}, {m.name}")
        by_stem[m.stem] = m
    image_stems: dict[str, Path] = {}
    for p in images:
        if p.stem in image_stems:
            raise DataError(f"{image_dir}: two images with the stem {p.stem!r}: {image_stems[p.stem].name}, {p.name}")
        image_stems[p.stem] = p
    no_mask = [p for p in images if p.stem not in by_stem]
    if no_mask:
        raise DataError(f"{len(no_mask)} of {len(images)} images have no mask in {mask_dir} (a mask has the image's "
                        "stem, e.g. photo.jpg -> photo.png): "
                        + ", ".join(str(p) for p in no_mask[:_SHOW]) + (" ..." if len(no_mask) > _SHOW else ""))
    no_image = [m for m in masks if m.stem not in image_stems]
    if no_image:
        raise DataError(f"{len(no_image)} masks have no image in {image_dir}: "
                        + ", ".join(str(m) for m in no_image[:_SHOW]) + (" ..." if len(no_image) > _SHOW else ""))
    if not images:
        raise DataError(f"{image_dir}: no images found")
    return [(p, by_stem[p.stem]) for p in images]


def _voc_root(root: Path) -> Path:
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir() and (cand / "SegmentationClass").is_dir():
            return cand
    return root


def read_voc(root: str | Path, split: str = "train", ignore_index: int = 255) -> SegmentationSource:
    """Pascal VOC: ``ImageSets/Segmentation/<split>.txt`` lists ids; ``JPEGImages/<id>.jpg`` and
    ``SegmentationClass/<id>.png`` (palette PNGs read as indices: 0 = background, 1..20 the
    classes, 255 = object boundaries = ignore). ``root`` may also be ``VOCdevkit/``."""
    root = _voc_root(Path(root).expanduser())
    names = (split,) if split != "val" else _VAL_ALIASES
    lists = [root / "ImageSets" / "Segmentation" / f"{n}.txt" for n in names]
    list_file = next((p for p in lists if p.is_file()), None)
    if list_file is None:
        raise DataError(f"{root}: no VOC {split} list (looked for {', '.join(str(p) for p in lists)})")
    ids = [line.split()[0] for line in list_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not ids:
        raise DataError(f"{list_file}: the list is empty")
    pairs = [(root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png") for i in ids]
    for what, k in (("images", 0), ("masks", 1)):
        missing = [p[k] for p in pairs if not p[k].is_file()]
        if missing:
            raise DataError(f"{list_file}: {len(missing)} of {len(pairs)} listed {what} are missing: "
                            + ", ".join(str(p) for p in missing[:_SHOW]) + (" ..." if len(missing) > _SHOW else ""))
    return SegmentationSource(str(root), pairs, list(VOC_CLASSES), ignore_index, "index")


def _ade_root(root: Path) -> Path:
    for cand in (root, root / "ADEChallengeData2016"):
        if (cand / "images" / "training").is_dir() or (cand / "annotations" / "training").is_dir():
            return cand
    return root


def read_ade20k(root: str | Path, split: str = "train", ignore_index: int = 255) -> SegmentationSource:
    """ADE20K SceneParsing (``ADEChallengeData2016``): ``images/{training,validation}/*.jpg`` and
    ``annotations/{training,validation}/*.png``; value 0 ("other") is ignored, ``v`` -> label ``v - 1``
    for the 150 classes."""
    root = _ade_root(Path(root).expanduser())
    sub = {"train": "training", "training": "training"}.get(split, "validation")
    image_dir, mask_dir = root / "images" / sub, root / "annotations" / sub
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise DataError(f"{root}: ADE20K folder {d} not found")
    report = SkipReport()
    pairs = _pair_by_stem(image_dir, mask_dir, report)
    return SegmentationSource(str(root), pairs, list(ADE20K_CLASSES), ignore_index, "ade20k", report=report)


def _folder_layouts(root: Path, split: str) -> list[tuple[Path, Path]]:
    names = _VAL_ALIASES if split in _VAL_ALIASES else (split,)
    return [(root / n / "images", root / n / "masks") for n in names] + [(root / "images", root / "masks")]


def read_folders(root: str | Path, split: str = "train", num_classes: int = 0,
                 class_names: Sequence[str] = (), ignore_index: int = 255) -> SegmentationSource:
    """``root/<split>/images`` + ``root/<split>/masks`` (val also valid / validation), else
    ``root/images`` + ``root/masks`` (the whole folder is the split); masks match images by stem and
    hold class indices (``ignore_index`` = ignore). ``num_classes`` 0: ``len(class_names)`` if given,
    else the largest label in the masks + 1 (every mask is read). Names default to ``class_<i>``."""
    root = Path(root).expanduser()
    layout = next(((i, m) for i, m in _folder_layouts(root, split) if i.is_dir() and m.is_dir()), None)
    if layout is None:
        looked = ", ".join(f"{i}/ + {m.name}/" for i, m in _folder_layouts(root, split))
        raise DataError(f"{root}: no image / mask folders for split {split!r} (looked for {looked})")
    report = SkipReport()
    pairs = _pair_by_stem(layout[0], layout[1], report)
    names = [str(n) for n in class_names]
    if num_classes and names and len(names) != num_classes:
        raise DataError(f"{root}: {len(names)} class names given for {num_classes} classes")
    k = num_classes or len(names)
    if not k:
        k = _max_label(pairs, ignore_index) + 1
    if not names:
        names = [f"class_{i}" for i in range(k)]
    return SegmentationSource(str(layout[0].parent), pairs, names, ignore_index, "index", report=report)


def _max_label(pairs: list[tuple[Path, Path]], ignore_index: int) -> int:
    def one(pair: tuple[Path, Path]) -> int:
        raw = _decode_mask(pair[1], pair[0], "index")
        values = np.unique(raw)
        values = values[values != ignore_index]
        if (values < 0).any():
            raise DataError(f"{pair[1]}: negative label values {_bad_values(values[values < 0])}")
        return int(values.max()) if len(values) else -1

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            top = max(pool.map(one, pairs))
    except MaskReadError as exc:
        raise DataError(f"cannot count the classes: {exc}") from None
    if top < 0:
        raise DataError(f"{pairs[0][1].parent}: the masks hold no labels (only the ignore index {ignore_index})")
    return top


# ------------------------------------------------------------------------------------------- COCO
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


# ---------------------------------------------------------------------------------------- finding
def _coco_json(root: Path, split: str) -> tuple[Path | None, list[str]]:
    from dinotune.tasks.detect.data import _coco_jsons

    found, looked = _coco_jsons(root, "val" if split in _VAL_ALIASES else "train")
    if len(found) > 1:
        raise DataError(f"{root}: several {split} annotation files match ({', '.join(p.name for p in found)}); "
                        "pass the JSON file itself")
    return (found[0] if found else None), looked


def find_segmentation_data(
    data: str | Path,
    split: Literal["train", "val"],
    images: str | Path = "",
    num_classes: int = 0,
    class_names: Sequence[str] = (),
    ignore_index: int = 255,
    *,
    categories: list[dict[str, Any]] | None = None,
) -> SegmentationSource:
    """One split of: Pascal VOC (``JPEGImages/`` + ``SegmentationClass/``), ADE20K
    (``images/training`` or ``annotations/training``), COCO (a ``.json`` file, or a folder with
    ``annotations/instances_<split>*.json``; ``images`` = its image folder, found when empty;
    ``categories`` = a checkpoint's category list), else image / mask folders (``num_classes`` and
    ``class_names`` apply to these only)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not str(data):
        raise DataError("no segmentation data given")
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"segmentation data not found: {path}")
    if path.is_file():
        if path.suffix.lower() == ".json":
            return read_coco_semantic(path, images or None, categories, ignore_index)
        raise DataError(f"{path}: expected a COCO instances .json or a folder (VOC, ADE20K, images/ + masks/)")
    voc = _voc_root(path)
    if (voc / "JPEGImages").is_dir() and (voc / "SegmentationClass").is_dir():
        return read_voc(voc, split, ignore_index)
    ade = _ade_root(path)
    if (ade / "images" / "training").is_dir() or (ade / "annotations" / "training").is_dir():
        return read_ade20k(ade, split, ignore_index)
    json_file, looked = _coco_json(path, split)
    if json_file is not None:
        return read_coco_semantic(json_file, images or None, categories, ignore_index)
    if any(i.is_dir() and m.is_dir() for i, m in _folder_layouts(path, split)):
        return read_folders(path, split, num_classes, class_names, ignore_index)
    folders = ", ".join(f"{i.relative_to(path)}/ + {m.relative_to(path)}/" for i, m in _folder_layouts(path, split))
    raise DataError(
        f"{path}: no {split} segmentation data found; looked for Pascal VOC (JPEGImages/ and SegmentationClass/), "
        f"ADE20K (images/training/ or annotations/training/), COCO ({', '.join(looked)}) and image / mask "
        f"folders ({folders})"
    )


# ------------------------------------------------------------------------------------------ scans
def _check_pair(source: SegmentationSource, index: int, mode: Literal["full", "fast"]
                ) -> tuple[str | None, str | None, str | None]:
    """(image problem, mask problem, DataError text) of one pair."""
    image_path, mask_path = source.pairs[index]
    problem = check_image(image_path, mode)
    if problem:
        return problem, None, None
    size = header_size(image_path)
    try:
        if source.mask_kind == "coco":
            c = source.coco[index]
            if size != (c.width, c.height):
                read_mask_labels(source, index, size)  # raises with the message
            return None, None, None
        if mode == "full":
            read_mask_labels(source, index, size)
            return None, None, None
        if mask_path is None or not mask_path.is_file():
            read_mask_labels(source, index, size)  # raises: missing mask
        problem = check_image(mask_path, "fast")
        if problem:
            return None, problem, None
        msize = header_size(mask_path)
        if msize != size:
            raise DataError(f"{mask_path}: mask is {msize[0]}x{msize[1]} but its image {image_path} is "
                            f"{size[0]}x{size[1]} (width x height); a mask must have its image's size")
    except MaskReadError as exc:
        return None, str(exc).split(": ", 1)[-1], None
    except DataError as exc:
        return None, None, str(exc)
    return None, None, None


def scan_source(source: SegmentationSource, mode: Literal["full", "fast", "off"] = "fast",
                workers: int = 8) -> SegmentationSource:
    """``source`` without the pairs whose image (or mask file) does not decode (``full``) or has a
    broken header (``fast``), each named with its reason in ``source.report``. Masks whose size
    differs from their image's are refused (DataError listing them); ``full`` also decodes every
    mask and refuses labels outside ``0..K-1``."""
    if mode == "off" or not len(source):
        return source
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda i: _check_pair(source, i, mode), range(len(source))))
    errors = [e for _, _, e in results if e]
    if errors:
        raise DataError(f"{len(errors)} of {len(source)} image/mask pairs in {source.name} cannot be used: "
                        + "; ".join(errors[:3]) + (" ..." if len(errors) > 3 else ""))
    keep = []
    for i, (image_problem, mask_problem, _) in enumerate(results):
        if image_problem:
            source.report.add(source.pairs[i][0], image_problem)
        elif mask_problem:
            source.report.add(source.pairs[i][1], f"mask: {mask_problem}")
        else:
            keep.append(i)
    if len(keep) == len(source):
        return source
    if not keep:
        raise DataError(f"{source.name}: none of the {len(source)} images could be read")
    return source.subset(keep)


def describe(source: SegmentationSource) -> str:
    """One line for the log: pairs, classes, layout."""
    kind = {"index": "masks", "ade20k": "ADE20K masks", "coco": "COCO polygons"}[source.mask_kind]
    return f"{source.name}: {len(source)} images with {kind}, {source.num_classes} classes"
