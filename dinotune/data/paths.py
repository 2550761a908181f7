"""Paths written inside annotation and list files must stay inside the folder they are relative to.

A COCO ``file_name`` of ``../../../../etc/passwd`` or ``/home/me/.ssh/id_rsa`` would otherwise be
opened (and trained on, when it decodes as an image): annotation files travel with downloaded
datasets and are not to be trusted with the rest of the disk. Every path an annotation, split list
or CSV names relative to a folder goes through ``escape_problem``; the readers refuse the entries
it objects to with a ``DataError`` naming the file, the entry and the path.

What is checked is the text as written (lexically): no absolute path, no ``..`` that climbs above
the folder. Symlinks are followed wherever they point, on purpose: the file system is the user's
own, and common dataset stores are symlink farms pointing outside the dataset folder (the Hugging
Face hub cache links every file to ``../../blobs/<hash>``, DVC and git-annex link into their
caches), so refusing them would refuse real datasets. A link found in the folder listing that is
broken or loops is reported and skipped (``images.list_image_files``). Unpack untrusted archives
with a tool that refuses links leading outside (``tarfile`` ``filter="data"``).

Exceptions, both written by the user rather than shipped with data: an explicit CSV (``--data
list.csv``) or a YOLO ``.txt`` image list may hold absolute paths; their relative paths follow the
rule above.
"""

from __future__ import annotations

import os
from pathlib import Path

from dinotune.errors import DataError

__all__ = ["escape_problem", "join_inside", "read_list_ids"]


def escape_problem(written: str) -> str | None:
    """Why ``written``, a path relative to some folder, would leave it (or cannot be a file name);
    None when it stays inside."""
    if "\x00" in written:
        return "contains a NUL character"
    if os.path.isabs(written):
        return "is an absolute path"
    norm = os.path.normpath(written)
    if norm == os.pardir or norm.startswith(os.pardir + os.sep):
        return "climbs out of the folder with '..'"
    return None


def join_inside(root: Path, written: str) -> tuple[Path, str | None]:
    """``root / written`` and, when it would leave ``root``, why (see ``escape_problem``)."""
    problem = escape_problem(written)
    return Path(root) / written, (f"{written!r} {problem}; it must lie inside {root}" if problem else None)


def read_list_ids(list_file: Path, suffix: str, where: str) -> list[str]:
    """The ids of a split list (Pascal VOC's ``ImageSets/*/{train,val,test}.txt``): the first word of
    each non-empty line, a file stem. One whose file (``<id><suffix>``) would lead outside the
    dataset's folders (``where``: which, for the message) is refused naming the list, the line and
    the id; an unreadable or empty list is refused naming it."""
    try:
        lines = Path(list_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{list_file}: cannot read the list ({exc})") from None
    ids = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        ident = line.split()[0]
        problem = escape_problem(f"{ident}{suffix}")
        if problem:
            raise DataError(f"{list_file}, line {n}: image id {ident!r} leads outside {where} ({ident}{suffix} "
                            f"{problem}); a VOC id is a file stem inside them")
        ids.append(ident)
    if not ids:
        raise DataError(f"{list_file}: the list is empty")
    return ids
