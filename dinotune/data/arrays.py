"""Band arrays: ``.npy`` files and multi-band TIFF / GeoTIFF, read with every band kept.

Pillow reads pictures (1, 3 or 4 samples per pixel, 8-bit colour) but not a 13-band Sentinel-2
tile ("more samples per pixel than can be decoded"), so TIFFs whose header describes anything
else than a picture, and every ``.npy``, are read here: ``tifffile`` for TIFF, ``numpy.load`` with
``allow_pickle=False`` for ``.npy`` (an object array is refused, never unpickled).

Every reader returns ``H x W x C`` in the file's own dtype and units (uint16 reflectance stays
uint16 reflectance; scaling is the normaliser's job). Which axis holds the bands of a 3-d array is
read from the TIFF header where it says so (``YXS``: samples last, a page stack: bands first),
else taken from ``layout`` (``hwc`` / ``chw``), else (``auto``) it is the axis smaller than the
other two; a cube with no such axis is refused asking for ``--band-layout``.

What a header may claim is bounded before anything is decoded (``header_problem``, with the
limit ``--max-image-pixels`` sets; 0 lifts the first three):

- pixels: at most the limit (``height x width``), as for pictures;
- aspect ratio: at most 1:``MAX_ASPECT_RATIO``; a longer strip would blow up when resized to the
  model's short side (a 157-byte 1 x 20000 PNG asked gigabytes), pictures alike (``size_problem``);
- decoded bytes (``bands x pixels x bytes per sample``): at most what an RGB picture at the pixel
  limit decodes to (3 bytes a pixel), so a 13-band float32 tile cannot take 17x a picture's memory;
- TIFF pages: at most ``MAX_TIFF_PAGES``, counted from the chain of page offsets before tifffile
  parses a page (it takes seconds per thousand pages of varying shapes).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from dinotune.errors import DataError, ImageReadError

BandLayout = Literal["auto", "hwc", "chw"]
TIFF_EXTENSIONS = {".tif", ".tiff"}
NPY_EXTENSIONS = {".npy"}

# TIFF photometric interpretations that Pillow turns into a picture (gray, RGB, palette, CMYK, YCbCr)
_PICTURE_PHOTOMETRIC = {0, 1, 2, 3, 5, 6}

# The longest side at most this many times the shortest: a panorama (1:10) or a line-scan strip
# (1:50) reads; a 1 x 20000 image, resized to the model's short side, would not fit in memory.
MAX_ASPECT_RATIO = 100
# Pages of a TIFF (a page stack is read as bands): more than any imaging spectrometer's band count
# (AVIRIS-NG: 425, Specim FX10: 448); tifffile parses a page in about a millisecond, more when
# the pages differ in shape (20 000 such pages took 41 s).
MAX_TIFF_PAGES = 512
# Decoded bytes allowed per pixel of the pixel limit: an RGB picture's (8 bits x 3 samples).
BYTES_PER_PIXEL = 3


@dataclass(frozen=True)
class BandHeader:
    """What a band file's header says, before any pixel is decoded."""

    height: int
    width: int
    bands: int
    dtype: str


def size_problem(what: str, width: int, height: int, max_pixels: int) -> str | None:
    """Why an image or array (``what``) of ``width x height`` is refused: more pixels than
    ``max_pixels`` or a longer side over ``MAX_ASPECT_RATIO`` times the shorter; None when it is
    within both (or ``max_pixels`` is 0: no limit)."""
    if not max_pixels:
        return None
    if width * height > max_pixels:
        return (f"{what} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
                "(--max-image-pixels; a guard against decompression bombs); not decoded")
    short, long = min(width, height), max(width, height)
    if long > MAX_ASPECT_RATIO * max(short, 1):
        return (f"{what} is {width}x{height} pixels, an aspect ratio of 1:{long / max(short, 1):.0f}; at most "
                f"1:{MAX_ASPECT_RATIO} is read (resized for the model, a longer strip would not fit in memory; "
                "--max-image-pixels 0 lifts this guard); not decoded")
    return None


def header_problem(header: BandHeader, max_pixels: int) -> str | None:
    """Why a band file with ``header`` is refused before decoding: ``size_problem``, or more decoded
    bytes (``bands x pixels x bytes per sample``) than ``BYTES_PER_PIXEL x max_pixels``; None when
    it may be read (``max_pixels`` 0: no limit)."""
    problem = size_problem("array", header.width, header.height, max_pixels)
    if problem or not max_pixels:
        return problem
    itemsize = np.dtype(header.dtype).itemsize
    decoded = header.bands * header.height * header.width * itemsize
    if decoded > BYTES_PER_PIXEL * max_pixels:
        return (f"{header.bands} band(s) x {header.width}x{header.height} pixels x {itemsize} byte(s) "
                f"({header.dtype}) = {decoded:,} bytes decoded, over the limit of {BYTES_PER_PIXEL * max_pixels:,} "
                f"bytes ({BYTES_PER_PIXEL} bytes a pixel of --max-image-pixels {max_pixels:,}, what an RGB picture "
                "at the limit takes); not read")
    return None


def tiff_page_count(path: Path, limit: int = MAX_TIFF_PAGES) -> int:
    """Pages (IFDs) of a TIFF counted from its chain of page offsets, no page parsed, stopping at
    ``limit + 1``: a file of a million tiny pages costs what one of ``limit`` does. A chain that
    leaves the file or comes back on itself ends the count (the readers name the damage); 0 for
    what is not a TIFF."""
    with open(path, "rb") as f:
        head = f.read(16)
        order = {b"II": "<", b"MM": ">"}.get(head[:2])
        if order is None or len(head) < 16:
            return 0
        version = struct.unpack(order + "H", head[2:4])[0]
        if version == 42:  # classic TIFF: 2-byte tag counts, 12-byte tags, 4-byte offsets
            count_fmt, tag_size, offset_fmt = "H", 12, "I"
            offset = struct.unpack(order + "I", head[4:8])[0]
        elif version == 43:  # BigTIFF: 8-byte tag counts, 20-byte tags, 8-byte offsets
            count_fmt, tag_size, offset_fmt = "Q", 20, "Q"
            offset = struct.unpack(order + "Q", head[8:16])[0]
        else:
            return 0
        size = os.fstat(f.fileno()).st_size
        count_size, offset_size = struct.calcsize(count_fmt), struct.calcsize(offset_fmt)
        seen: set[int] = set()
        while 0 < offset < size and offset not in seen and len(seen) <= limit:
            seen.add(offset)
            f.seek(offset)
            raw = f.read(count_size)
            if len(raw) < count_size:
                break
            f.seek(offset + count_size + struct.unpack(order + count_fmt, raw)[0] * tag_size)
            raw = f.read(offset_size)
            if len(raw) < offset_size:
                break
            offset = struct.unpack(order + offset_fmt, raw)[0]
        return len(seen)


def tiff_pages_problem(path: Path) -> str | None:
    """Why a TIFF is refused for its page count (over ``MAX_TIFF_PAGES``), or None."""
    try:
        pages = tiff_page_count(path, MAX_TIFF_PAGES)
    except OSError:
        return None  # unreadable: the reader says so
    if pages > MAX_TIFF_PAGES:
        return (f"a TIFF of more than {MAX_TIFF_PAGES} pages; at most {MAX_TIFF_PAGES} pages (the bands of a page "
                "stack) are read")
    return None


def is_npy(path: Path) -> bool:
    return path.suffix.lower() in NPY_EXTENSIONS


def is_tiff(path: Path) -> bool:
    return path.suffix.lower() in TIFF_EXTENSIONS


def tiff_is_picture(path: Path) -> bool:
    """Whether a TIFF is a picture Pillow reads as today (gray, 8-bit RGB(A), palette, CMYK), rather
    than a band array. An unreadable header counts as a picture: Pillow then reports the damage."""
    import tifffile

    if tiff_pages_problem(path):  # no picture has that many pages: band_header refuses it by name
        return False
    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            series = tf.series[0]
            samples = int(page.samplesperpixel)
            alpha = sum(1 for e in (page.extrasamples or ()) if int(e) in (1, 2))  # associated / unassociated
            photometric = int(page.photometric) if page.photometric is not None else 1
            dtype = np.dtype(page.dtype) if page.dtype is not None else np.dtype(np.uint8)
            if len(series.shape) == 2:
                return dtype.kind in "uib" and dtype.itemsize <= 2  # one band: Pillow's gray path
            colour = samples - alpha
            return (photometric in _PICTURE_PHOTOMETRIC and dtype == np.uint8
                    and (colour == 3 or (photometric == 5 and colour == 4))
                    and len(series.shape) == 3 and series.shape[-1] == samples)
    except Exception:  # tifffile raises many types on damaged files; Pillow names the problem
        return True


def is_band_file(path: Path) -> bool:
    """A ``.npy``, or a TIFF that is not a plain picture (see ``tiff_is_picture``)."""
    path = Path(path)
    return is_npy(path) or (is_tiff(path) and path.is_file() and not tiff_is_picture(path))


def _tiff_axes(path: Path) -> tuple[tuple[int, ...], str, str]:
    import tifffile

    problem = tiff_pages_problem(path)  # before tifffile parses every page into its series
    if problem:
        raise ImageReadError(f"{path}: {problem}")
    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        return tuple(int(s) for s in series.shape), series.axes, str(np.dtype(series.dtype))


def _npy_header(path: Path) -> tuple[tuple[int, ...], str]:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = reader(f)
    _check_dtype(dtype, path)  # a record dtype has no name np.dtype() reads back: refused here
    return tuple(int(s) for s in shape), str(dtype)


def band_axis(shape: tuple[int, ...], layout: BandLayout, path: Path, axes: str = "") -> int | None:
    """The axis of ``shape`` holding the bands: None for a 2-d (one-band) array, 0 or 2 for 3-d.
    ``axes``: tifffile's axis letters (``YXS``, ``SYX``, ``IYX``, ...), which settle ``auto``."""
    if len(shape) == 2:
        return None
    if len(shape) != 3:
        raise ImageReadError(f"{path}: an array of shape {shape}; expected H x W, H x W x C or C x H x W")
    if layout == "hwc":
        return 2
    if layout == "chw":
        return 0
    if len(axes) == 3 and axes[1:] == "YX":
        return 0
    if len(axes) == 3 and axes[:2] == "YX":
        return 2
    a, _, c = shape
    if c < min(a, shape[1]):
        return 2
    if a < min(shape[1], c):
        return 0
    raise DataError(f"{path}: cannot tell which axis of the shape {shape} holds the bands (none is smaller than "
                    "the other two); pass --band-layout hwc or chw")


def _header_of(shape: tuple[int, ...], dtype: str, layout: BandLayout, path: Path, axes: str = "") -> BandHeader:
    axis = band_axis(shape, layout, path, axes)
    if axis is None:
        return BandHeader(shape[0], shape[1], 1, dtype)
    h, w = [s for i, s in enumerate(shape) if i != axis]
    return BandHeader(h, w, shape[axis], dtype)


def band_header(path: Path, layout: BandLayout = "auto") -> BandHeader:
    """Height, width, band count and dtype of a band file, from its header only. Raises
    ImageReadError (unreadable, wrong kind of array) or DataError (ambiguous layout)."""
    path = Path(path)
    try:
        if is_npy(path):
            shape, dtype = _npy_header(path)
            axes = ""
        else:
            shape, axes, dtype = _tiff_axes(path)
    except ImageReadError:
        raise
    except (OSError, ValueError) as exc:
        raise ImageReadError(f"{path}: {_describe(path, exc)}") from None
    except Exception as exc:  # tifffile's own error types on damaged files
        raise ImageReadError(f"{path}: {_describe(path, exc)}") from None
    _check_dtype(np.dtype(dtype), path)
    return _header_of(shape, dtype, layout, path, axes)


def _check_dtype(dtype: np.dtype, path: Path) -> None:
    if dtype.hasobject:
        raise ImageReadError(f"{path}: an object array, whose values would have to be unpickled; only numeric "
                             "arrays are read (numpy.load with allow_pickle=False)")
    if dtype.fields is not None or dtype.subdtype is not None:
        raise ImageReadError(f"{path}: a structured (record) array of {dtype}; band arrays are plain numbers "
                             "(bool, integer or float), one value per band and pixel")
    if dtype.kind not in "biuf":
        raise ImageReadError(f"{path}: holds {dtype} values; band arrays must be numbers (bool, integer or float)")


def _describe(path: Path, exc: Exception) -> str:
    try:
        if path.stat().st_size == 0:
            return "empty file"
    except OSError:
        return "file not found or unreadable"
    text = str(exc)
    if "allow_pickle" in text or "Object arrays" in text:
        return "an object (pickled) array; only numeric .npy arrays are read (allow_pickle=False)"
    return f"not a readable {'.npy array' if is_npy(path) else 'TIFF'} ({text or type(exc).__name__})"


def read_bands(path: Path, layout: BandLayout = "auto", max_pixels: int = 0) -> np.ndarray:
    """The whole band array of ``path`` as ``H x W x C`` in its own dtype. Raises ImageReadError
    naming the file: unreadable or truncated, not numeric, over the limits ``max_pixels`` sets
    (``header_problem``: pixels, aspect ratio, decoded bytes; from the header, before decoding; 0 = no
    limit), holding NaN / inf values or values beyond float32 (the model's input type)."""
    path = Path(path)
    header = band_header(path, layout)
    problem = header_problem(header, max_pixels)
    if problem:
        raise ImageReadError(f"{path}: {problem}")
    try:
        if is_npy(path):
            array = np.load(path, allow_pickle=False)
            axes = ""
        else:
            import tifffile

            with tifffile.TiffFile(path) as tf:
                axes = tf.series[0].axes
                array = tf.series[0].asarray()
    except Exception as exc:  # numpy / tifffile raise many types on truncated or damaged data
        raise ImageReadError(f"{path}: {_describe(path, exc)}") from None
    _check_dtype(array.dtype, path)
    axis = band_axis(array.shape, layout, path, axes)
    array = array[..., None] if axis is None else (np.moveaxis(array, 0, -1) if axis == 0 else array)
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array)
        if bad.any():
            bands = sorted({int(b) for b in np.nonzero(bad)[2]})
            raise ImageReadError(f"{path}: holds {int(bad.sum()):,} NaN / inf value(s) (band(s) "
                                 f"{', '.join(map(str, bands[:10]))}); fill or mask them before training")
        largest = float(np.finfo(np.float32).max)
        if array.dtype.itemsize > 4 and (array.max() > largest or array.min() < -largest):
            # float32 would turn them into inf, and the model's scores into NaN
            over = int(np.count_nonzero(array > largest) + np.count_nonzero(array < -largest))
            raise ImageReadError(f"{path}: holds {over:,} value(s) beyond float32's range (+-{largest:.4g}; "
                                 f"largest magnitude {max(abs(float(array.max())), abs(float(array.min()))):.4g}), "
                                 "which the model's float32 input cannot hold; rescale them")
    return np.ascontiguousarray(array)


def check_band_file(path: Path, mode: str, max_pixels: int, layout: str = "auto") -> str | None:
    """``check_image`` for band arrays (torch-free: the runtime uses it too): None when ``path`` reads, else the problem. ``fast`` reads the
    header; ``full`` reads every value (truncation, NaN / inf)."""
    try:
        if mode == "fast":
            return header_problem(band_header(path, layout), max_pixels)
        else:
            read_bands(path, layout, max_pixels)
        return None
    except ImageReadError as exc:
        return str(exc).split(": ", 1)[-1]
