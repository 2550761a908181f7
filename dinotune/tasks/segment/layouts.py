"""Dataset layouts read into a ``SegmentationSource``: Pascal VOC (palette PNGs, 255 = boundary =
ignore), ADE20K (0 = "other" = ignore, ``v`` -> ``v - 1``), folders of images + masks with matching
stems; ``find_segmentation_data`` tells them (and COCO JSONs, see ``coco_masks.py``) apart. VOC and
folder masks may be colour-coded instead (a colour table, see ``colours.py``); colour masks without
a table are refused with the colours they hold. Splits: train, val and test (VOC's ``test.txt``,
``test/`` folders, a COCO ``instances_test*.json``); ADE20K has no annotated test split.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from dinotune.data.coco import find_coco_json
from dinotune.data.images import SkipReport, list_image_files
from dinotune.data.paths import read_list_ids
from dinotune.data.splits import SPLIT_ALIASES
from dinotune.errors import DataError
from dinotune.tasks.segment.coco_masks import read_coco_semantic
from dinotune.tasks.segment.colours import ColourTable, colour_masks_refusal
from dinotune.tasks.segment.sources import (
    _SHOW,
    MaskReadError,
    SegmentationSource,
    _bad_values,
    mask_summary,
)
from dinotune.utils import info

__all__ = ["VOC_CLASSES", "ADE20K_CLASSES", "read_voc", "read_ade20k", "read_folders", "find_segmentation_data"]

_VAL_ALIASES = SPLIT_ALIASES["val"]
_TEST_ALIASES = SPLIT_ALIASES.get("test", ("test",))
SPLITS = ("train", "val", "test")


def _aliases(split: str) -> tuple[str, ...]:
    """The names a split's list file or folder may go by (val: also valid / validation)."""
    return _VAL_ALIASES if split in _VAL_ALIASES else _TEST_ALIASES if split in _TEST_ALIASES else (split,)


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


def read_voc(root: str | Path, split: str = "train", ignore_index: int = 255, num_classes: int = 0,
             class_names: Sequence[str] = (), colours: ColourTable | None = None) -> SegmentationSource:
    """Pascal VOC layout: ``ImageSets/Segmentation/<split>.txt`` lists ids (train, val, test);
    ``JPEGImages/<id>.jpg`` and ``SegmentationClass/<id>.png`` (palette PNGs read as indices, 255 =
    object boundaries = ignore; with ``colours`` read as colours). ``root`` may also be
    ``VOCdevkit/``. Many tools export custom data in this layout, so the classes are not assumed
    to be Pascal's: see ``_voc_classes``."""
    root = _voc_root(Path(root).expanduser())
    names = _aliases(split)
    lists = [root / "ImageSets" / "Segmentation" / f"{n}.txt" for n in names]
    list_file = next((p for p in lists if p.is_file()), None)
    if list_file is None:
        raise DataError(f"{root}: no VOC {split} list (looked for {', '.join(str(p) for p in lists)})")
    ids = _voc_ids(list_file)
    pairs = [(root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png") for i in ids]
    for what, k in (("images", 0), ("masks", 1)):
        missing = [p[k] for p in pairs if not p[k].is_file()]
        if missing:
            raise DataError(f"{list_file}: {len(missing)} of {len(pairs)} listed {what} are missing: "
                            + ", ".join(str(p) for p in missing[:_SHOW]) + (" ..." if len(missing) > _SHOW else ""))
    if colours is not None:
        return SegmentationSource(str(root), pairs, _table_classes(root, colours, num_classes, class_names),
                                  ignore_index, "colour", colours=colours)
    _refuse_colour_masks(pairs, root)
    classes = _voc_classes(root, pairs, num_classes, class_names, ignore_index)
    return SegmentationSource(str(root), pairs, classes, ignore_index, "index")


def _refuse_colour_masks(pairs: Sequence[tuple[Path, Path]], where: Path) -> None:
    """Colour (RGB) masks without a colour table: refused with the colours they hold (a sample)."""
    refusal = colour_masks_refusal([m for _, m in pairs], str(where))
    if refusal is not None:
        raise refusal


def _table_classes(where: Path, colours: ColourTable, num_classes: int, class_names: Sequence[str]) -> list[str]:
    """The classes of colour masks: the table's, in its order. ``--class-names`` / ``--num-classes``
    (or the classes fixed by training) must agree with it, never silently lose."""
    names = [str(n) for n in class_names]
    if names and names != list(colours.names):
        raise DataError(f"{where}: the classes {names[:8]} differ from those of the colour table {colours.source} "
                        f"{list(colours.names)[:8]}; the table names the classes (leave --class-names out, or rename "
                        "them in the table)")
    if num_classes and num_classes != len(colours):
        raise DataError(f"{where}: --num-classes {num_classes} but the colour table {colours.source} has "
                        f"{len(colours)} classes; the table names the classes (leave --num-classes out)")
    return list(colours.names)


def _voc_classes(root: Path, pairs: list[tuple[Path, Path]], num_classes: int, class_names: Sequence[str],
                 ignore_index: int) -> list[str]:
    """The classes of a VOC-layout split: the user's (``--class-names`` / ``--num-classes``), else
    read off the masks. Pascal VOC's 21 names only when the labels reach exactly 20 (``tvmonitor``,
    present in every real VOC split): a custom 4-class set exported in this layout holds 0..3 and
    must not be called background / aeroplane / bicycle / bird."""
    given = _given_classes(root, num_classes, class_names, VOC_CLASSES)
    if given is not None:
        return given
    top = _max_label(pairs, ignore_index)
    if top == len(VOC_CLASSES) - 1:
        return list(VOC_CLASSES)
    info(f"{root}: the masks hold labels 0..{top}, so {top + 1} classes (class_0 .. class_{top}), not Pascal "
         f"VOC's 21 (its labels reach 20); name them with --class-names, or pass --num-classes 21 for Pascal's")
    return [f"class_{i}" for i in range(top + 1)]


def _given_classes(where: Path, num_classes: int, class_names: Sequence[str],
                   standard: Sequence[str] = ()) -> list[str] | None:
    """The classes the user gave: ``--class-names`` (whose count must equal a ``--num-classes``
    also given), or ``--num-classes`` alone, named as the layout's ``standard`` classes when the
    count is theirs (21 for VOC, 150 for ADE20K), else ``class_<i>``. None when neither was given:
    the layout decides."""
    names = [str(n) for n in class_names]
    if num_classes and names and len(names) != num_classes:
        raise DataError(f"{where}: --class-names gives {len(names)} names but --num-classes is {num_classes}; "
                        "give one name per class")
    if names:
        return names
    if num_classes:
        return list(standard) if len(standard) == num_classes else [f"class_{i}" for i in range(num_classes)]
    return None


def _voc_ids(list_file: Path) -> list[str]:
    """The image ids of a VOC split list (``read_list_ids``: stems of files in ``JPEGImages/`` and
    ``SegmentationClass/``)."""
    return read_list_ids(list_file, ".jpg", "JPEGImages/ and SegmentationClass/")


def _ade_root(root: Path) -> Path:
    for cand in (root, root / "ADEChallengeData2016"):
        if (cand / "images" / "training").is_dir() or (cand / "annotations" / "training").is_dir():
            return cand
    return root


def read_ade20k(root: str | Path, split: str = "train", ignore_index: int = 255, num_classes: int = 0,
                class_names: Sequence[str] = ()) -> SegmentationSource:
    """ADE20K SceneParsing (``ADEChallengeData2016``): ``images/{training,validation}/*.jpg`` and
    ``annotations/{training,validation}/*.png``; value 0 ("other") is ignored, ``v`` -> label ``v - 1``.
    The 150 SceneParsing classes unless ``--class-names`` / ``--num-classes`` say otherwise (a
    custom set in this layout: values ``1..K``)."""
    root = _ade_root(Path(root).expanduser())
    if split in _TEST_ALIASES:
        raise DataError(f"{root}: ADE20K has no annotated test split (its test images come without masks); "
                        "evaluate on the validation split (--split val)")
    sub = {"train": "training", "training": "training"}.get(split, "validation")
    image_dir, mask_dir = root / "images" / sub, root / "annotations" / sub
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise DataError(f"{root}: ADE20K folder {d} not found")
    report = SkipReport()
    pairs = _pair_by_stem(image_dir, mask_dir, report)
    classes = _given_classes(root, num_classes, class_names, ADE20K_CLASSES) or list(ADE20K_CLASSES)
    return SegmentationSource(str(root), pairs, classes, ignore_index, "ade20k", report=report)


def _folder_layouts(root: Path, split: str) -> list[tuple[Path, Path]]:
    names = _aliases(split)
    return [(root / n / "images", root / n / "masks") for n in names] + [(root / "images", root / "masks")]


def read_folders(root: str | Path, split: str = "train", num_classes: int = 0,
                 class_names: Sequence[str] = (), ignore_index: int = 255,
                 colours: ColourTable | None = None) -> SegmentationSource:
    """``root/<split>/images`` + ``root/<split>/masks`` (val also valid / validation; test), else
    ``root/images`` + ``root/masks`` (the whole folder is the split); masks match images by stem and
    hold class indices (``ignore_index`` = ignore), or with ``colours`` a colour per class (the
    table's classes; other colours are ignored). ``num_classes`` 0: ``len(class_names)`` if given,
    else the largest label in the masks + 1 (every mask is read). Names default to ``class_<i>``."""
    root = Path(root).expanduser()
    layout = next(((i, m) for i, m in _folder_layouts(root, split) if i.is_dir() and m.is_dir()), None)
    if layout is None:
        looked = ", ".join(f"{i}/ + {m.name}/" for i, m in _folder_layouts(root, split))
        raise DataError(f"{root}: no image / mask folders for split {split!r} (looked for {looked})")
    report = SkipReport()
    pairs = _pair_by_stem(layout[0], layout[1], report)
    if colours is not None:
        return SegmentationSource(str(layout[0].parent), pairs, _table_classes(root, colours, num_classes, class_names),
                                  ignore_index, "colour", report=report, colours=colours)
    _refuse_colour_masks(pairs, layout[1])
    names = _given_classes(root, num_classes, class_names)
    if names is None:
        names = [f"class_{i}" for i in range(_max_label(pairs, ignore_index) + 1)]
    return SegmentationSource(str(layout[0].parent), pairs, names, ignore_index, "index", report=report)


def _max_label(pairs: list[tuple[Path, Path]], ignore_index: int) -> int:
    """The largest label in the masks (each read once; the scan that follows reuses the reads)."""
    def one(pair: tuple[Path, Path]) -> int:
        values = mask_summary(pair[1], pair[0], "index").values.astype(np.int64)
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


def find_segmentation_data(
    data: str | Path,
    split: Literal["train", "val", "test"],
    images: str | Path = "",
    num_classes: int = 0,
    class_names: Sequence[str] = (),
    ignore_index: int = 255,
    *,
    categories: list[dict[str, Any]] | None = None,
    known_classes: Sequence[str] | None = None,
    colours: ColourTable | None = None,
) -> SegmentationSource:
    """One split of: Pascal VOC (``JPEGImages/`` + ``SegmentationClass/``), ADE20K
    (``images/training`` or ``annotations/training``), COCO (a ``.json`` file, or a folder with
    ``annotations/instances_<split>*.json``; ``images`` = its image folder, found when empty;
    ``categories`` = a checkpoint's category list), else image / mask folders.

    ``num_classes`` / ``class_names`` (``--num-classes`` / ``--class-names``) are honoured by every
    mask layout; COCO takes its classes from the JSON's categories, so giving them there is an
    error, never silently ignored. ``known_classes``: classes fixed already (the training split's
    when reading validation data, a checkpoint's when evaluating): a mask layout takes them instead
    of reading the flags or the masks, so both splits index the same classes (COCO keeps its
    ``categories`` rule). ``colours``: the colour table of colour-coded masks (``--mask-colors``,
    or a run's), for VOC and folder layouts only."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not str(data):
        raise DataError("no segmentation data given")
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"segmentation data not found: {path}")
    if known_classes is not None:
        num_classes, class_names = 0, list(known_classes)
    if path.is_file():
        if path.suffix.lower() == ".json":
            _no_colours(path, "COCO polygons", colours)
            return _read_coco(path, images, categories, ignore_index, num_classes, class_names, known_classes)
        raise DataError(f"{path}: expected a COCO instances .json or a folder (VOC, ADE20K, images/ + masks/)")
    voc = _voc_root(path)
    if (voc / "JPEGImages").is_dir() and (voc / "SegmentationClass").is_dir():
        return read_voc(voc, split, ignore_index, num_classes, class_names, colours)
    ade = _ade_root(path)
    if (ade / "images" / "training").is_dir() or (ade / "annotations" / "training").is_dir():
        _no_colours(ade, "ADE20K index masks", colours)
        return read_ade20k(ade, split, ignore_index, num_classes, class_names)
    if split in SPLIT_ALIASES:
        json_file, looked = find_coco_json(path, split)
    else:  # a split data/splits.py does not name: no COCO file patterns for it
        json_file, looked = None, [f"annotations/instances_{split}*.json"]
    if json_file is not None:
        _no_colours(json_file, "COCO polygons", colours)
        return _read_coco(json_file, images, categories, ignore_index, num_classes, class_names, known_classes)
    if any(i.is_dir() and m.is_dir() for i, m in _folder_layouts(path, split)):
        return read_folders(path, split, num_classes, class_names, ignore_index, colours)
    folders = ", ".join(f"{i.relative_to(path)}/ + {m.relative_to(path)}/" for i, m in _folder_layouts(path, split))
    raise DataError(
        f"{path}: no {split} segmentation data found; looked for Pascal VOC (JPEGImages/ and SegmentationClass/), "
        f"ADE20K (images/training/ or annotations/training/), COCO ({', '.join(looked)}) and image / mask "
        f"folders ({folders})"
    )


def _no_colours(where: Path, what: str, colours: ColourTable | None) -> None:
    if colours is not None:
        raise DataError(f"{where}: --mask-colors ({colours.source}) applies to colour-coded masks in VOC or "
                        f"images/ + masks/ folders, not to {what}; leave it out")


def _read_coco(json_file: Path, images: str | Path, categories: list[dict[str, Any]] | None, ignore_index: int,
               num_classes: int, class_names: Sequence[str], known_classes: Sequence[str] | None
               ) -> SegmentationSource:
    """COCO semantic masks; ``--num-classes`` / ``--class-names`` cannot change what the JSON's
    categories define, so they are refused by name (before the JSON is read) rather than ignored.
    Classes fixed by other data (``known_classes``) are compared by the caller, not refused here."""
    if known_classes is None:
        given = [flag for flag, value in (("--num-classes", num_classes), ("--class-names", list(class_names)))
                 if value]
        if given:
            raise DataError(f"{json_file}: {' and '.join(given)} cannot be applied to COCO data: its classes are "
                            "the JSON's categories (background + one per category, in id order); leave "
                            f"{'them' if len(given) > 1 else 'it'} out")
    return read_coco_semantic(json_file, images or None, categories, ignore_index)
