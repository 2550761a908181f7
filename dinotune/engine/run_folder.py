"""The folder of one training run: claimed, locked while a process trains in it, and removed again
when the run never got to train.

- A fresh run takes ``--out`` if it is empty, else ``out-2``, ``out-3``... (nothing is lost).
  An ``--out`` that is a file, or that cannot be created, is a ConfigError before any work.
- While a process trains, it holds an advisory lock on ``RUN/.dinotune.lock`` (a POSIX record
  lock, ``fcntl.lockf``: it belongs to the process, so forked DataLoader workers never hold it, and
  the kernel releases it the moment the process dies: a killed run never leaves a stale lock and
  can be resumed at once); the file names the holder's pid and host. A second ``train --resume
  RUN`` is refused with that pid. Nothing may open the lock file in the process that holds it:
  closing any descriptor of it there would drop the lock.
- A start that fails before training begins (bad data, a model that does not fit) removes the
  folder it created, so the next attempt gets ``--out`` again, not ``out-2``.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from dinotune.errors import CheckpointError, ConfigError
from dinotune.utils import info

try:  # POSIX; elsewhere an exclusive create stands in (a killed run then leaves the file behind)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".dinotune.lock"

# Why a POSIX record lock (``fcntl.lockf``) and not ``flock``: a flock lock belongs to the open file
# description, which ``fork`` shares, so the DataLoader workers forked from a trainer held its run
# locked for the seconds they outlive a ``kill -9`` of it, and a ``--resume`` requeued at once was
# refused. A record lock belongs to the process: a forked child never holds it, and the kernel drops
# it when the holder exits or is killed; no pid / start-time bookkeeping to get wrong, no stale lock.
# Its two pitfalls, both handled here: (1) a process that already holds it gets it again (locks do
# not conflict within one process), so the locks this process holds are kept in ``_HELD`` and a
# second claim of the same file in this process is refused from there; (2) closing ANY descriptor of
# the file in the holding process drops the lock, so the file is never opened while this process
# holds it: ``_HELD`` is consulted with a ``stat`` before any ``open``, and ``_in_use`` reads the
# file only after the lock was refused, i.e. in a process that does not hold it.
_HELD: dict[tuple[int, int], tuple[int, weakref.ref[IO[str]]]] = {}  # (dev, inode) -> (pid, handle)
_HELD_GUARD = threading.Lock()


def _file_key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _held_here(lock_path: Path) -> bool:
    """Whether this process holds the lock on ``lock_path`` (found without opening it). A forked
    child inherits ``_HELD`` but not the locks: entries of another pid do not count."""
    try:
        key = _file_key(os.stat(lock_path))
    except OSError:
        return False
    entry = _HELD.get(key)
    if entry is None:
        return False
    pid, ref = entry
    handle = ref()
    return pid == os.getpid() and handle is not None and not handle.closed


class RunFolder:
    """A claimed run folder. Use ``claim`` (fresh) or ``reopen`` (resume); ``release`` when done."""

    def __init__(self, path: Path, created: bool):
        self.path = path
        self.created = created
        self.started = False  # training began: from then on the folder is kept whatever happens
        self._lock: IO[str] | None = None

    @staticmethod
    def check(out: str | Path) -> None:
        """Refuse, before any work, an ``--out`` that is a file or lies where nothing can be written."""
        base = Path(out).expanduser()
        if base.exists() and not base.is_dir():
            raise ConfigError(f"--out {base} is a file, not a folder; give a folder for the run")
        existing = next((p for p in (base, *base.parents) if p.exists()), None)
        if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"--out {base}: {existing} is not writable (permission denied); choose another folder")

    @classmethod
    def claim(cls, out: str | Path) -> RunFolder:
        """A new, empty, locked folder at ``out`` or ``out-N``."""
        cls.check(out)
        base = Path(out).expanduser()
        path, n = base, 1
        while True:
            while path.exists() and any(path.iterdir()):
                n += 1
                path = base.with_name(f"{base.name}-{n}")
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"--out {path}: cannot create the run folder ({exc.strerror or exc})") from None
            folder = cls(path, created=True)
            try:
                folder._acquire()
            except CheckpointError:  # another run claimed the same empty folder first
                continue
            if any(p.name != LOCK_FILE for p in path.iterdir()):
                folder.release()  # it filled up between the check and the lock: look further
                continue
            if path != base:
                info(f"{base} is not empty; this run goes to {path}")
            return folder

    @classmethod
    def reopen(cls, path: str | Path) -> RunFolder:
        """An existing run folder, locked for resuming."""
        folder = cls(Path(path).expanduser(), created=False)
        folder._acquire()
        return folder

    def _acquire(self) -> None:
        lock_path = self.path / LOCK_FILE
        try:
            self._take(lock_path)
        except OSError as exc:  # a full disk or a read-only folder, before any work
            raise CheckpointError(f"cannot write the lock file {lock_path} ({exc.strerror or exc}); free some "
                                  "space or choose a writable folder") from None

    def _take(self, lock_path: Path) -> None:
        if fcntl is None:  # pragma: no cover - Windows
            try:
                fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                raise CheckpointError(self._in_use(lock_path)) from None
            handle = os.fdopen(fd, "w")
        else:
            with _HELD_GUARD:
                if _held_here(lock_path):  # opening (and closing) it here would drop this process's lock
                    raise CheckpointError(self._in_use_by(f"process {os.getpid()} on {socket.gethostname()}"))
                handle = open(lock_path, "a+")
                try:
                    fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the whole file, from offset 0
                except OSError:
                    handle.close()  # safe: this process holds no lock on the file
                    raise CheckpointError(self._in_use(lock_path)) from None
                _HELD[_file_key(os.fstat(handle.fileno()))] = (os.getpid(), weakref.ref(handle))
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} {socket.gethostname()}\n")
        handle.flush()
        self._lock = handle

    def _in_use(self, lock_path: Path) -> str:
        """The refusal naming the holder from the lock file. Only ever called where this process
        does not hold the lock (reading the file opens and closes a descriptor of it)."""
        try:
            holder = lock_path.read_text().split()
        except OSError:
            holder = []
        return self._in_use_by(f"process {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process")

    def _in_use_by(self, who: str) -> str:
        return (f"{self.path} is in use by {who} (a run training or resuming in it); wait for it to "
                f"finish, or stop it, before training in this folder")

    def release(self) -> None:
        """Give up the lock (the lock file stays; an unlocked one means nobody is training)."""
        if self._lock is not None:
            if fcntl is not None:
                with _HELD_GUARD:
                    key = _file_key(os.fstat(self._lock.fileno()))
                    entry = _HELD.get(key)
                    if entry is not None and entry[1]() is self._lock:
                        del _HELD[key]
                    # in a forked child this unlocks and closes nothing of the parent's lock
                    fcntl.lockf(self._lock, fcntl.LOCK_UN)
                    self._lock.close()
            else:  # pragma: no cover - Windows
                self._lock.close()
            self._lock = None
            if fcntl is None:  # pragma: no cover - Windows: the file itself is the lock
                (self.path / LOCK_FILE).unlink(missing_ok=True)

    def abandon(self) -> None:
        """After a failed start: remove the folder this run created (never a resumed one, and
        never once training began)."""
        self.release()
        if self.created and not self.started:
            shutil.rmtree(self.path, ignore_errors=True)


# ------------------------------------------------------------------------------ the layout
CONFIG_FILE = "config.yaml"  # a run's resolved config, and each checkpoint's copy of it
CHECKPOINT_META = "meta.json"  # what marks a complete checkpoint folder (written last)
CHECKPOINTS = "checkpoints"
BEST, LAST = "best", "last"  # the checkpoint kept by the monitored metric, and the latest one
CHECKPOINT_NAMES = (BEST, LAST)
BEST_METRICS = "best_metrics.json"
RESULTS = "results.json"


@dataclass(frozen=True)
class RunLayout:
    """Where everything of one run folder lives (the only module that knows the names)::

        RUN/config.yaml  metrics.jsonl  best_metrics.json  results.json  *.png  tb/
        RUN/checkpoints/{best,last}/   RUN/eval/   RUN/analysis/   RUN/export/
    """

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    def checkpoint(self, name: str) -> Path:
        """``RUN/checkpoints/<name>`` (``best`` or ``last``)."""
        return self.checkpoints / name

    @property
    def best(self) -> Path:
        return self.checkpoint(BEST)

    @property
    def last(self) -> Path:
        return self.checkpoint(LAST)

    @property
    def best_metrics(self) -> Path:
        return self.root / BEST_METRICS

    @property
    def results(self) -> Path:
        return self.root / RESULTS

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def analysis_dir(self) -> Path:
        return self.root / "analysis"

    def export_dir(self, name: str) -> Path:
        """``RUN/export/<name>``: an export made for the run itself (``predict --backend onnx``)."""
        return self.root / "export" / name

    @staticmethod
    def is_run(path: str | Path) -> bool:
        """``path`` is a run folder: its config and its checkpoints folder are there."""
        path = Path(path)
        return (path / CONFIG_FILE).is_file() and (path / CHECKPOINTS).is_dir()

    @staticmethod
    def is_checkpoint(path: str | Path) -> bool:
        """``path`` is a checkpoint folder (its ``meta.json`` is there)."""
        return (Path(path) / CHECKPOINT_META).is_file()

    @staticmethod
    def of_checkpoint(folder: str | Path) -> "RunLayout | None":
        """The run a checkpoint folder belongs to (``RUN/checkpoints/NAME``), or None for a checkpoint
        folder standing alone."""
        folder = Path(folder)
        return RunLayout(folder.parent.parent) if folder.parent.name == CHECKPOINTS else None
