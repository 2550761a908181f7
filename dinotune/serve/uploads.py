"""Uploaded bytes -> the image array a predictor takes, validated like any file dinotune reads.

An upload is untrusted: its name is only a label (never a path), its type is read from its bytes
(not its name or Content-Type), and it is decoded by the project's own readers
(``data/images.py`` for pictures, ``data/arrays.py`` for ``.npy`` / multi-band TIFF; neither needs
torch, so an exported model is served without it), which need a file: the bytes are written into a private temporary folder (mode 0700) that is removed when the
request is done. Every refusal is an ``UploadError`` carrying the HTTP status it deserves and a
message that names the upload, never the temporary path.
"""

from __future__ import annotations

import io
import re
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from dinotune.data.arrays import band_header, is_band_file, read_bands
from dinotune.data.images import check_image, load_image
from dinotune.data.input_spec import InputSpec
from dinotune.errors import DataError, DinotuneError

# The first bytes of the two band-array formats (numpy's .npy magic; little / big endian TIFF,
# classic and BigTIFF). Anything else must be a picture Pillow identifies.
_NPY_MAGIC = b"\x93NUMPY"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_ACCEPTED = "a picture (JPEG, PNG, WebP, BMP, GIF, TIFF, ...), a .npy band array or a multi-band TIFF"


class UploadError(DataError):
    """An upload the server refuses; ``status`` is the HTTP status to answer with (413 too large,
    415 not an image, 422 unreadable or not fitting the model, 400 no file at all)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Upload:
    """A decoded upload.

    Attributes:
        name: the client's file name, reduced to a safe base name (what results call ``image``).
        array: ``H x W x 3`` uint8 RGB for pictures (upright, as ``load_image`` reads them);
            ``H x W x C`` in the file's dtype and units for band arrays (as ``read_bands``).
        is_array: whether it is a band array (``.npy`` / multi-band TIFF) rather than a picture.
    """

    name: str
    array: np.ndarray
    is_array: bool


def safe_name(filename: str | None, fallback: str = "upload") -> str:
    """The base name of a client's ``filename`` with anything but letters, digits, ``.-_`` replaced
    by ``_`` (at most 100 characters): a label for results, safe to use as a file name."""
    base = re.split(r"[\\/]", filename or "")[-1].strip().lstrip(".")
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base)[-100:]
    return base or fallback


def sniff_suffix(data: bytes, name: str = "upload") -> str:
    """The file suffix the readers need for ``data``: ``.npy``, ``.tif``, or a picture format's own
    (``.png``, ``.jpg``, ...). Raises UploadError (415) when it is none of these."""
    if data.startswith(_NPY_MAGIC):
        return ".npy"
    if data.startswith(_TIFF_MAGIC):
        return ".tif"
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the pixel limit is checked by the reader, from the header
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format or ""
    except UnidentifiedImageError:
        raise UploadError(415, f"{name}: not an image (no picture format recognised in its bytes); send {_ACCEPTED}") from None
    except Image.DecompressionBombError:
        fmt = ""  # identified, yet huge: the reader refuses it with the sizes and the limit
    except Exception as exc:  # a damaged header of a known format: the reader says what is wrong
        raise UploadError(422, f"{name}: unreadable image ({exc or type(exc).__name__})") from None
    suffixes = [ext for ext, name in Image.registered_extensions().items() if name == fmt]
    return ".jpg" if fmt == "JPEG" else (sorted(suffixes)[0] if suffixes else ".img")


@contextmanager
def decoded_upload(data: bytes, filename: str | None, spec: InputSpec, max_pixels: int) -> Iterator[Upload]:
    """Decode ``data`` for a model whose input is ``spec``; the temporary file lives as long as the
    ``with`` block.

    Raises UploadError: 400 empty; 415 not an image; 422 truncated or corrupt, over the limits
    ``max_pixels`` sets (``--max-image-pixels``: pixels, an aspect ratio beyond 1:100, a band
    array's decoded bytes, a TIFF's pages; refused from the header, never decoded), a picture where
    the model takes band arrays or the reverse, another band count than the model's (both counts
    named), a record dtype, NaN / inf values or values beyond float32. The server calls it under
    its lock: one upload is decoded at a time.
    """
    name = safe_name(filename)
    if not data:
        raise UploadError(400, f"{name}: empty upload (0 bytes)")
    suffix = sniff_suffix(data, name)
    with tempfile.TemporaryDirectory(prefix="dinotune-serve-") as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(data)
        try:
            yield _read(path, name, spec, max_pixels)
        except DinotuneError as exc:
            if isinstance(exc, UploadError):
                raise
            # the readers name the file they read: the client knows it by its own name
            raise UploadError(422, str(exc).replace(str(path), name)) from None


def _read(path: Path, name: str, spec: InputSpec, max_pixels: int) -> Upload:
    is_array = is_band_file(path)
    if is_array != spec.arrays:
        model = f"band arrays ({spec.in_channels} bands)" if spec.arrays else "pictures"
        raise UploadError(422, f"{name}: the model was trained on {model} but this upload is "
                               f"{'a band array' if is_array else 'a picture'}")
    if is_array:
        bands = band_header(path, spec.layout).bands  # from the header, before reading the values
        if bands != spec.in_channels:
            raise UploadError(422, f"{name}: has {bands} band(s) but the model takes {spec.in_channels}")
        return Upload(name, read_bands(path, spec.layout, max_pixels), True)
    problem = check_image(path, "full", max_pixels)  # every byte read: truncation is found here
    if problem:
        raise UploadError(422, f"{name}: {problem}")
    return Upload(name, np.asarray(load_image(path, max_pixels)), False)
