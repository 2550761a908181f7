"""Round two, downloads: ``dinotune data download`` against a local mirror that misbehaves (a body
past the published size, with or without Content-Length; an archive whose size is not published)
and archives that are bombs or damaged (a zip bomb of exactly the published size, a member holding
more than it declares, a CRC error, a Deflate64 member, an encrypted member, a file / folder name
clash). Handled: one error line naming the archive (and the member), nothing written past the
bound, nothing extracted, the archive moved aside (never kept as verified nor marked done)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from dinotune.data.download import extract
from dinotune.data.download.catalog import CATALOG, Archive
from dinotune.data.download.dataset import STATE_DIR
from hostile.common import case, make_class_folders, refused, run
from tests.test_download import FileServer, zip_folder
from tests.test_hostile_downloads import DAMAGED, bomb

ZIP = "hymenoptera_data.zip"


@contextlib.contextmanager
def _mirror(archive: Archive, files: dict[str, bytes], streams: dict[str, Callable[[], Iterable[bytes]]] | None = None,
            lengths: dict[str, int] | None = None) -> Iterator[str]:
    """The hymenoptera entry pointed at ``archive`` and a local mirror serving ``files`` / ``streams``
    (without Content-Length unless ``lengths`` gives one); yields the mirror's URL."""
    server = FileServer(files)
    server.streams.update(streams or {})
    server.lengths.update(lengths or {})
    entry = CATALOG["hymenoptera"]
    CATALOG["hymenoptera"] = dataclasses.replace(entry, splits={"train": (archive,), "val": (archive,)})
    try:
        yield server.url
    finally:
        CATALOG["hymenoptera"] = entry
        server.httpd.shutdown()
        server.httpd.server_close()


def _published(data: bytes, **bounds) -> Archive:
    """``data`` as the hymenoptera zip: its exact size published, no checksum (as the real one)."""
    return Archive(ZIP, len(data), None, strip="hymenoptera_data", **bounds)


def _good_zip(tmp: Path) -> bytes:
    for split in ("train", "val"):
        make_class_folders(tmp / "src" / split, ["red", "blue"], 2, size=16, seed=len(split))
    return zip_folder(tmp / "src", "hymenoptera_data/")


def _download(tmp: Path, url: str) -> tuple[int | None, str, Path]:
    root = tmp / "hym"
    code, err = run(["data", "download", "hymenoptera", "--to", str(root), "--mirror", url])
    return code, err, root


def _left(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


def _only_bad(root: Path, most: int | None = None) -> tuple[bool, str]:
    """Only the state folder and ``<zip>.bad`` (at most ``most`` bytes) are left: nothing extracted,
    no .part, no archive kept as verified, no marker."""
    left = _left(root)
    bad = root / STATE_DIR / f"{ZIP}.bad"
    ok = left == [STATE_DIR, f"{STATE_DIR}/{ZIP}.bad"] and (most is None or bad.stat().st_size <= most)
    size = f", .bad {bad.stat().st_size} bytes" if bad.exists() else ""
    return ok, "" if ok else f"; left {left[:6]}{'...' if len(left) > 6 else ''}{size}"


def _judge(code: int | None, err: str, root: Path, needles: tuple[str, ...],
           most: int | None = None) -> tuple[bool, str]:
    ok, why = refused(code, err, *needles)
    clean, left = _only_bad(root, most)
    return ok and clean, why + left


# -------------------------------------------------------------------------------- downloads
@case("R2-H6", "a mirror streams 8 MB past the published size, without Content-Length", hole=True)
def _(tmp: Path):
    good = _good_zip(tmp)
    with _mirror(_published(good), {}, {ZIP: lambda: [good, *([bytes(64 << 10)] * 128)]}) as url:
        code, err, root = _download(tmp, url)
    return _judge(code, err, root, (ZIP, "sends more than the published size", "stopped"), most=len(good))


@case("R2-dl-1", "a mirror announces (Content-Length) more than the published size")
def _(tmp: Path):
    good = _good_zip(tmp)
    with _mirror(_published(good), {}, {ZIP: lambda: [good, bytes(1000)]}, {ZIP: len(good) + 1000}) as url:
        code, err, root = _download(tmp, url)
    ok, why = refused(code, err, ZIP, "announces", "nothing was downloaded")
    left = _left(root)
    return ok and left == [STATE_DIR], why + ("" if left == [STATE_DIR] else f"; left {left}")


@case("R2-dl-2", "an archive without a published size, streamed past the catalog's bound")
def _(tmp: Path):
    archive = Archive(ZIP, None, ("sha256", "0" * 64), strip="hymenoptera_data", max_size=100_000)
    with _mirror(archive, {}, {ZIP: lambda: [bytes(64 << 10)] * 16}) as url:
        code, err, root = _download(tmp, url)
    return _judge(code, err, root, (ZIP, "100000 bytes", "size is not published"), most=100_000)


# ------------------------------------------------------------------------------- extraction
@case("R2-H7", "a zip bomb of exactly the published size (4 MB of zeros in 4 KB)", hole=True)
def _(tmp: Path):
    data = bomb()
    with _mirror(_published(data), {ZIP: data}) as url:
        code, err, root = _download(tmp, url)
    return _judge(code, err, root, (ZIP, "bomb.bin", "declares", "decompression bomb"))


@case("R2-dl-3", "a member holding more than it declares (the declared sizes made to lie)")
def _(tmp: Path):
    data = bomb()
    honest = extract._zip_members

    def lying(zf, archive):
        for name, is_dir, size, opener in honest(zf, archive):
            yield name, is_dir, min(size, 100), opener

    extract._zip_members = lying
    try:
        with _mirror(_published(data), {ZIP: data}) as url:
            code, err, root = _download(tmp, url)
    finally:
        extract._zip_members = honest
    return _judge(code, err, root, (ZIP, "bomb.bin", "holds more than the 100 bytes it declares"))


for _n, _damage in enumerate(DAMAGED, start=4):
    @case(f"R2-dl-{_n}", f"an archive with {_damage}")
    def _(tmp: Path, _damage=_damage):
        make, expected = DAMAGED[_damage]
        data = make()
        with _mirror(_published(data), {ZIP: data}) as url:
            code, err, root = _download(tmp, url)
        return _judge(code, err, root, (f"{ZIP}: {expected}", "nothing was extracted", "moved aside"))
