"""Segmentation data in memory (``SegmentationSource``) and mask loading.

``load_mask`` turns an image / mask pair into an ``H x W`` label array and refuses masks that do not
fit their image or hold labels outside ``0..K-1``; errors are ``DataError`` naming the file(s), the
problem and the values. ``scan_source`` checks a whole split up front. The readers that build a
source from a dataset layout live in ``layouts.py`` (VOC, ADE20K, folders) and ``coco_masks.py``.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
from PIL import Image

from dinotune.data.images import SkipReport, check_image, describe_error, header_size
from dinotune.errors import DataError, ImageReadError, MaskReadError

__all__ = [
    "DataError", "MaskReadError", "CocoShapes", "SegmentationSource", "load_mask", "read_mask_labels",
    "rasterize_coco", "scan_source", "describe",
]

MaskKind = Literal["index", "ade20k", "coco"]
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
