"""Robust image reading: every format PIL opens, converted to RGB; bad files reported and skipped.

Real folders hold GIFs, palette PNGs with transparency, CMYK JPEGs, truncated downloads, empty
files and stray ``.txt`` notes. Scanning finds the bad ones before training starts, names each with
its problem, and the count is printed; nothing else is lost.
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

from PIL import Image, ImageFile, UnidentifiedImageError

from dinotune.errors import ImageReadError
from dinotune.utils import info, warn

IMAGE_EXTENSIONS = {
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".jfif",
}
# Known non-image clutter that is skipped without a warning.
_SILENT = {".ds_store", "thumbs.db", "desktop.ini"}

# Truncated files must fail loudly, not decode into half-grey images.
ImageFile.LOAD_TRUNCATED_IMAGES = False



def load_image(path: str | Path) -> Image.Image:
    """Open ``path`` fully decoded as an RGB image, or raise ImageReadError naming the file."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-with-transparency notices
            with Image.open(path) as im:
                im.load()
                return to_rgb(im)
    except Exception as exc:  # PIL (and plugins patched into it) raise many types on bad data
        raise ImageReadError(f"{path}: {describe_error(path, exc)}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB copy of any PIL image; transparency is composited onto white, not black."""
    if im.mode == "RGB":
        return im.copy()
    if im.mode in ("P", "LA", "PA") or (im.mode == "L" and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")


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


def check_image(path: Path, mode: Literal["full", "fast"] = "full") -> str | None:
    """None if ``path`` decodes, else the problem. ``full`` decodes JPEGs at 1/8 scale (cheap,
    yet it reads every byte, so truncation is caught); ``fast`` only parses the header."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                if mode == "fast":
                    im.verify()
                    return None
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
        return None
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

    def print(self, what: str = "files", limit: int = 20) -> None:
        if not self.skipped:
            return
        for path, reason in self.skipped[:limit]:
            warn(f"skipped {path}: {reason}")
        if len(self.skipped) > limit:
            warn(f"... and {len(self.skipped) - limit} more")
        info(f"skipped {len(self.skipped)} {what} that could not be used (listed above)")


def header_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` from the image header (no decoding), or None if it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # PIL raises many types on bad data; the caller reports the file
        return None


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def list_image_files(folder: Path, report: SkipReport, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` sorted by name; other files go to ``report`` (hidden ones quietly)."""
    files = folder.rglob("*") if recursive else folder.iterdir()
    out = []
    for p in sorted(files):
        if not p.is_file():
            continue
        if is_image_file(p):
            out.append(p)
        elif not p.name.startswith(".") and p.name.lower() not in _SILENT:
            report.add(p, f"not an image file (extension {p.suffix or 'none'!r})")
    return out


def scan_images(
    paths: Iterable[Path], report: SkipReport, mode: Literal["full", "fast", "off"] = "full",
    workers: int = 8,
) -> list[bool]:
    """Check every path (in threads; PIL releases the GIL while decoding). Returns ok flags and
    records each bad file in ``report``."""
    paths = list(paths)
    if mode == "off":
        return [True] * len(paths)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = list(pool.map(lambda p: check_image(p, mode), paths))
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
            out += list_image_files(p, report, recursive=True)
        elif p.is_file():
            if is_image_file(p):
                out.append(p)
            else:
                report.add(p, f"not an image file (extension {p.suffix or 'none'!r})")
        else:
            report.add(p, "not found")
    return out


def readable_images(inputs: str | Path | Iterable[str | Path],
                    mode: Literal["full", "fast", "off"] = "fast") -> list[Path]:
    """The image files named by ``inputs`` that pass ``check_image``; the others are reported and
    counted. Raises ImageReadError when none is left."""
    report = SkipReport()
    paths = collect_images(inputs, report)
    ok = scan_images(paths, report, mode)
    report.print("inputs")
    paths = [p for p, good in zip(paths, ok) if good]
    if not paths:
        raise ImageReadError(f"no readable images in {inputs}")
    return paths
