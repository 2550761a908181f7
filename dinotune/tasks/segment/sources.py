"""Segmentation data in memory (``SegmentationSource``) and mask loading.

``load_mask`` turns an image / mask pair into an ``H x W`` label array and refuses masks that do not
fit their image or hold labels outside ``0..K-1``; errors are ``DataError`` naming the file(s), the
problem and the values. ``scan_source`` checks a whole split up front, every mask's size and
labels included (a bad mask must not wait for the epoch that happens to draw it); what it learns of
a mask file is cached per process by path, size and modification time (``mask_summary``), so a
second scan (validation, evaluation, the class count of a folder layout) costs nothing. Images are
read upright (EXIF orientation applied), masks as stored: a mask has its image's displayed size.
The readers that build a source from a dataset layout live in ``layouts.py`` (VOC, ADE20K,
folders) and ``coco_masks.py``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np

from dinotune.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    PixelLimitError,
    SkipReport,
    check_image,
    describe_error,
    header_size,
    open_image,
)
from dinotune.errors import DataError, ImageReadError, MaskReadError
from dinotune.tasks.segment.colours import COLOUR_MODES, ColourTable, colour_text, pack_rgb, shares_text
from dinotune.utils import warn

__all__ = [
    "DataError", "MaskReadError", "CocoShapes", "SegmentationSource", "MaskSummary", "load_mask", "mask_summary",
    "read_mask_labels", "rasterize_coco", "scan_source", "colour_report", "describe",
]

MaskKind = Literal["index", "ade20k", "coco", "colour"]
_SHOW = 5  # offending entries listed in a message



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
    colours: ColourTable | None = None  # mask_kind "colour": the class of each mask colour

    def __post_init__(self) -> None:
        if 0 <= self.ignore_index < len(self.class_names):
            raise DataError(f"{self.name}: ignore_index {self.ignore_index} is a class label "
                            f"(0..{self.num_classes - 1}); choose a value outside the labels (255 by default)")
        if self.mask_kind == "coco" and (self.coco is None or len(self.coco) != len(self.pairs)):
            raise ValueError("a COCO source needs one CocoShapes entry per pair")
        if self.mask_kind == "colour" and (self.colours is None or len(self.colours) != self.num_classes):
            raise ValueError("a colour-mask source needs a colour table with one colour per class")

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


_MASK_MODES = ("P", "L", "1", "I", "I;16", "I;16B", "I;16L", "I;16N")


def _size_error(mask_path: Path, mask_size: tuple[int, int], image_path: Path,
                image_size: tuple[int, int]) -> DataError:
    """The one message for a mask whose size is not its image's (both ``(width, height)``)."""
    swapped = ("; width and height are swapped: images are read upright (their EXIF orientation "
               "applied) and masks as stored, so a mask must be in the displayed frame"
               if tuple(mask_size) == tuple(image_size)[::-1] else "")
    return DataError(f"{mask_path}: mask is {mask_size[0]}x{mask_size[1]} but its image {image_path} is "
                     f"{image_size[0]}x{image_size[1]} (width x height); a mask must have its image's size{swapped}")


def _decode_mask(mask_path: Path, image_path: Path, kind: MaskKind,
                 image_size: tuple[int, int] | None = None,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """The raw values of a label PNG (palette indices, not colours; never EXIF-turned), or for
    ``kind`` "colour" its colours packed into int32 codes (``colours.pack_rgb``; palette PNGs of any
    bit depth as their colours), or an error naming it. Mode and size (``image_size``: its image's,
    when known) are checked from the header, before anything is decoded; so is the pixel limit."""
    if not mask_path.is_file():
        raise DataError(f"{mask_path}: mask file not found (the mask of {image_path})")
    try:
        with open_image(mask_path, max_pixels) as im:
            mode = im.mode
            if kind == "colour" and mode not in COLOUR_MODES:
                raise DataError(f"{mask_path}: mask has image mode {mode!r}, which holds class indices, not "
                                "colours; --mask-colors reads colour masks (RGB or palette PNGs): leave it out "
                                "for index masks")
            if kind != "colour" and mode not in _MASK_MODES:
                hint = (" (VOC masks are palette PNGs: keep them as they are, do not convert them to RGB; "
                        "masks coloured one colour per class need a colour table: --mask-colors FILE)") \
                    if kind == "index" and mode in ("RGB", "RGBA") else ""
                raise DataError(f"{mask_path}: mask has image mode {mode!r}; expected a single-channel label "
                                f"image (palette or grayscale PNG whose values are class indices){hint}")
            if image_size is not None and im.size != tuple(image_size):
                raise _size_error(mask_path, im.size, image_path, image_size)
            im.load()
            if kind == "colour":
                return pack_rgb(np.asarray(im if mode == "RGB" else im.convert("RGB")))
            raw = np.array(im if mode != "1" else im.convert("L"))
            return (raw > 0).astype(np.uint8) if mode == "1" else raw
    except DataError:
        raise
    except PixelLimitError as exc:
        raise MaskReadError(str(exc)) from None
    except Exception as exc:  # PIL raises many types on bad data
        raise MaskReadError(f"{mask_path}: {describe_error(mask_path, exc)}") from None


@dataclass(frozen=True)
class MaskSummary:
    """What validating a mask file needs: its stored size and its distinct raw values."""

    width: int
    height: int
    values: np.ndarray  # sorted distinct raw values (colour masks: packed colours)
    counts: np.ndarray | None = None  # colour masks: the pixels of each value


# (path, bytes, mtime_ns, read as colours) -> summary: each mask file is decoded once per process
# while unchanged (and read the same way).
_MASK_CACHE: dict[tuple[str, int, int, bool], MaskSummary] = {}


def _distinct(raw: np.ndarray) -> np.ndarray:
    """Sorted distinct values; a histogram for 8 / 16-bit masks (several times faster than unique)."""
    if raw.dtype in (np.uint8, np.uint16):
        return np.flatnonzero(np.bincount(raw.ravel(), minlength=1)).astype(raw.dtype)
    return np.unique(raw)


def mask_summary(mask_path: Path, image_path: Path, kind: MaskKind,
                 image_size: tuple[int, int] | None = None,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, colours: ColourTable | None = None) -> MaskSummary:
    """Size and distinct values of a mask file, from the per-process cache or decoded once (see
    ``_decode_mask``; its errors). ``image_size``: the size the mask must have. Colour masks
    (``kind`` "colour", ``colours`` the table: it only speeds the count up) also get each colour's
    pixel count."""
    try:
        st = mask_path.stat()
    except OSError:
        raise DataError(f"{mask_path}: mask file not found (the mask of {image_path})") from None
    key = (str(mask_path), st.st_size, st.st_mtime_ns, kind == "colour")
    summary = _MASK_CACHE.get(key)
    if summary is None:
        raw = _decode_mask(mask_path, image_path, kind, image_size, max_pixels)
        if kind == "colour":
            values, counts = (colours.counts(raw) if colours is not None
                              else np.unique(raw.astype(np.int64), return_counts=True))
            summary = MaskSummary(raw.shape[1], raw.shape[0], values, counts.astype(np.int64))
        else:
            summary = MaskSummary(raw.shape[1], raw.shape[0], _distinct(raw))
        _MASK_CACHE[key] = summary
    if image_size is not None and (summary.width, summary.height) != tuple(image_size):
        raise _size_error(mask_path, (summary.width, summary.height), image_path, image_size)
    return summary


def _bad_values(values: np.ndarray, limit: int = _SHOW) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return shown + (f", ... ({len(values)} distinct values in all)" if len(values) > limit else "")


def _invalid(raw: np.ndarray, kind: MaskKind, k: int, ignore: int) -> np.ndarray:
    """The distinct raw values of ``raw`` (a mask, or its distinct values) that are neither a
    class nor ignored: ADE20K ``v`` is class ``v - 1`` and 0 is ignore; index masks hold classes;
    colour masks have none (a colour the table lacks is ignored, see ``colour_report``)."""
    raw = raw.astype(np.int64, copy=False)
    if kind == "colour":
        return raw[:0]
    if kind == "ade20k":
        label = raw - 1
        bad = (raw != 0) & (label != ignore) & ((label < 0) | (label >= k))
    else:
        bad = (raw != ignore) & ((raw < 0) | (raw >= k))
    return np.unique(raw[bad])


def _label_error(mask_path: Path, bad: np.ndarray, kind: MaskKind, k: int, ignore: int) -> DataError:
    if kind == "ade20k":
        return DataError(f"{mask_path}: ADE20K mask values {_bad_values(bad)} are outside 0..{k} "
                         f"(0 = ignore, 1..{k} = the {k} classes)")
    return DataError(f"{mask_path}: label values {_bad_values(bad)} are outside 0..{k - 1} ({k} classes) "
                     f"and not the ignore index {ignore}")


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
            swapped = ("; width and height are swapped: images are read upright (their EXIF orientation "
                       "applied) and the JSON must describe that displayed frame"
                       if tuple(image_size) == (shapes.height, shapes.width) else "")
            raise DataError(f"{source.name}: {image_path.name} is {shapes.width}x{shapes.height} in the JSON "
                            f"but the image file {image_path} is {image_size[0]}x{image_size[1]}{swapped}")
        return rasterize_coco(shapes, ignore, dtype)
    if mask_path is None:
        raise DataError(f"{image_path}: no mask file for this image in {source.name}")
    raw = _decode_mask(mask_path, image_path, source.mask_kind, image_size)
    if source.mask_kind == "colour":
        return source.colours.labels(raw, ignore, dtype)
    bad = _invalid(_distinct(raw), source.mask_kind, k, ignore)
    if len(bad):
        raise _label_error(mask_path, bad, source.mask_kind, k, ignore)
    if source.mask_kind == "ade20k":
        return np.where(raw == 0, ignore, raw.astype(np.int64) - 1).astype(dtype)
    return raw.astype(dtype, copy=False)


def load_mask(source: SegmentationSource, index: int) -> np.ndarray:
    """``H x W`` labels of pair ``index``, checked against its image's size (read from the header)."""
    image_path = source.pairs[index][0]
    size = header_size(image_path)
    if size is None:
        raise ImageReadError(f"{image_path}: {describe_error(image_path, OSError('cannot read the header'))}")
    return read_mask_labels(source, index, size)



# ------------------------------------------------------------------------------------------ scans
def _check_pair(source: SegmentationSource, index: int, mode: Literal["full", "fast"], max_pixels: int
                ) -> tuple[str | None, str | None, str | None]:
    """(image problem, mask problem, DataError text) of one pair. The mask is decoded in either
    mode (once per process, see ``mask_summary``): a label out of range must be found before
    training, not in whichever epoch first draws it."""
    image_path, mask_path = source.pairs[index]
    problem = check_image(image_path, mode, max_pixels)
    if problem:
        return problem, None, None
    size = header_size(image_path)
    try:
        if source.mask_kind == "coco":
            c = source.coco[index]
            if size != (c.width, c.height):
                read_mask_labels(source, index, size)  # raises with the message
            return None, None, None
        if mask_path is None:
            read_mask_labels(source, index, size)  # raises: no mask
        values = mask_summary(mask_path, image_path, source.mask_kind, size, max_pixels, source.colours).values
        bad = _invalid(values, source.mask_kind, source.num_classes, source.ignore_index)
        if len(bad):
            raise _label_error(mask_path, bad, source.mask_kind, source.num_classes, source.ignore_index)
    except MaskReadError as exc:
        return None, str(exc).split(": ", 1)[-1], None
    except DataError as exc:
        return None, None, str(exc)
    return None, None, None


def scan_source(source: SegmentationSource, mode: Literal["full", "fast", "off"] = "fast",
                workers: int = 8, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> SegmentationSource:
    """``source`` without the pairs whose image (or mask file) does not decode (``full``), has a
    broken header (``fast``) or more than ``max_pixels`` pixels, each named with its reason in
    ``source.report``. In both modes every mask is read (cached per process) and a mask whose
    size differs from its image's or that holds labels outside ``0..K-1`` (other than the ignore
    index) is refused: a DataError listing them, before any training."""
    if mode == "off" or not len(source):
        return source
    checked = _scan(source, mode, workers, max_pixels)
    if checked.mask_kind == "colour":
        colour_report(checked, max_pixels)
    return checked


def _scan(source: SegmentationSource, mode: Literal["full", "fast"], workers: int, max_pixels: int
          ) -> SegmentationSource:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda i: _check_pair(source, i, mode, max_pixels), range(len(source))))
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


def colour_report(source: SegmentationSource, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """What the colour masks of ``source`` hold against its table, from the scan's cached counts:
    colours the table lacks (ignored in loss and metrics) in one warning line with their pixel
    shares and files; table colours that occur in no mask in another, with the colours that do.
    None of the table's colours anywhere is a DataError: nothing would be learned or measured."""
    table = source.colours
    totals: dict[int, int] = {}
    files: dict[int, list[Path]] = {}
    for image_path, mask_path in source.pairs:
        summary = mask_summary(mask_path, image_path, "colour", None, max_pixels, table)
        for code, count in zip(summary.values.tolist(), summary.counts.tolist()):
            totals[code] = totals.get(code, 0) + count
            files.setdefault(code, []).append(mask_path)
    total = sum(totals.values())
    by_share = sorted(totals, key=lambda c: -totals[c])
    known = set(table.codes.tolist())
    seen = [c for c in by_share if c in known]
    held = shares_text(by_share, [totals[c] for c in by_share], total)
    if not seen:
        raise DataError(f"{source.name}: none of the {len(table)} colours of {table.source} occurs in the masks, "
                        f"which hold {held}{_bgr_hint(table, totals)}")
    absent = [(n, c) for n, c in zip(table.names, table.codes.tolist()) if c not in totals]
    if absent:
        warn(f"{source.name}: {len(absent)} colour(s) of {table.source} occur in no mask: "
             + ", ".join(f"{n} {colour_text(c)}" for n, c in absent[:8]) + (" ..." if len(absent) > 8 else "")
             + f"; the masks hold {held}{_bgr_hint(table, totals)}")
    stray = [c for c in by_share if c not in known]
    if stray:
        shown = [f"{colour_text(c)} {100 * totals[c] / total:.2f} % in {len(files[c])} file(s) ("
                 + ", ".join(p.name for p in files[c][:3]) + (" ..." if len(files[c]) > 3 else "") + ")"
                 for c in stray[:5]]
        share = 100 * sum(totals[c] for c in stray) / total
        warn(f"{source.name}: {len(stray)} mask colour(s) not in {table.source}, {share:.2f} % of the pixels, are "
             f"ignored in loss and metrics: " + "; ".join(shown) + (f"; and {len(stray) - 5} more" if len(stray) > 5
                                                                     else ""))


def _bgr_hint(table: ColourTable, totals: dict[int, int]) -> str:
    """A hint when table colours are missing but their channel-reversed twins are in the masks."""
    flipped = [n for n, (r, g, b), c in zip(table.names, table.rgb, table.codes.tolist())
               if c not in totals and r != b and ((b << 16) | (g << 8) | r) in totals]
    return (f" (the colours of {', '.join(flipped[:3])} occur with red and blue swapped: is the table in BGR order?)"
            if flipped else "")


def describe(source: SegmentationSource) -> str:
    """One line for the log: pairs, classes, layout."""
    kind = {"index": "masks", "ade20k": "ADE20K masks", "coco": "COCO polygons",
            "colour": "colour masks"}[source.mask_kind]
    return f"{source.name}: {len(source)} images with {kind}, {source.num_classes} classes"
