"""What every hostile-input case uses: the case registry, running the command line in this process
(or, for payloads that could exhaust the machine, in a child process under a memory cap) and the
judges of an outcome (``refused``, ``warned``), and small data makers.

A case is ``@case(item, name, hole=False)`` on a function ``(tmp: Path) -> (handled, evidence)``;
``hole=True`` marks a case whose failure would be a security or resource hole (code ran, memory or
disk without bound), which the summary counts apart.
"""

from __future__ import annotations

import contextlib
import io
import sys
import traceback
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # the repo: dinotune, and tests/conftest's data makers

from dinotune.cli import main  # noqa: E402
from tests.conftest import MEMORY_CAP_MB, make_class_folders, run_capped  # noqa: E402, F401 (the cases use both)

FAST = ["--model", "random:tiny", "--image-size", "28", "--epochs", "1", "--batch-size", "4", "--workers", "0",
        "--no-progress", "--device", "cpu"]
CASES: list[tuple[str, str, bool, Callable[[Path], tuple[bool, str]]]] = []


def case(item: str, name: str, hole: bool = False):
    def register(fn):
        CASES.append((item, name, hole, fn))
        return fn
    return register


def run(argv: list[str]) -> tuple[int | None, str]:
    """Exit code and stderr of ``dinotune ARGV`` run in this process (None: it raised)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except BaseException:  # a traceback reaching the user is the failure we look for
            traceback.print_exc(file=err)
            code = None
    return code, err.getvalue()


def refused(code: int | None, err: str, *needles: str) -> tuple[bool, str]:
    """Exit 2 with exactly one error line holding every needle, and no traceback."""
    lines = [ln for ln in err.splitlines() if ln.startswith("dinotune: error:")]
    ok = code == 2 and len(lines) == 1 and "Traceback" not in err and all(n in lines[0] for n in needles)
    return ok, (lines[0] if lines else err.strip().splitlines()[-1] if err.strip() else f"exit {code}")[:300]


def warned(code: int | None, err: str, *needles: str) -> tuple[bool, str]:
    """Exit 0 and a message holding every needle, and no traceback."""
    hit = next((ln for ln in err.splitlines() if all(n in ln for n in needles)), "")
    return code == 0 and bool(hit) and "Traceback" not in err, (hit or f"exit {code}: {err.strip()[-200:]}")[:300]


def classify_data(root: Path) -> Path:
    make_class_folders(root / "data" / "train", ["red", "blue"], 4, size=28, seed=1)
    make_class_folders(root / "data" / "val", ["red", "blue"], 2, size=28, seed=2)
    return root / "data"


def trained_run(root: Path, *extra: str, epochs: int = 1) -> Path:
    data = classify_data(root)
    out = root / "run"
    code, err = run(["train", "classify", "--data", str(data), "--out", str(out), *FAST, "--epochs", str(epochs),
                     *extra])
    assert code == 0, err
    return out
