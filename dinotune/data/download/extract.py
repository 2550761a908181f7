"""Safe extraction of a zip or tar archive into a folder.

Every member is checked before any is written: an absolute name, a ``..`` component, a name that
resolves outside the target (through a link already there), a symbolic or hard link and a device
or FIFO are refused, naming the member; nothing is extracted from such an archive. Members are
copied as plain files (no owners, modes or links from the archive), as tarfile's ``data`` filter does.
"""

from __future__ import annotations

import re
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from dinotune.errors import DataError

__all__ = ["safe_extract"]

_DRIVE = re.compile(r"^[A-Za-z]:")


def _destination(name: str, target: Path, strip: str, archive: Path) -> Path | None:
    """Where member ``name`` goes under ``target`` (resolved), or None for the stripped top folder
    itself; DataError when it would leave ``target``."""
    def refuse(why: str) -> DataError:
        return DataError(f"{archive.name}: member {name!r} {why}; the archive was refused and nothing was extracted")

    unified = name.replace("\\", "/")  # a backslash is a separator for Windows tools: check it as one
    if unified.startswith("/") or _DRIVE.match(unified):
        raise refuse("has an absolute path")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise refuse("climbs out of the target folder with '..' (path traversal)")
    if strip and parts and parts[0] == strip:
        parts = parts[1:]
    if not parts:
        return None
    dest = target.joinpath(*parts)
    if not dest.resolve().is_relative_to(target):
        raise refuse(f"would be written outside {target} (through a link already there)")
    return dest


def _zip_members(zf: zipfile.ZipFile, archive: Path) -> Iterator[tuple[str, bool, Callable[[], IO[bytes]]]]:
    for member in zf.infolist():
        mode = member.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise DataError(f"{archive.name}: member {member.filename!r} is a symbolic link; links are refused, "
                            "the archive was refused and nothing was extracted")
        yield member.filename, member.is_dir(), (lambda m=member: zf.open(m))


def _tar_members(tf: tarfile.TarFile, archive: Path) -> Iterator[tuple[str, bool, Callable[[], IO[bytes]]]]:
    for member in tf.getmembers():
        if member.issym() or member.islnk():
            raise DataError(f"{archive.name}: member {member.name!r} is a link (to {member.linkname!r}); links "
                            "are refused, the archive was refused and nothing was extracted")
        if not (member.isfile() or member.isdir()):
            raise DataError(f"{archive.name}: member {member.name!r} is a device or FIFO, not a file; the archive "
                            "was refused and nothing was extracted")
        yield member.name, member.isdir(), (lambda m=member: tf.extractfile(m))


def safe_extract(archive: Path, target: Path, strip: str = "") -> int:
    """Extract ``archive`` (zip, or tar with any compression tarfile reads) into ``target``,
    dropping a leading folder ``strip`` of each member when present. Returns the number of files
    written. DataError for an unsafe member (nothing written) or an unreadable archive."""
    target.mkdir(parents=True, exist_ok=True)
    target = target.resolve()
    try:
        if zipfile.is_zipfile(archive):
            container = zipfile.ZipFile(archive)
            members = _zip_members
        elif tarfile.is_tarfile(archive):
            container = tarfile.open(archive, "r:*")
            members = _tar_members
        else:
            raise DataError(f"{archive}: neither a zip nor a tar archive")
        with container:
            planned = [(_destination(name, target, strip, archive), is_dir, opener)
                       for name, is_dir, opener in members(container, archive)]
            written = 0
            for dest, is_dir, opener in planned:
                if dest is None:
                    continue
                if is_dir:
                    dest.mkdir(parents=True, exist_ok=True)
                    continue
                dest.parent.mkdir(parents=True, exist_ok=True)
                with opener() as src, dest.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                written += 1
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
        raise DataError(f"{archive}: the archive is damaged ({exc}); delete it and download it again") from None
    return written
