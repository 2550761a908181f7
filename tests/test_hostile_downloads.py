"""``dinotune data download`` against a hostile or broken mirror: a body past the published size
(without Content-Length, or announcing too much), an archive without a published size, a zip bomb
of exactly the published size, a member lying about its size, and damaged archives (a CRC error, a
Deflate64 member, an encrypted member, a file / folder name clash). Each ends in one line naming
the archive (and the member), writes nothing past its bound, and leaves no partial extraction and
no archive marked verified. The local mirror is the one of ``test_download``."""

from __future__ import annotations

import io
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from dinotune.cli import main
from dinotune.data.download import extract
from dinotune.data.download.catalog import CATALOG, Archive
from dinotune.data.download.dataset import STATE_DIR, download_dataset
from dinotune.data.download.extract import safe_extract
from dinotune.errors import DataError
from dinotune.tasks.classify.data import read_class_folders
from tests.conftest import make_class_folders
from tests.test_download import FileServer, point_catalog, sha256, zip_folder

ZIP = "hymenoptera_data.zip"


@pytest.fixture
def serve():
    """``start(files) -> FileServer``: local mirrors, shut down after the test."""
    servers: list[FileServer] = []

    def start(files: dict[str, bytes]) -> FileServer:
        servers.append(FileServer(files))
        return servers[-1]

    yield start
    for s in servers:
        s.httpd.shutdown()
        s.httpd.server_close()


@pytest.fixture
def good_zip(tmp_path, monkeypatch) -> bytes:
    """A tiny, sound hymenoptera_data.zip ({train,val}/{red,blue}/*.png below hymenoptera_data/),
    published in the catalog with its size and sha256."""
    for split in ("train", "val"):
        make_class_folders(tmp_path / "src" / split, ["red", "blue"], 2, size=16, seed=len(split))
    data = zip_folder(tmp_path / "src", "hymenoptera_data/")
    archive = Archive(ZIP, len(data), sha256(data), strip="hymenoptera_data")
    point_catalog(monkeypatch, "hymenoptera", {ZIP: archive}, {"train": (ZIP,), "val": (ZIP,)})
    return data


def make_zip(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=method, compresslevel=9 if method == zipfile.ZIP_DEFLATED else None) \
            as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def patch_zip(data: bytes, name: str, flag_bits: int = 0, method: int | None = None) -> bytes:
    """``data`` with member ``name``'s general-purpose flags OR-ed with ``flag_bits`` and its
    compression method set to ``method``, in its local header and its central-directory entry."""
    buf, encoded = bytearray(data), name.encode()
    # (signature, offset of the flags, of the method, of the name length, of the name)
    for sig, flags_at, method_at, nlen_at, name_at in ((b"PK\x03\x04", 6, 8, 26, 30), (b"PK\x01\x02", 8, 10, 28, 46)):
        pos = buf.find(sig)
        while pos != -1:
            (nlen,) = struct.unpack_from("<H", buf, pos + nlen_at)
            if bytes(buf[pos + name_at:pos + name_at + nlen]) == encoded:
                (flags,) = struct.unpack_from("<H", buf, pos + flags_at)
                struct.pack_into("<H", buf, pos + flags_at, flags | flag_bits)
                if method is not None:
                    struct.pack_into("<H", buf, pos + method_at, method)
            pos = buf.find(sig, pos + 4)
    return bytes(buf)


def use_archive(monkeypatch, data: bytes, **bounds) -> Archive:
    """Point the hymenoptera entry at ``data`` as its zip: its exact size is published, no checksum
    (as for the real file: the size is its only check)."""
    archive = Archive(ZIP, len(data), None, strip="hymenoptera_data", **bounds)
    point_catalog(monkeypatch, "hymenoptera", {ZIP: archive}, {"train": (ZIP,), "val": (ZIP,)})
    return archive


def download(root: Path, url: str, capsys) -> tuple[int, str]:
    """Exit code and the single ``dinotune: error:`` line of the command line (asserting there is
    exactly one and no traceback)."""
    code = main(["data", "download", "hymenoptera", "--to", str(root), "--mirror", url])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("dinotune: error:")]
    assert len(lines) == (1 if code else 0), err
    return code, lines[0] if lines else ""


def left_in(root: Path) -> list[str]:
    """Everything under ``root`` (relative paths), the download state included."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


# ----------------------------------------------------------------------- downloads: the size bound
def test_hole_a_stream_without_content_length_stops_at_the_published_size(tmp_path, good_zip, serve, capsys):
    """R2-H6: a mirror that sends the archive and then 8 MB more, without Content-Length. The download
    stops at the published size: the .bad file kept is no larger than it, nothing is extracted."""
    server = serve({})
    server.streams[ZIP] = lambda: [good_zip, *([bytes(64 << 10)] * 128)]
    root = tmp_path / "hym"
    code, line = download(root, server.url, capsys)
    assert (root / STATE_DIR / f"{ZIP}.bad").stat().st_size <= len(good_zip)
    assert left_in(root) == [STATE_DIR, f"{STATE_DIR}/{ZIP}.bad"]  # no .part, no archive, no marker, nothing extracted
    assert code == 2
    assert (f"{ZIP} (from {server.url}{ZIP}): the server sends more than the published size of {len(good_zip)} "
            "bytes; the download was stopped there") in line


def test_a_content_length_past_the_published_size_is_refused_before_the_body(tmp_path, good_zip, serve, capsys):
    server = serve({})
    server.streams[ZIP] = lambda: [good_zip, bytes(1000)]
    server.lengths[ZIP] = len(good_zip) + 1000
    root = tmp_path / "hym"
    code, line = download(root, server.url, capsys)
    assert code == 2 and f"the server announces {len(good_zip) + 1000} bytes, more than the published size" in line
    assert "nothing was downloaded" in line
    assert left_in(root) == [STATE_DIR]  # not one byte written


def test_an_archive_without_a_published_size_is_bounded_by_the_catalog(tmp_path, monkeypatch, serve, capsys):
    archive = Archive(ZIP, None, sha256(b"the real archive"), max_size=100_000)
    point_catalog(monkeypatch, "hymenoptera", {ZIP: archive}, {"train": (ZIP,), "val": (ZIP,)})
    server = serve({})
    server.streams[ZIP] = lambda: [bytes(64 << 10)] * 16  # 1 MB, no Content-Length
    root = tmp_path / "hym"
    code, line = download(root, server.url, capsys)
    assert code == 2
    assert "more than 100000 bytes (100 KB), the most dinotune accepts for this archive, whose size is not " \
           "published" in line
    assert (root / STATE_DIR / f"{ZIP}.bad").stat().st_size == 100_000


def test_every_catalog_archive_is_bounded_above_its_own_size():
    """A typo in a bound would refuse the real file: every archive has a download bound and an
    extraction bound, and the extraction bound is at least the archive's size."""
    for entry in CATALOG.values():
        for archive in (a for split in entry.splits.values() for a in split):
            assert archive.size_bound > 0 and archive.max_extracted is not None, archive
            assert archive.max_extracted >= archive.size_bound, archive
    with pytest.raises(ValueError, match="needs max_size"):
        Archive("x.zip", None, None)


# ------------------------------------------------------------------------ extraction: the bounds
def bomb() -> bytes:
    """A zip of the hymenoptera layout with one 4 MB member of zeros: ~4 KB in all."""
    return make_zip({"hymenoptera_data/train/ants/a.txt": b"an ant",
                     "hymenoptera_data/train/bees/bomb.bin": bytes(4 << 20)})


def test_hole_a_zip_bomb_of_the_published_size_is_refused_before_anything_is_written(tmp_path, monkeypatch, serve,
                                                                                      capsys):
    """R2-H7: the archive has exactly the published size (its only check) but extracts to ~1000 x
    that. Its declared sizes are checked before anything is written (with no bound in the catalog
    entry, RATIO x its size)."""
    data = bomb()
    use_archive(monkeypatch, data)
    server = serve({ZIP: data})
    root = tmp_path / "hym"
    code, line = download(root, server.url, capsys)
    assert left_in(root) == [STATE_DIR, f"{STATE_DIR}/{ZIP}.bad"]  # not even the good member before the bomb
    assert code == 2
    assert f"{ZIP}: member 'hymenoptera_data/train/bees/bomb.bin' declares 4.2 MB" in line
    assert f"{extract.RATIO} x the archive's size" in line and "decompression bomb" in line


def test_the_catalog_bound_on_extraction_is_used_and_named(tmp_path, monkeypatch, serve, capsys):
    data = make_zip({"hymenoptera_data/train/ants/a.bin": bytes(30_000)})
    use_archive(monkeypatch, data, max_extracted=20_000)
    server = serve({ZIP: data})
    code, line = download(tmp_path / "hym", server.url, capsys)
    assert code == 2 and ("declares 30 KB, bringing what the archive extracts to 30000 bytes, more than 20000 "
                          "(20 KB), the most this archive may extract to") in line


def test_a_member_holding_more_than_it_declares_is_stopped_while_written(tmp_path, monkeypatch):
    """zipfile and tarfile themselves stop at the declared size; the bytes written are counted all
    the same (here the declared sizes are made to lie) and the extraction is undone."""
    path = tmp_path / "a.zip"
    path.write_bytes(bomb())
    honest = extract._zip_members

    def lying(zf, archive):
        for name, is_dir, size, opener in honest(zf, archive):
            yield name, is_dir, min(size, 100), opener

    monkeypatch.setattr(extract, "_zip_members", lying)
    target = tmp_path / "out"
    with pytest.raises(DataError, match=r"a\.zip: member 'hymenoptera_data/train/bees/bomb\.bin' holds more than "
                                        r"the 100 bytes it declares.*partial extraction was removed"):
        safe_extract(path, target, "hymenoptera_data")
    assert left_in(target) == []


# ---------------------------------------------------------------------- extraction: damaged archives
def crc_error() -> bytes:
    good = b"an intact ant " * 50
    data = make_zip({"hymenoptera_data/train/ants/a.txt": good, "hymenoptera_data/train/bees/b.txt": b"bee " * 200},
                    method=zipfile.ZIP_STORED)
    at = data.index(b"bee bee")
    return data[:at] + b"BEE" + data[at + 3:]


DAMAGED = {
    "a CRC error": (crc_error, "member 'hymenoptera_data/train/bees/b.txt' is damaged (Bad CRC-32"),
    "a Deflate64 member": (
        lambda: patch_zip(make_zip({"hymenoptera_data/train/ants/a.txt": b"ant",
                                    "hymenoptera_data/train/bees/b.txt": b"bee"}, zipfile.ZIP_STORED),
                          "hymenoptera_data/train/bees/b.txt", method=9),
        ("member 'hymenoptera_data/train/bees/b.txt' is compressed with method 9 (Deflate64), which Python's "
         "zipfile cannot read")),
    "an encrypted member": (
        lambda: patch_zip(make_zip({"hymenoptera_data/train/ants/a.txt": b"ant",
                                    "hymenoptera_data/train/bees/b.txt": b"bee"}), "hymenoptera_data/train/bees/b.txt",
                          flag_bits=0x1),
        "member 'hymenoptera_data/train/bees/b.txt' is encrypted"),
    "a file / folder name clash": (
        lambda: make_zip({"hymenoptera_data/train/ants": b"a file", "hymenoptera_data/train/ants/a.txt": b"ant"}),
        ("member 'hymenoptera_data/train/ants' is a file, but member 'hymenoptera_data/train/ants/a.txt' makes "
         "'train/ants' a folder")),
}


@pytest.mark.parametrize("damage", list(DAMAGED))
def test_a_damaged_archive_ends_in_one_line_and_leaves_nothing(tmp_path, monkeypatch, serve, capsys, damage):
    """Nothing extracted (not even the members before the damaged one), the archive moved aside, not
    kept as verified nor marked done; the next call downloads it afresh."""
    make, expected = DAMAGED[damage]
    data = make()
    use_archive(monkeypatch, data)
    server = serve({ZIP: data})
    root = tmp_path / "hym"
    code, line = download(root, server.url, capsys)
    assert code == 2 and f"{ZIP}: {expected}" in line, line
    assert "nothing was extracted" in line.lower() and f"moved aside to {root / STATE_DIR / ZIP}.bad" in line
    assert left_in(root) == [STATE_DIR, f"{STATE_DIR}/{ZIP}.bad"]
    code, _ = download(root, server.url, capsys)  # downloaded afresh (not re-used), refused again
    assert code == 2 and [p for p, _ in server.requests] == [ZIP, ZIP]


def test_a_failed_extraction_leaves_the_dataset_folder_as_it_was(tmp_path, monkeypatch, serve, capsys):
    """Files already in the folder (an earlier archive's) are untouched by a failing one, and a
    stale scratch folder of a killed call is cleared."""
    data = crc_error()
    use_archive(monkeypatch, data)
    server = serve({ZIP: data})
    root = tmp_path / "hym"
    (root / "train" / "ants").mkdir(parents=True)
    (root / "train" / "ants" / "a.txt").write_text("mine")
    stale = root / STATE_DIR / f"{ZIP}.extracting" / "train"
    stale.mkdir(parents=True)
    code, _ = download(root, server.url, capsys)
    assert code == 2 and (root / "train" / "ants" / "a.txt").read_text() == "mine"
    assert left_in(root) == [STATE_DIR, f"{STATE_DIR}/{ZIP}.bad", "train", "train/ants", "train/ants/a.txt"]


def test_a_good_archive_merges_into_what_is_there_and_a_type_clash_with_it_is_refused(tmp_path, good_zip, serve,
                                                                                      capsys):
    server = serve({ZIP: good_zip})
    root = tmp_path / "hym"
    (root / "val").mkdir(parents=True)
    (root / "val" / "notes.txt").write_text("mine")
    assert download(root, server.url, capsys)[0] == 0
    assert (root / "val" / "notes.txt").read_text() == "mine" and len(read_class_folders(root / "val").items) == 4
    assert not (root / STATE_DIR / f"{ZIP}.extracting").exists()

    other = tmp_path / "other"
    other.mkdir()
    (other / "train").write_text("a file where the archive has a folder")
    code, line = download(other, server.url, capsys)
    assert code == 2 and f"{ZIP}: member 'hymenoptera_data/train" in line and f"but {other / 'train'} is a file" in line
    assert sorted(p.name for p in other.iterdir()) == [STATE_DIR, "train"]  # val/ was not moved in either


def test_an_interrupted_extraction_removes_its_scratch_folder(tmp_path, good_zip, monkeypatch):
    path = tmp_path / ZIP
    path.write_bytes(good_zip)
    real, calls = extract._copy, []

    def interrupted(member, dest):
        calls.append(member.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(member, dest)

    monkeypatch.setattr(extract, "_copy", interrupted)
    target = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        safe_extract(path, target, "hymenoptera_data")
    assert left_in(target) == []


def test_a_member_aimed_at_the_download_state_is_refused(tmp_path, monkeypatch, serve, capsys):
    data = make_zip({f"hymenoptera_data/{STATE_DIR}/other.zip.done": b"{}", "hymenoptera_data/train/a/x.txt": b"x"})
    use_archive(monkeypatch, data)
    server = serve({ZIP: data})
    root = tmp_path / "hym"
    code, line = download(root, server.url, capsys)
    assert code == 2 and f"would be written into dinotune's own folder {STATE_DIR}" in line
    assert left_in(root) == [STATE_DIR, f"{STATE_DIR}/{ZIP}.bad"]


def test_download_dataset_still_extracts_a_good_archive(tmp_path, good_zip, serve):
    server = serve({ZIP: good_zip})
    result = download_dataset("hymenoptera", to=tmp_path / "hym", mirror=server.url)
    assert result["fetched"] == [ZIP] and len(read_class_folders(tmp_path / "hym" / "train").items) == 4


def test_a_tar_is_extracted_whole_or_not_at_all(tmp_path):
    """The tar path (VOC): a sound tar lands in the target; one cut short names its member and leaves
    nothing; its declared sizes are bounded as a zip's."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in (("VOCdevkit/VOC2012/a.txt", b"a" * 3000), ("VOCdevkit/VOC2012/b.txt", b"b" * 3000)):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tf.addfile(member, io.BytesIO(data))
    data = buf.getvalue()
    sound, cut = tmp_path / "sound.tar", tmp_path / "cut.tar"
    sound.write_bytes(data)
    assert safe_extract(sound, tmp_path / "ok", max_bytes=6000) == 2
    assert (tmp_path / "ok" / "VOCdevkit" / "VOC2012" / "b.txt").read_bytes() == b"b" * 3000
    assert left_in(tmp_path / "ok") == ["VOCdevkit", "VOCdevkit/VOC2012", "VOCdevkit/VOC2012/a.txt",
                                        "VOCdevkit/VOC2012/b.txt"]  # no scratch folder left
    with pytest.raises(DataError, match=r"sound\.tar: member 'VOCdevkit/VOC2012/b\.txt' declares 3 KB, bringing "
                                        r"what the archive extracts to 6000 bytes, more than 5999 \(6 KB\)"):
        safe_extract(sound, tmp_path / "small", max_bytes=5999)
    cut.write_bytes(data[:512 * 3 + 1000])  # a's header and data, b's header and part of its data
    with pytest.raises(DataError, match=r"cut\.tar: the archive is damaged at or after member "
                                        r"'VOCdevkit/VOC2012/a\.txt' \(unexpected end of data\); nothing"):
        safe_extract(cut, tmp_path / "cut")
    assert left_in(tmp_path / "cut") == [] and left_in(tmp_path / "small") == []
