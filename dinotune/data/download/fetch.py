"""One archive over HTTP: streamed to ``<file>.part`` with a progress bar, resumed with an HTTP
Range request after an interruption, checked against its size and checksum, then renamed to
``<file>``. A file that fails the check is moved aside to ``<file>.bad`` and refused, never used.
Nothing past the published size (``max_size`` where none is published) is ever written: a server
announcing more is refused before the body, and a stream running past it is cut there.

Only the standard library speaks HTTP here (``urllib``): no extra dependency for a one-off fetch.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from dinotune.data.download.catalog import Archive, human_size
from dinotune.errors import DataError
from dinotune.utils import info

__all__ = ["ATTEMPTS", "fetch", "keep_aside", "verify"]

ATTEMPTS = 4  # connections per call; each one after an interruption resumes where the last stopped
CHUNK = 1 << 20
TIMEOUT_S = 60.0
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
# What a dropped or unreachable connection looks like (http.client, sockets, timeouts); urllib
# wraps name-resolution and refused connections into URLError.
_NETWORK = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


def _bar(total: int | None, initial: int, name: str, enabled: bool) -> tqdm:
    """A byte progress bar on stderr, silent when stderr is not a terminal (as the training bars
    of ``dinotune.engine.logging.progress``; that module is not imported here: it pulls in torch)."""
    interactive = sys.stderr.isatty() or "ipykernel" in sys.modules
    return tqdm(total=total, initial=initial, desc=name, unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled or not interactive, file=sys.stderr, dynamic_ncols=True, leave=False)


def keep_aside(path: Path) -> Path:
    """Rename ``path`` (an archive or its ``.part``) to ``<archive>.bad`` (replacing an older one)
    so that no later step uses it."""
    bad = path.with_name(path.name.removesuffix(".part") + ".bad")
    os.replace(path, bad)
    return bad


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with path.open("rb") as f:
        while block := f.read(4 * CHUNK):
            h.update(block)
    return h.hexdigest()


def _bound_text(archive: Archive) -> str:
    if archive.size is not None:
        return f"the published size of {archive.size} bytes"
    return (f"{archive.size_bound} bytes ({human_size(archive.size_bound)}), the most dinotune accepts for this "
            "archive, whose size is not published")


def verify(path: Path, archive: Archive, url: str) -> None:
    """Size, then checksum, as the catalog gives them. On a mismatch the file is moved aside to
    ``<file>.bad`` and DataError says what differed and what to do."""
    size = path.stat().st_size
    problem = None
    if archive.size is not None and size != archive.size:
        problem = f"it has {size} bytes, the published size is {archive.size}"
    elif size > archive.size_bound:
        problem = f"it has {size} bytes, more than {_bound_text(archive)}"
    elif archive.checksum is not None:
        algorithm, expected = archive.checksum
        info(f"checking the {algorithm} of {archive.file_name} ({human_size(size)})")
        actual = _digest(path, algorithm)
        if actual != expected.lower():
            problem = f"its {algorithm} is {actual}, the published one is {expected}"
    if problem:
        bad = keep_aside(path)
        raise DataError(f"{archive.file_name} (from {url}) is not the published file: {problem}. It was moved aside to "
                        f"{bad} and not used; run the same command again to download it afresh (if it fails "
                        f"again, the server or mirror serves a different file)")


def _open(url: str, offset: int) -> http.client.HTTPResponse:
    headers = {"User-Agent": "dinotune"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)


def _resumed_at(resp: http.client.HTTPResponse, offset: int) -> int:
    """Where the body of ``resp`` starts: ``offset`` for a 206 that honours the Range, 0 for a
    server that ignored it (200) or answered another range (then the file starts over)."""
    if not offset:
        return 0
    if resp.status == 206:
        m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        if m and int(m.group(1)) == offset:
            return offset
    info(f"the server did not resume at byte {offset} (HTTP {resp.status}); downloading from the start")
    return 0


def _too_large(archive: Archive, url: str, part: Path, announced: int | None) -> DataError:
    """The refusal of a download that would pass the archive's size (``announced``: the size the
    server's Content-Length gives; None: the body ran past it). A ``.part`` is moved aside: it is
    never larger than the size, as nothing past it was written."""
    got = part.stat().st_size if part.exists() else 0
    bad = keep_aside(part) if part.exists() else None
    if announced is None:
        what = (f"the server sends more than {_bound_text(archive)}; the download was stopped there and the {got} "
                f"bytes received were moved aside to {bad}")
    else:
        what = f"the server announces {announced} bytes, more than {_bound_text(archive)}; nothing was downloaded"
        if bad:
            what += f" (the {got} bytes of an earlier call were moved aside to {bad})"
    return DataError(f"{archive.file_name} (from {url}): {what}. The server or mirror serves a different file: "
                     "check the URL or the mirror")


def _one_attempt(url: str, part: Path, archive: Archive, progress: bool) -> bool:
    """Stream the rest of ``url`` into ``part``; True when the body arrived whole. Connection
    errors before any byte arrives propagate (offline); an interruption mid-body returns False.
    DataError, with nothing written past ``archive.size_bound``, for a body larger than that."""
    bound = archive.size_bound
    offset = part.stat().st_size if part.exists() else 0
    if offset > bound:  # longer than the file can be: start over
        part.unlink()
        offset = 0
    try:
        resp = _open(url, offset)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset and (archive.size is None or offset == archive.size):
            return True  # the part already holds the whole file: nothing left to send
        raise
    with resp:
        start = _resumed_at(resp, offset)
        length = resp.headers.get("Content-Length")
        announced = start + int(length) if length and length.isdigit() else None
        if announced is not None and announced > bound:
            raise _too_large(archive, url, part, announced)
        expected = announced if announced is not None else archive.size
        received, over = start, False
        with part.open("r+b" if start else "wb") as f, _bar(expected, start, archive.file_name, progress) as bar:
            f.seek(start)
            f.truncate()
            while True:
                try:
                    block = resp.read(CHUNK)
                except _NETWORK as exc:
                    info(f"{archive.file_name}: connection lost after {received} bytes "
                         f"({exc or type(exc).__name__})")
                    return False
                if not block:
                    break
                if received + len(block) > bound:  # a stream without (or past) its Content-Length
                    f.write(block[:bound - received])
                    over = True
                    break
                f.write(block)
                received += len(block)
                bar.update(len(block))
    if over:
        raise _too_large(archive, url, part, None)
    if expected is not None and received < expected:
        info(f"{archive.file_name}: connection closed after {received} of {expected} bytes")
        return False
    return True


def fetch(url: str, dest: Path, archive: Archive, by_hand: str, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` (through ``dest.part``, resumed across interruptions and across
    calls) and verify it. ``by_hand``: the advice appended to the message when the server cannot
    be reached. Returns ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if part.exists():
        info(f"{dest.name}: resuming the earlier download at byte {part.stat().st_size}")
    size = (human_size(archive.size) if archive.size is not None
            else f"size not published, at most {human_size(archive.size_bound)}")
    info(f"downloading {url} ({size})")
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(min(0.5 * attempt, 5.0))
        try:
            whole = _one_attempt(url, part, archive, progress)
        except urllib.error.HTTPError as exc:
            raise DataError(f"{url}: the server answered HTTP {exc.code} {exc.reason}; check the URL or the "
                            f"mirror. {by_hand}") from None
        except _NETWORK as exc:
            reason = getattr(exc, "reason", None) or exc
            kept = f" ({part.stat().st_size} bytes are kept in {part} and resumed next time)" if part.exists() else ""
            raise DataError(f"cannot reach {url}: {reason}{kept}. {by_hand}") from None
        if whole:
            break
    else:
        got = part.stat().st_size if part.exists() else 0
        raise DataError(f"{url}: the connection broke {ATTEMPTS} times; {got} bytes are kept in {part}. Run the "
                        f"same command again to resume from there")
    verify(part, archive, url)
    os.replace(part, dest)
    if archive.checksum is None:
        info(f"{dest.name}: no checksum is published for this file; its size was checked")
    return dest
