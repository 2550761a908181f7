"""``download_dataset``: fetch, verify and extract the archives of a catalog dataset, once.

State lives in ``DIR/.dinotune-download/``: ``<file>.part`` while downloading, ``<file>`` once
verified, ``<file>.bad`` when it failed the check or its extraction, ``<file>.extracting/`` while it
is extracted (moved into ``DIR`` only once whole; removed on failure) and ``<file>.done`` (JSON)
after its extraction.
An archive with a ``.done`` marker is never fetched or extracted again, so a second call finds the
dataset done and does nothing; asking later for another split fetches only what it adds.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dinotune.data.download.catalog import (
    CATALOG,
    MIRROR_ENV,
    Archive,
    DatasetEntry,
    archives_for,
    human_size,
)
from dinotune.data.download.extract import safe_extract
from dinotune.data.download.fetch import fetch, keep_aside, verify
from dinotune.errors import ConfigError, DataError
from dinotune.utils import info, warn

__all__ = ["DEFAULT_ROOT", "STATE_DIR", "default_dir", "download_dataset", "find_dataset"]

STATE_DIR = ".dinotune-download"
DEFAULT_ROOT = "data"  # datasets go to data/<name> unless --to says otherwise


def find_dataset(name: str) -> DatasetEntry:
    key = name.lower()
    for entry in CATALOG.values():
        if key == entry.name or key in entry.aliases:
            return entry
    raise ConfigError(f"unknown dataset {name!r} for dinotune data download; choose from {', '.join(CATALOG)}")


def default_dir(name: str) -> Path:
    return Path(DEFAULT_ROOT) / find_dataset(name).name


def _base_url(entry: DatasetEntry, mirror: str | None) -> str:
    base = mirror or os.environ.get(MIRROR_ENV) or entry.base_url
    return base if base.endswith("/") else base + "/"


def _by_hand(entry: DatasetEntry, archive: Archive, root: Path) -> str:
    return (f"Offline? Download {entry.base_url}{archive.path} by hand and put {archive.file_name} into {root} "
            f"(the next call checks and extracts it from there), or extract it yourself so that {root} holds "
            f"{entry.layout} and pass that folder to --data; a mirror is named with --mirror URL or ${MIRROR_ENV}")


def _check_space(root: Path, todo: list[Archive]) -> None:
    """Warn (not refuse: the extracted sizes are bounds, not exact) when the disk looks too small
    for the archives plus their contents."""
    need = sum(a.size_bound + (a.max_extracted or a.size_bound) for a in todo)
    probe = next(p for p in [root, *root.parents] if p.exists())
    free = shutil.disk_usage(probe).free
    if need > free:
        warn(f"{root}: up to {human_size(need)} are needed (archives + extracted files), {human_size(free)} are free")


def _obtain(entry: DatasetEntry, archive: Archive, root: Path, base: str, progress: bool) -> tuple[Path, bool]:
    """The verified archive and whether dinotune downloaded it (then it may delete it): one the
    user put into ``root`` by hand, one verified earlier, or a fresh download."""
    url = base + archive.path
    by_hand = root / archive.file_name
    if by_hand.is_file():
        info(f"using {by_hand} (put there by hand)")
        verify(by_hand, archive, str(by_hand))
        return by_hand, False
    dest = root / STATE_DIR / archive.file_name
    if dest.is_file():  # verified by an earlier call whose extraction did not finish
        return dest, True
    return fetch(url, dest, archive, _by_hand(entry, archive, root), progress), True


def download_dataset(name: str, to: str | Path | None = None, splits: Sequence[str] = (), mirror: str | None = None,
                     keep_archives: bool = False, progress: bool = True) -> dict[str, Any]:
    """Download and extract dataset ``name`` (a ``CATALOG`` key) into ``to`` (default
    ``data/<name>``) for ``splits`` (default: all it offers). ``mirror``: a base URL replacing the
    official one (also ``$DINOTUNE_DOWNLOAD_MIRROR``). ``keep_archives``: keep the downloaded
    archives after extraction (they are deleted by default).

    Returns ``{"dataset", "dir", "splits", "fetched": [file names], "already": [file names],
    "layout", "use"}`` (``use``: the dinotune command that reads the folder)."""
    entry = find_dataset(name)
    chosen = list(dict.fromkeys(splits)) or list(entry.splits)
    unknown = [s for s in chosen if s not in entry.splits]
    if unknown:
        raise ConfigError(f"--splits {' '.join(unknown)}: {entry.name} offers {', '.join(entry.splits)}")
    root = Path(to).expanduser() if to else default_dir(entry.name)
    base = _base_url(entry, mirror)
    state = root / STATE_DIR
    archives = archives_for(entry, chosen)
    done = [a for a in archives if (state / f"{a.file_name}.done").is_file()]
    todo = [a for a in archives if a not in done]
    result = {"dataset": entry.name, "dir": str(root), "splits": chosen, "fetched": [a.file_name for a in todo],
              "already": [a.file_name for a in done], "layout": entry.layout, "use": entry.use.format(dir=root)}
    if not todo:
        info(f"{entry.name} ({', '.join(chosen)}) is already in {root}: nothing to do")
        return result
    root.mkdir(parents=True, exist_ok=True)
    _check_space(root, todo)
    for archive in todo:
        path, ours = _obtain(entry, archive, root, base, progress)
        info(f"extracting {archive.file_name} into {root}")
        try:
            files = safe_extract(path, root, archive.strip, max_bytes=archive.max_extracted,
                                 scratch=state / f"{archive.file_name}.extracting")
        except DataError as exc:
            if not ours:
                raise
            bad = keep_aside(path)  # refused content: the next call downloads afresh instead of re-using it
            raise DataError(f"{exc}; {archive.file_name} was moved aside to {bad} (the next call downloads it "
                            "afresh)") from None
        marker = {"url": base + archive.path, "file": archive.file_name, "size": archive.size,
                  "checksum": list(archive.checksum) if archive.checksum else None, "files": files,
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        state.mkdir(parents=True, exist_ok=True)
        done = state / f"{archive.file_name}.done"
        done.with_suffix(".tmp").write_text(json.dumps(marker, indent=1))
        os.replace(done.with_suffix(".tmp"), done)  # a marker is whole or absent
        if ours and not keep_archives:
            path.unlink()
    info(f"{entry.name} is ready in {root} ({entry.layout}): {result['use']}")
    return result
