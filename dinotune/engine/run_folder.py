"""The folder of one training run: claimed, locked while a process trains in it, and removed again
when the run never got to train.

- A fresh run takes ``--out`` if it is empty, else ``out-2``, ``out-3``... (nothing is lost).
  An ``--out`` that is a file, or that cannot be created, is a ConfigError before any work.
- While a process trains, it holds an advisory lock on ``RUN/.dinotune.lock`` (``fcntl.flock``,
  released by the kernel when the process dies, so a killed run never leaves a stale lock); the
  file names the holder's pid and host. A second ``train --resume RUN`` is refused with that pid.
- A start that fails before training begins (bad data, a model that does not fit) removes the
  folder it created, so the next attempt gets ``--out`` again, not ``out-2``.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import IO

from dinotune.errors import CheckpointError, ConfigError
from dinotune.utils import info

try:  # POSIX; elsewhere an exclusive create stands in (a killed run then leaves the file behind)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".dinotune.lock"


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
            handle = open(lock_path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                raise CheckpointError(self._in_use(lock_path)) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} {socket.gethostname()}\n")
        handle.flush()
        self._lock = handle

    def _in_use(self, lock_path: Path) -> str:
        try:
            holder = lock_path.read_text().split()
        except OSError:
            holder = []
        who = f"process {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
        return (f"{self.path} is in use by {who} (a run training or resuming in it); wait for it to "
                f"finish, or stop it, before training in this folder")

    def release(self) -> None:
        """Give up the lock (the lock file stays; an unlocked one means nobody is training)."""
        if self._lock is not None:
            if fcntl is not None:
                fcntl.flock(self._lock, fcntl.LOCK_UN)
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
