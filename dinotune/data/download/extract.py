"""Safe extraction of a zip or tar archive into a folder: all of it, or nothing.

Every member is checked before any is written: an absolute name, a ``..`` component, a name that
resolves outside the target (through a link already there), a symbolic or hard link, a device or
FIFO, an encrypted member, a compression method Python cannot read, a file and a folder of one name,
and declared sizes adding up to more than the archive may extract to are refused, naming the member.
The members are then written into a scratch folder beside their destination, counting the bytes each
really yields (a member may hold more than it declares), and moved into the target only once every
one of them was extracted. On any failure (a CRC error, a truncated member, a full disk) the scratch
folder is removed and the target is left as it was. Members are copied as plain files (no owners,
modes or links from the archive), as tarfile's ``data`` filter does.
"""

from __future__ import annotations

import lzma
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from dinotune.data.download.catalog import human_size
from dinotune.errors import DataError

__all__ = ["RATIO", "safe_extract"]

RATIO = 10  # an archive given no bound of its own may extract to 10 x its size (JSON text: ~3.3 x)
CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")
_NOTHING = "the archive was refused and nothing was extracted"
# What reading a damaged member raises: zipfile (bad CRC, bad header), tarfile, a short stream, the
# decompressors (bz2 raises OSError; it is read apart from write errors below).
_DAMAGED = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError, ValueError)
_LISTING = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)  # opening or listing
_ZIP_READABLE = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_ZIP_METHOD_NAMES = {9: "Deflate64", 10: "PKWARE DCL Implode", 6: "Implode", 93: "Zstandard", 95: "XZ", 98: "PPMd",
                     99: "AES encryption"}


@dataclass(frozen=True)
class _Member:
    """One member: its name in the archive, its path below the target (``()``: the stripped top
    folder itself), whether it is a folder, its declared size in bytes and how to read it."""

    name: str
    parts: tuple[str, ...]
    is_dir: bool
    size: int
    open: Callable[[], IO[bytes]]


class _Failed(Exception):
    """A member that could not be extracted: the problem, in words (becomes a DataError)."""


def _parts(name: str, strip: str, archive: Path) -> tuple[str, ...]:
    """The path components of member ``name`` below the target; DataError for an absolute one or one
    with ``..``."""
    unified = name.replace("\\", "/")  # a backslash is a separator for Windows tools: check it as one
    if unified.startswith("/") or _DRIVE.match(unified):
        raise DataError(f"{archive.name}: member {name!r} has an absolute path; {_NOTHING}")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DataError(f"{archive.name}: member {name!r} climbs out of the target folder with '..' (path "
                        f"traversal); {_NOTHING}")
    if strip and parts and parts[0] == strip:
        parts = parts[1:]
    return tuple(parts)


def _zip_members(zf: zipfile.ZipFile, archive: Path) -> Iterator[tuple[str, bool, int, Callable[[], IO[bytes]]]]:
    for member in zf.infolist():
        why = None
        if stat.S_ISLNK(member.external_attr >> 16):
            why = "is a symbolic link; links are refused"
        elif member.flag_bits & 0x1:
            why = "is encrypted (password-protected); dinotune extracts no encrypted archive"
        elif member.compress_type not in _ZIP_READABLE:
            method = _ZIP_METHOD_NAMES.get(member.compress_type, "unknown")
            why = (f"is compressed with method {member.compress_type} ({method}), which Python's zipfile cannot "
                   "read; extract the archive with 7-Zip or unzip instead")
        if why:
            raise DataError(f"{archive.name}: member {member.filename!r} {why}; {_NOTHING}")
        yield member.filename, member.is_dir(), member.file_size, (lambda m=member: zf.open(m))


def _tar_members(tf: tarfile.TarFile, archive: Path) -> Iterator[tuple[str, bool, int, Callable[[], IO[bytes]]]]:
    for member in tf.getmembers():
        if member.issym() or member.islnk():
            raise DataError(f"{archive.name}: member {member.name!r} is a link (to {member.linkname!r}); links "
                            f"are refused, {_NOTHING}")
        if not (member.isfile() or member.isdir()):
            raise DataError(f"{archive.name}: member {member.name!r} is a device or FIFO, not a file; {_NOTHING}")
        yield member.name, member.isdir(), member.size if member.isfile() else 0, (lambda m=member: tf.extractfile(m))


def _plan(listed: Iterator[tuple[str, bool, int, Callable[[], IO[bytes]]]], archive: Path, target: Path, strip: str,
          limit: int, why_limit: str, reserved: str) -> tuple[list[_Member], dict[tuple[str, ...], str]]:
    """Check every member before anything is written. Returns the members and, for each path below
    the target, the member that puts it there (a folder: the first member inside it)."""
    members: list[_Member] = []
    files: dict[tuple[str, ...], str] = {}
    folders: dict[tuple[str, ...], str] = {}
    declared = 0
    for name, is_dir, size, opener in listed:
        parts = _parts(name, strip, archive)
        if parts and parts[0] == reserved:
            raise DataError(f"{archive.name}: member {name!r} would be written into dinotune's own folder "
                            f"{reserved}; {_NOTHING}")
        if parts and not target.joinpath(*parts).resolve().is_relative_to(target):
            raise DataError(f"{archive.name}: member {name!r} would be written outside {target} (through a link "
                            f"already there); {_NOTHING}")
        if not is_dir:
            declared += size
            if declared > limit:
                raise DataError(f"{archive.name}: member {name!r} declares {human_size(size)}, bringing what the "
                                f"archive extracts to {declared} bytes, more than {limit} ({human_size(limit)}), "
                                f"{why_limit} (a decompression bomb, or not the published archive); {_NOTHING}")
        members.append(_Member(name, parts, is_dir, size, opener))
        if parts:
            (folders if is_dir else files).setdefault(parts, name)
            for i in range(1, len(parts)):
                folders.setdefault(parts[:i], name)
    for parts, name in files.items():
        if parts in folders:
            raise DataError(f"{archive.name}: member {name!r} is a file, but member {folders[parts]!r} makes "
                            f"{'/'.join(parts)!r} a folder (a name clash); {_NOTHING}")
    return members, {**folders, **files}


def _copy(member: _Member, dest: Path) -> None:
    """Write ``member`` to ``dest``, never more than its declared size; _Failed says why not."""
    try:
        src = member.open()
    except (*_DAMAGED, NotImplementedError, RuntimeError) as exc:
        raise _Failed(f"cannot be read ({exc})") from None
    with src:
        try:
            out = dest.open("wb")
        except OSError as exc:
            raise _Failed(f"cannot be written to {dest} ({exc.strerror or exc})") from None
        with out:
            written = 0
            while True:
                try:
                    block = src.read(CHUNK)
                except _DAMAGED as exc:
                    raise _Failed(f"is damaged ({exc or type(exc).__name__})") from None
                if not block:
                    return
                written += len(block)
                if written > member.size:  # the sizes were checked as declared: a member may lie
                    raise _Failed(f"holds more than the {member.size} bytes it declares (not the published archive)")
                try:
                    out.write(block)
                except OSError as exc:
                    raise _Failed(f"cannot be written to {dest} ({exc.strerror or exc})") from None


def _write_all(members: list[_Member], scratch: Path, archive: Path) -> int:
    """Extract every member below ``scratch``; the number of files written."""
    written = 0
    for member in members:
        if not member.parts:
            continue
        dest = scratch.joinpath(*member.parts)
        try:
            if member.is_dir:
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DataError(f"{archive.name}: member {member.name!r} cannot be written to {dest} "
                            f"({exc.strerror or exc}); nothing was extracted") from None
        try:
            _copy(member, dest)
        except _Failed as exc:
            raise DataError(f"{archive.name}: member {member.name!r} {exc}; nothing was extracted (the partial "
                            "extraction was removed)") from None
        written += 1
    return written


def _moves(src: Path, dst: Path, rel: tuple[str, ...], names: dict[tuple[str, ...], str], archive: Path,
           out: list[tuple[Path, Path]]) -> None:
    """The renames that put the extracted tree ``src`` into ``dst``: a path not there yet moves as
    a whole, a folder already there is merged, a file already there is replaced; a file where a folder
    is (or the other way round) is refused before anything moves."""
    for child in sorted(src.iterdir()):
        there = dst / child.name
        here = (*rel, child.name)
        if not os.path.lexists(there):
            out.append((child, there))
        elif child.is_dir() and there.is_dir():
            _moves(child, there, here, names, archive, out)
        elif not child.is_dir() and not there.is_dir():
            out.append((child, there))
        else:
            kind, other = ("a folder", "a file") if child.is_dir() else ("a file", "a folder")
            raise DataError(f"{archive.name}: member {names.get(here, '/'.join(here))!r} is {kind}, but {there} is "
                            f"{other} already; move {there} away and run again. Nothing was extracted")


def _open_archive(archive: Path) -> zipfile.ZipFile | tarfile.TarFile:
    if zipfile.is_zipfile(archive):
        return zipfile.ZipFile(archive)
    if tarfile.is_tarfile(archive):
        return tarfile.open(archive, "r:*")
    raise DataError(f"{archive}: neither a zip nor a tar archive")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def safe_extract(archive: Path, target: Path, strip: str = "", max_bytes: int | None = None,
                 scratch: Path | None = None) -> int:
    """Extract ``archive`` (zip, or tar with any compression tarfile reads) into ``target``,
    dropping a leading folder ``strip`` of each member when present. ``max_bytes``: the most its
    members may extract to (None: ``RATIO`` x the archive's size). ``scratch``: the folder the
    members are first written to, on the target's file system (default ``target/.<archive>.extracting``;
    removed afterwards, and first if an interrupted call left it). Returns the number of files
    written. DataError, with the target as it was, for an unsafe or damaged archive."""
    target.mkdir(parents=True, exist_ok=True)
    target = target.resolve()
    scratch = scratch or target / f".{archive.name}.extracting"
    scratch = scratch.parent.resolve() / scratch.name  # not through a link: it is removed as a whole
    reserved = scratch.relative_to(target).parts[0] if scratch.is_relative_to(target) else ""
    if max_bytes is None:
        limit, why = RATIO * archive.stat().st_size, f"{RATIO} x the archive's size (no bound is given for it)"
    else:
        limit, why = max_bytes, "the most this archive may extract to"
    try:
        with _open_archive(archive) as container:
            listed = (_zip_members if isinstance(container, zipfile.ZipFile) else _tar_members)(container, archive)
            try:
                members, names = _plan(listed, archive, target, strip, limit, why, reserved)
            except _LISTING as exc:  # a tar is listed by reading it through: name where it broke
                seen = container.members if isinstance(container, tarfile.TarFile) else []
                where = f" at or after member {seen[-1].name!r}" if seen else ""
                raise DataError(f"{archive.name}: the archive is damaged{where} ({exc}); nothing was "
                                "extracted") from None
            try:
                _remove(scratch)
                scratch.mkdir(parents=True)
            except OSError as exc:
                raise DataError(f"{archive.name}: the folder {scratch} to extract it into cannot be made "
                                f"({exc.strerror or exc}); nothing was extracted") from None
            try:
                written = _write_all(members, scratch, archive)
                moves: list[tuple[Path, Path]] = []
                _moves(scratch, target, (), names, archive, moves)
                for src, dst in moves:
                    try:
                        os.replace(src, dst)
                    except OSError as exc:
                        raise DataError(f"{archive.name}: {src.relative_to(scratch)} cannot be moved to {dst} "
                                        f"({exc.strerror or exc}); the extraction is incomplete") from None
            finally:  # on failure the partial extraction, on success the emptied folders
                _remove(scratch)
    except _LISTING as exc:
        raise DataError(f"{archive}: the archive is damaged ({exc}); nothing was extracted") from None
    return written
