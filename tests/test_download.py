"""``dinotune data download`` without internet: a local HTTP server (with Range support) serves
small archives made here, the catalog entries point at them (their sizes and sha256) and the
mirror override points at the server."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import socket
import tarfile
import threading
import zipfile
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dinotune.cli import main
from dinotune.data.coco import find_coco_json, read_coco_file
from dinotune.data.download.catalog import CATALOG, MIRROR_ENV, Archive
from dinotune.data.download.dataset import STATE_DIR, download_dataset
from dinotune.data.download.extract import safe_extract
from dinotune.errors import DataError
from dinotune.tasks.classify.data import read_class_folders
from tests.conftest import make_class_folders, make_coco_dataset


# ------------------------------------------------------------------------------ a local server
class FileServer:
    """Serves ``files`` (URL path -> bytes) on 127.0.0.1. ``Range: bytes=N-`` gets a 206 unless
    ``ignore_range``; a path in ``drop_once`` has its first response cut after half the body.
    ``streams`` (URL path -> a function giving the body's blocks) are sent without Content-Length,
    ended by closing the connection, as some mirrors and proxies do; a Content-Length of its own for a
    path in ``lengths`` (URL path -> the number announced). ``requests``: (path, Range header or
    None) in arrival order."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests = files, []
        self.drop_once: set[str] = set()
        self.ignore_range = False
        self.streams: dict[str, Callable[[], Iterable[bytes]]] = {}
        self.lengths: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet test output
                pass

            def do_GET(self):
                path = self.path.lstrip("/")
                rng = self.headers.get("Range")
                server.requests.append((path, rng))
                if path in server.streams:
                    self.send_response(200)
                    if path in server.lengths:
                        self.send_header("Content-Length", str(server.lengths[path]))
                    self.end_headers()
                    try:
                        for block in server.streams[path]():
                            self.wfile.write(block)
                    except (BrokenPipeError, ConnectionResetError):  # the client stopped reading
                        pass
                    self.close_connection = True
                    return
                if path not in server.files:
                    self.send_error(404)
                    return
                body = server.files[path]
                start = int(rng.split("=")[1].split("-")[0]) if rng and not server.ignore_range else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if path in server.drop_once:
                    server.drop_once.discard(path)
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def ranges(self, path: str) -> list[str | None]:
        return [r for p, r in self.requests if p == path]


@pytest.fixture
def serve():
    servers = []

    def start(files: dict[str, bytes]) -> FileServer:
        servers.append(FileServer(files))
        return servers[-1]

    yield start
    for s in servers:
        s.httpd.shutdown()
        s.httpd.server_close()


def zip_folder(folder: Path, prefix: str = "") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, prefix + p.relative_to(folder).as_posix())
    return buf.getvalue()


def sha256(data: bytes) -> tuple[str, str]:
    return ("sha256", hashlib.sha256(data).hexdigest())


def point_catalog(monkeypatch, name: str, archives: dict[str, Archive], splits: dict[str, tuple[str, ...]]) -> None:
    """Replace the catalog entry ``name`` by one whose splits use ``archives`` (file -> Archive)."""
    entry = CATALOG[name]
    monkeypatch.setitem(CATALOG, name, dataclasses.replace(
        entry, splits={s: tuple(archives[f] for f in files) for s, files in splits.items()}))


@pytest.fixture
def hymenoptera(tmp_path, monkeypatch) -> bytes:
    """A tiny hymenoptera_data.zip (hymenoptera_data/{train,val}/{red,blue}/*.png) in the catalog."""
    src = tmp_path / "src"
    for split in ("train", "val"):
        make_class_folders(src / split, ["red", "blue"], 2, size=16, seed=len(split))
    data = zip_folder(src, "hymenoptera_data/")
    archive = Archive("hymenoptera_data.zip", len(data), sha256(data), strip="hymenoptera_data")
    point_catalog(monkeypatch, "hymenoptera", {"hymenoptera_data.zip": archive},
                  {"train": ("hymenoptera_data.zip",), "val": ("hymenoptera_data.zip",)})
    return data


# ------------------------------------------------------------------------------------- tests
def test_download_extracts_the_readable_layout_and_a_second_call_does_nothing(tmp_path, hymenoptera, serve,
                                                                               capsys):
    server = serve({"hymenoptera_data.zip": hymenoptera})
    root = tmp_path / "data" / "hymenoptera"
    assert main(["data", "download", "hymenoptera", "--to", str(root), "--mirror", server.url]) == 0
    assert capsys.readouterr().out.strip() == str(root)
    train = read_class_folders(root / "train")  # dinotune's own reader on the extracted folder
    assert train.class_names == ["blue", "red"] and len(train.items) == 4
    assert len(read_class_folders(root / "val").items) == 4
    # only the marker is left: the archive is deleted after extraction and no .part remains
    assert [p.name for p in (root / STATE_DIR).iterdir()] == ["hymenoptera_data.zip.done"]
    assert server.ranges("hymenoptera_data.zip") == [None]

    again = download_dataset("hymenoptera", to=root, mirror=server.url)
    assert again["fetched"] == [] and again["already"] == ["hymenoptera_data.zip"]
    assert len(server.requests) == 1  # the second call did not even ask the server


def test_an_interrupted_download_resumes_with_a_range_request(tmp_path, monkeypatch, serve):
    src = make_coco_dataset(tmp_path / "src", {"val2017": [1, 2, 0]})
    ann, val = zip_folder(src / "annotations", "annotations/"), zip_folder(src / "val2017", "val2017/")
    archives = {"annotations.zip": Archive("annotations/annotations.zip", len(ann), sha256(ann)),
                "val2017.zip": Archive("zips/val2017.zip", len(val), sha256(val)),
                "train2017.zip": Archive("zips/train2017.zip", 10, sha256(b"x"))}
    point_catalog(monkeypatch, "coco", archives, {"train": ("annotations.zip", "train2017.zip"),
                                                 "val": ("annotations.zip", "val2017.zip")})
    server = serve({"annotations/annotations.zip": ann, "zips/val2017.zip": val})
    server.drop_once.add("zips/val2017.zip")  # the connection breaks halfway the first time
    monkeypatch.setenv(MIRROR_ENV, server.url)  # the environment override
    root = tmp_path / "coco"
    result = download_dataset("coco", to=root, splits=["val"])
    assert result["fetched"] == ["annotations.zip", "val2017.zip"]
    half = len(val) // 2
    assert server.ranges("zips/val2017.zip") == [None, f"bytes={half}-"]
    assert not any(p == "zips/train2017.zip" for p, _ in server.requests)
    coco = read_coco_file(find_coco_json(root, "val")[0])
    assert len(coco.images) == 3 and len(coco.annotations) == 3
    assert all(img.path.is_file() for img in coco.images)


@pytest.mark.parametrize("ignore_range", [False, True])
def test_a_part_file_left_by_an_earlier_call_is_resumed_or_restarted(tmp_path, hymenoptera, serve, ignore_range):
    server = serve({"hymenoptera_data.zip": hymenoptera})
    server.ignore_range = ignore_range
    state = tmp_path / "hym" / STATE_DIR
    state.mkdir(parents=True)
    # A server that honours Range gets the true first bytes; one that ignores it must restart, so
    # the stale prefix is garbage that would break the checksum if it were kept.
    prefix = b"\0" * 100 if ignore_range else hymenoptera[:100]
    (state / "hymenoptera_data.zip.part").write_bytes(prefix)
    download_dataset("hymenoptera", to=tmp_path / "hym", mirror=server.url)
    assert server.ranges("hymenoptera_data.zip") == ["bytes=100-"]
    assert len(read_class_folders(tmp_path / "hym" / "train").items) == 4


def test_a_bad_checksum_is_refused_and_the_file_kept_aside(tmp_path, monkeypatch, serve):
    good = b"PK not really the published archive" * 10
    archive = Archive("hymenoptera_data.zip", None, sha256(b"what the catalog promises"), max_size=10_000)
    point_catalog(monkeypatch, "hymenoptera", {"h": archive}, {"train": ("h",), "val": ("h",)})
    server = serve({"hymenoptera_data.zip": good})
    root = tmp_path / "hym"
    with pytest.raises(DataError, match=r"sha256 is [0-9a-f]{64}, the published one is .*moved aside"):
        download_dataset("hymenoptera", to=root, mirror=server.url)
    state = root / STATE_DIR
    assert (state / "hymenoptera_data.zip.bad").read_bytes() == good
    assert sorted(p.name for p in state.iterdir()) == ["hymenoptera_data.zip.bad"]  # no .part, no archive, no marker
    assert [p.name for p in root.iterdir()] == [STATE_DIR]  # nothing extracted


def test_unsafe_archives_are_refused_naming_the_member(tmp_path, monkeypatch, serve):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("hymenoptera_data/train/a/ok.txt", "fine")
        zf.writestr("hymenoptera_data/../../evil.txt", "escaped")
    data = buf.getvalue()
    archive = Archive("hymenoptera_data.zip", len(data), sha256(data), strip="hymenoptera_data")
    point_catalog(monkeypatch, "hymenoptera", {"h": archive}, {"train": ("h",), "val": ("h",)})
    server = serve({"hymenoptera_data.zip": data})
    root = tmp_path / "a" / "hym"
    with pytest.raises(DataError, match=r"member 'hymenoptera_data/\.\./\.\./evil\.txt'.*path traversal"):
        download_dataset("hymenoptera", to=root, mirror=server.url)
    assert not list(tmp_path.rglob("evil.txt")) and not (root / "train").exists()  # nothing extracted at all
    assert (root / STATE_DIR / "hymenoptera_data.zip.bad").is_file()
    assert not (root / STATE_DIR / "hymenoptera_data.zip.done").exists()

    # tar: a symbolic link and an absolute path are refused as well
    for name, kind in (("VOCdevkit/link", tarfile.SYMTYPE), ("/etc/evil", tarfile.REGTYPE)):
        tar_path = tmp_path / f"bad{kind!r}.tar"
        with tarfile.open(tar_path, "w") as tf:
            member = tarfile.TarInfo(name)
            member.type, member.linkname = kind, "/etc/passwd" if kind == tarfile.SYMTYPE else ""
            tf.addfile(member, io.BytesIO(b"") if kind == tarfile.REGTYPE else None)
        with pytest.raises(DataError, match=f"member '{name}'"):
            safe_extract(tar_path, tmp_path / "out")
    assert not (tmp_path / "out" / "VOCdevkit").exists()


def test_offline_gives_one_clear_message(tmp_path, hymenoptera, capsys):
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "hym"
    code = main(["data", "download", "hymenoptera", "--to", str(root), "--mirror", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"cannot reach http://127.0.0.1:{port}/hymenoptera_data.zip" in err
    assert f"put hymenoptera_data.zip into {root}" in err and "train/{ants,bees}/" in err
    assert "Traceback" not in err


def test_a_missing_file_names_the_http_status(tmp_path, hymenoptera, serve):
    server = serve({})
    with pytest.raises(DataError, match=r"hymenoptera_data\.zip: the server answered HTTP 404"):
        download_dataset("hymenoptera", to=tmp_path / "hym", mirror=server.url)


def test_an_archive_put_there_by_hand_is_checked_and_used(tmp_path, hymenoptera):
    root = tmp_path / "hym"
    root.mkdir()
    (root / "hymenoptera_data.zip").write_bytes(hymenoptera)
    result = download_dataset("hymenoptera", to=root, mirror="http://127.0.0.1:9/")  # never contacted
    assert result["fetched"] == ["hymenoptera_data.zip"]
    assert len(read_class_folders(root / "val").items) == 4
    assert (root / "hymenoptera_data.zip").is_file()  # the user's file is left in place
