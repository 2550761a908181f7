"""Robust image reading: every format PIL opens, converted to RGB; bad files reported and skipped.
Band arrays (``.npy``, multi-band TIFF) are listed and checked here too, and read by ``data/arrays.py``.

Real folders hold GIFs, palette PNGs with transparency, CMYK JPEGs, 16-bit PNGs, phone photos
stored sideways with an EXIF orientation tag, truncated downloads, empty files, broken symlinks,
decompression bombs and stray ``.txt`` notes. Scanning finds the bad ones before training starts,
names each with its problem, and the count is printed; nothing else is lost.

Two rules hold for every read here (scan, header size, full load), so sizes and pixels agree:

- Images are upright: the EXIF orientation tag is applied (what ``ImageOps.exif_transpose`` does),
  read from the header without decoding; ``upright_image`` does the same for images already in
  memory. Annotations (COCO, YOLO) are taken to be in this displayed frame, as viewers, labelling
  tools, detectron2 and ultralytics use it. Masks are label maps, not photos: they are read as
  stored (``header_size(..., upright=False)``), so a mask matches its image's displayed size.
- An image with more pixels than ``max_pixels`` (default: Pillow's own 89,478,485) is refused from
  its header, before a byte of pixel data is decoded: a 140 KB PNG can claim 12000 x 12000 pixels
  and take gigabytes to decode. So is one longer than 1:100 (``data.arrays.MAX_ASPECT_RATIO``): a
  157-byte 1 x 20000 PNG, resized to the model's short side, asked gigabytes. 0 = no limit.

What the transforms make of an image is bounded by the same limit: ``work_size_problem`` says
why a resize / crop / padding to a given size is refused (``data/transforms.py`` and
``runtime/preprocess.py`` ask it before allocating).
"""

from __future__ import annotations

import errno
import functools
import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from dinotune.config.base import MAX_IMAGE_PIXELS
from dinotune.data.arrays import BandLayout, band_header, is_band_file, size_problem
from dinotune.errors import ImageReadError
from dinotune.utils import info, warn

IMAGE_EXTENSIONS = {
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif",
    ".npy",  # band arrays (data/arrays.py), as are TIFFs that are not plain pictures
}
# Known non-image clutter that is skipped without a warning.
_SILENT = {".ds_store", "thumbs.db", "desktop.ini"}
# What datasets keep beside their images (annotations, labels, lists, notes): in a folder a prediction
# searches for images they are expected, not a problem to report (a file named on its own still is;
# in training data, a stray file in a class folder is still worth a line).
_SIDECARS = {".json", ".xml", ".txt", ".csv", ".yaml", ".yml", ".md", ".names", ".cache"}

# Truncated files must fail loudly, not decode into half-grey images.
ImageFile.LOAD_TRUNCATED_IMAGES = False



# Bumped whenever reading gives other pixels for an unchanged file (2: EXIF orientation applied,
# 16-bit grayscale scaled), so caches keyed by file identity (path, size, mtime) can include it.
READER_VERSION = 2

# Pillow's own Image.MAX_IMAGE_PIXELS (~ 1/4 GB of 24-bit pixels), the configs' default
DEFAULT_MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

# EXIF orientation -> the transpose that turns the stored pixels upright (ImageOps.exif_transpose's table).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_16_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class PixelLimitError(ImageReadError):
    """An image header claims more pixels than the limit; nothing was decoded."""


def pixel_problem(size: tuple[int, int], max_pixels: int) -> str | None:
    """Why an image of ``size`` (width, height) is refused (more pixels than ``max_pixels``, or an
    aspect ratio beyond 1:``MAX_ASPECT_RATIO``), or None when it is within both (0 = no limit)."""
    return size_problem("image", size[0], size[1], max_pixels)


def work_size_problem(size: tuple[int, int], work: tuple[int, int], max_pixels: int, step: str) -> str | None:
    """Why an image of ``size`` ``(height, width)`` may not become ``work`` ``(height, width)`` (the
    result of a resize, crop or padding ``step``, e.g. "resized to the short side 256"): more pixels
    than ``max_pixels``, the limit its file was read under. None when within it (0 = no limit)."""
    (h, w), (wh, ww) = size, work
    if max_pixels and wh * ww > max_pixels:
        return (f"a {w}x{h} image {step} is {ww}x{wh} = {wh * ww:,} pixels, over the limit of {max_pixels:,} "
                "(--max-image-pixels), which bounds what the model's input is made from as well as the file; "
                "not resized")
    return None


def _let_pillow_open(max_pixels: int) -> None:
    """Pillow refuses images over twice its own global limit before we see their size; raise that
    limit (never lower it) so a larger ``--max-image-pixels`` is honoured. 0 lifts it."""
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and (not max_pixels or max_pixels > current):
        Image.MAX_IMAGE_PIXELS = max_pixels or None


@contextmanager
def open_image(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Iterator[Image.Image]:
    """``Image.open`` whose size is checked against ``max_pixels`` before anything is decoded
    (PixelLimitError). Pillow's notices (palette transparency, its own bomb warning, which this
    check replaces) are silenced while the image is in use."""
    _let_pillow_open(max_pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as exc:  # over twice Pillow's limit: also over ours
            raise PixelLimitError(f"{path}: over the pixel limit of {max_pixels:,} (--max-image-pixels): "
                                  f"{exc}") from None
        with im:
            problem = pixel_problem(im.size, max_pixels)
            if problem:
                raise PixelLimitError(f"{path}: {problem}")
            yield im


@functools.cache
def _pillow_turns_tiffs() -> bool:
    """Whether this Pillow turns TIFFs upright itself (newer ones do: size at open, pixels at load;
    ``pillow>=10`` allows both kinds), probed once on a 2x1 TIFF tagged "rotate 90"."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    buf = io.BytesIO()
    Image.new("L", (2, 1)).save(buf, "TIFF", exif=exif)
    with Image.open(buf) as im:
        return im.size == (1, 2)


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation still to apply (1..8; 1 = upright) from the header only. ``Image.getexif``
    of the base class: the PNG plugin's own version decodes the whole image to look for a late
    eXIf chunk. TIFFs that Pillow turns itself need nothing more."""
    if im.format == "TIFF" and _pillow_turns_tiffs():
        return 1
    try:
        value = Image.Image.getexif(im).get(ExifTags.Base.Orientation, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except Exception:  # a damaged EXIF block is no reason to lose the image: read it as stored
        return 1


def upright_size(im: Image.Image) -> tuple[int, int]:
    """``(width, height)`` as displayed: swapped when the orientation turns the image a quarter."""
    w, h = im.size
    return (h, w) if exif_orientation(im) in (5, 6, 7, 8) else (w, h)


def upright_image(im: Image.Image) -> Image.Image:
    """An in-memory image (e.g. from a Hugging Face dataset) turned upright by its EXIF tag."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # damaged EXIF: keep the pixels as stored
        return im


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Open ``path`` fully decoded as an upright RGB image, or raise ImageReadError naming the file
    (PixelLimitError, before decoding, when it has more than ``max_pixels`` pixels; 0 = no limit).
    Band arrays (``.npy``, multi-band TIFF) are not pictures: ``data.bands.read_input`` reads both."""
    path = Path(path)
    if is_band_file(path):
        raise ImageReadError(f"{path}: a band array (.npy / multi-band TIFF), not a picture; it is read with all "
                             "its bands (dinotune.data.bands.read_input)")
    try:
        with open_image(path, max_pixels) as im:
            method = _UPRIGHT.get(exif_orientation(im))  # read before load, as header_size does
            im.load()
            rgb = to_rgb(im)
        return rgb.transpose(method) if method is not None else rgb
    except PixelLimitError:
        raise
    except Exception as exc:  # PIL (and plugins patched into it) raise many types on bad data
        raise ImageReadError(f"{path}: {describe_error(path, exc)}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB copy of any PIL image; transparency is composited onto white, not black; 16-bit
    grayscale is scaled to 8 bits (``round(v / 257)``: 65535 -> 255), not clipped to white."""
    if im.mode == "RGB":
        return im.copy()
    if im.mode in _16_BIT_MODES:
        im = _to_8_bit(im)
    if im.mode in ("P", "LA", "PA") or (im.mode == "L" and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")


def _to_8_bit(im: Image.Image) -> Image.Image:
    """16-bit grayscale (``I;16*``; ``I``, which Pillow gives 16-bit PGMs and older Pillows 16-bit
    PNGs, is read on the same 0..65535 scale) -> ``L``. Pillow's own convert clips at 255, so
    every value above 255 (nearly the whole range) became white."""
    values = np.clip(np.asarray(im), 0, 65535).astype(np.uint32)
    return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), mode="L")


def describe_error(path: Path, exc: Exception) -> str:
    try:
        if path.stat().st_size == 0:
            return "empty file"
    except OSError:
        return "file not found or unreadable"
    if isinstance(exc, UnidentifiedImageError):
        return "not an image (PIL cannot identify it)"
    text = str(exc)
    if "truncated" in text or "broken data stream" in text:
        return "truncated or corrupt image data"
    return text or type(exc).__name__


def check_image(path: Path, mode: Literal["full", "fast"] = "full",
                max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, layout: BandLayout = "auto") -> str | None:
    """None if ``path`` decodes, else the problem. ``full`` decodes JPEGs at 1/8 scale (cheap,
    yet it reads every byte, so truncation is caught); ``fast`` only parses the header. Either
    refuses an image over ``max_pixels`` from its header, without decoding it. Band arrays
    (``.npy``, multi-band TIFF) are read with their own reader (all of them when ``full``:
    truncation and NaN / inf values are found too)."""
    if is_band_file(path):
        from dinotune.data.arrays import check_band_file

        return check_band_file(path, mode, max_pixels, layout)
    try:
        with open_image(path, max_pixels) as im:
            if mode == "fast":
                im.verify()
                return None
            im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
        return None
    except PixelLimitError as exc:
        return str(exc).split(": ", 1)[-1]
    except Exception as exc:  # PIL raises many exception types on bad data
        return describe_error(path, exc)


@dataclass
class SkipReport:
    """Files left out of a dataset, with their reasons."""

    skipped: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: str | Path, reason: str) -> None:
        self.skipped.append((str(path), reason))

    def __len__(self) -> int:
        return len(self.skipped)

    def why(self) -> str:
        """`` (FILE: REASON)`` of the first file left out ('' when none was): the error that nothing
        was left says why in its own line, not only in the warnings above it."""
        if not self.skipped:
            return ""
        path, reason = self.skipped[0]
        more = f"; and {len(self.skipped) - 1} more" if len(self.skipped) > 1 else ""
        return f" ({path}: {reason}{more})"

    def print(self, what: str = "files", limit: int = 20) -> None:
        if not self.skipped:
            return
        for path, reason in self.skipped[:limit]:
            warn(f"skipped {path}: {reason}")
        if len(self.skipped) > limit:
            warn(f"... and {len(self.skipped) - limit} more")
        info(f"skipped {len(self.skipped)} {what} that could not be used (listed above)")


def header_size(path: Path, upright: bool = True) -> tuple[int, int] | None:
    """``(width, height)`` from the image header (no decoding), or None if it cannot be read.
    ``upright``: as displayed, after the EXIF orientation (what ``load_image`` returns); False for
    masks, which are label maps read as stored. Band arrays: their height and width."""
    try:
        if is_band_file(path):
            header = band_header(path)
            return header.width, header.height
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's bomb warning: the size is all we read here
            with Image.open(path) as im:
                return upright_size(im) if upright else im.size
    except Exception:  # PIL raises many types on bad data; the caller reports the file
        return None


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def symlink_problem(path: Path) -> str | None:
    """Why a symlink cannot be followed ("broken symlink", "symlink loop"), or None (not a link,
    or a link that works). ``Path.is_file`` says False for both without saying why."""
    if not path.is_symlink():
        return None
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop (the link leads back to itself)"
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return f"broken symlink (points to {target}, which does not exist)"
    return None


def list_image_files(folder: Path, report: SkipReport, recursive: bool = False, sidecars: bool = False) -> list[Path]:
    """Image files in ``folder`` sorted by name; other files go to ``report`` (hidden ones quietly,
    and with ``sidecars`` the annotation and list files datasets keep beside their images), and so do
    broken and looping symlinks, which would otherwise vanish without a word. Symlinks that work are
    followed wherever they point (see ``dinotune.data.paths``)."""
    files = folder.rglob("*") if recursive else folder.iterdir()
    out = []
    for p in sorted(files):
        if not p.is_file():
            problem = symlink_problem(p)
            if problem:
                report.add(p, problem)
            elif recursive and p.is_symlink() and p.is_dir():  # rglob does not descend into these
                report.add(p, "symlink to a folder, not followed: its images are left out (link the files "
                              "instead, or pass the folder itself)")
            continue
        if is_image_file(p):
            out.append(p)
        elif (not p.name.startswith(".") and p.name.lower() not in _SILENT
              and not (sidecars and p.suffix.lower() in _SIDECARS)):
            report.add(p, f"not an image file (extension {p.suffix or 'none'!r})")
    return out


def scan_images(
    paths: Iterable[Path], report: SkipReport, mode: Literal["full", "fast", "off"] = "full",
    workers: int = 8, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, layout: BandLayout = "auto",
) -> list[bool]:
    """Check every path (in threads; PIL releases the GIL while decoding). Returns ok flags and
    records each bad file in ``report`` (images over ``max_pixels`` included, never decoded)."""
    paths = list(paths)
    if mode == "off":
        return [True] * len(paths)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = list(pool.map(lambda p: check_image(p, mode, max_pixels, layout), paths))
    for p, problem in zip(paths, problems):
        if problem:
            report.add(p, problem)
    return [problem is None for problem in problems]


def collect_images(inputs: str | Path | Iterable[str | Path], report: SkipReport) -> list[Path]:
    """Image files named by ``inputs``: files, or folders searched recursively, in order."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    out: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            out += list_image_files(p, report, recursive=True, sidecars=True)
        elif p.is_file():
            if is_image_file(p):
                out.append(p)
            else:
                report.add(p, f"not an image file (extension {p.suffix or 'none'!r})")
        else:
            report.add(p, symlink_problem(p) or "not found")
    return out


def readable_images(inputs: str | Path | Iterable[str | Path],
                    mode: Literal["full", "fast", "off"] = "fast",
                    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, layout: BandLayout = "auto") -> list[Path]:
    """The image files named by ``inputs`` that pass ``check_image``; the others are reported and
    counted. Raises ImageReadError when none is left."""
    report = SkipReport()
    paths = collect_images(inputs, report)
    ok = scan_images(paths, report, mode, max_pixels=max_pixels, layout=layout)
    report.print("inputs")
    paths = [p for p, good in zip(paths, ok) if good]
    if not paths:
        raise ImageReadError(f"no readable images in {inputs}{report.why()}")
    return paths
