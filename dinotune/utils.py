"""Small shared helpers: atomic file writes, seeding, RNG state, console messages, what a failed
write means."""

from __future__ import annotations

import errno
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

# torch is imported where it is used: the torch-free inference runtime (dinotune.runtime) reads
# images through modules that import this one.


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.
    The file gets the umask's permissions (``mkstemp`` alone would make it owner-only, unreadable
    to a teammate sharing the run folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    torch = sys.modules.get("torch")  # a tensor can only exist when torch was imported
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# errno -> what to tell, and the text of the same errors (safetensors reports I/O errors as text,
# "... (os error 28)", without an errno)
_SPACE_ERRORS = {
    errno.ENOSPC: ("no space left on device", "No space left on device"),
    getattr(errno, "EDQUOT", 122): ("disk quota exceeded", "Disk quota exceeded"),
}


def space_problem(exc: BaseException) -> str | None:
    """'no space left on device' / 'disk quota exceeded' when that is why ``exc`` (or what it was
    raised from) happened, else None: the one write failure the user can fix by freeing space."""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen)
        for code, (told, strerror) in _SPACE_ERRORS.items():
            if getattr(seen, "errno", None) == code or f"(os error {code})" in text or strerror in text:
                return told
        seen = seen.__cause__ or seen.__context__
    return None


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from, as tensors and plain lists, ints, floats and strings:
    the trainer state is stored without pickle, so no numpy array or opaque object may be in it."""
    import torch

    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss_next],
        "numpy": [str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``get_rng_state`` returned (lists and tuples alike: both survive storage)."""
    import torch

    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_QUIET = False


def set_quiet(quiet: bool) -> None:
    global _QUIET
    _QUIET = quiet


def info(msg: str) -> None:
    """A progress message for the person at the terminal (stderr, so stdout stays parseable)."""
    if not _QUIET:
        print(msg, file=sys.stderr, flush=True)


_VERBOSE = False


def set_verbose(verbose: bool) -> None:
    global _VERBOSE
    _VERBOSE = verbose


def debug(msg: str) -> None:
    """A detail for ``--verbose`` runs only (e.g. the optimizer's parameter groups); silenced by
    ``--quiet`` too, so followers of a distributed run stay quiet."""
    if _VERBOSE and not _QUIET:
        print(msg, file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)
