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
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class BandHeader:
    """What a band file's header says, before any pixel is decoded."""

    height: int
    width: int
    bands: int
    dtype: str


def is_npy(path: Path) -> bool:
    return path.suffix.lower() in NPY_EXTENSIONS


def is_tiff(path: Path) -> bool:
    return path.suffix.lower() in TIFF_EXTENSIONS


def tiff_is_picture(path: Path) -> bool:
    """Whether a TIFF is a picture Pillow reads as today (gray, 8-bit RGB(A), palette, CMYK), rather
    than a band array. An unreadable header counts as a picture: Pillow then reports the damage."""
    import tifffile

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

    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        return tuple(int(s) for s in series.shape), series.axes, str(np.dtype(series.dtype))


def _npy_header(path: Path) -> tuple[tuple[int, ...], str]:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = reader(f)
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
    naming the file: unreadable or truncated, not numeric, more than ``max_pixels`` pixels
    (checked from the header, before decoding; 0 = no limit), or holding NaN / inf values."""
    path = Path(path)
    header = band_header(path, layout)
    if max_pixels and header.height * header.width > max_pixels:
        raise ImageReadError(f"{path}: array is {header.width}x{header.height} = {header.height * header.width:,} "
                             f"pixels, over the limit of {max_pixels:,} (--max-image-pixels); not read")
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
    return np.ascontiguousarray(array)


def check_band_file(path: Path, mode: str, max_pixels: int, layout: str = "auto") -> str | None:
    """``check_image`` for band arrays (torch-free: the runtime uses it too): None when ``path`` reads, else the problem. ``fast`` reads the
    header; ``full`` reads every value (truncation, NaN / inf)."""
    try:
        if mode == "fast":
            header = band_header(path, layout)
            if max_pixels and header.height * header.width > max_pixels:
                return (f"array is {header.width}x{header.height} = {header.height * header.width:,} pixels, over "
                        f"the limit of {max_pixels:,} (--max-image-pixels); not read")
        else:
            read_bands(path, layout, max_pixels)
        return None
    except ImageReadError as exc:
        return str(exc).split(": ", 1)[-1]
