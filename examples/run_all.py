"""Execute the tutorials as notebooks, so they cannot rot (``make examples``; CI runs it after the tests).

Each ``examples/NN_*.py`` (jupytext percent format) is converted to a notebook and executed cell by
cell with nbclient in a ``python3`` kernel of this interpreter; any cell error fails the run with the
notebook's name and the cell's traceback. The executed notebooks and the run folders go to a
temporary folder (``--keep DIR`` to keep them there instead): nothing is written into the repository.

    python examples/run_all.py                  # all four
    python examples/run_all.py 02_detect_coco   # one, by file stem
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent


def tutorials(names: list[str]) -> list[Path]:
    """The tutorial scripts, all of them or the named ones (file stems), in order."""
    found = sorted(p for p in EXAMPLES.glob("[0-9][0-9]_*.py"))
    if not names:
        return found
    by_stem = {p.stem: p for p in found}
    unknown = [n for n in names if n not in by_stem]
    if unknown:
        raise SystemExit(f"unknown tutorial(s) {', '.join(unknown)}; choose from {', '.join(by_stem)}")
    return [by_stem[n] for n in names]


def execute(script: Path, work: Path, timeout: int) -> float:
    """Convert ``script`` to a notebook, run it in ``work`` and save the executed copy there; seconds taken."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    notebook = jupytext.read(script)
    start = time.perf_counter()
    # kernel "python3" is ipykernel on this interpreter (jupyter_client's native kernel), so the
    # notebook sees the same installed dinotune as the caller
    client = NotebookClient(notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(work)}})
    try:
        client.execute()
    finally:
        nbformat.write(notebook, work / f"{script.stem}.ipynb")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="tutorials to run, by file stem (default: all)")
    parser.add_argument("--keep", metavar="DIR", help="write executed notebooks and runs here instead of a temporary folder")
    parser.add_argument("--timeout", type=int, default=600, help="seconds one cell may take (default 600)")
    args = parser.parse_args()
    if not os.environ.get("DINOTUNE_SHARED"):
        print("DINOTUNE_SHARED is not set: the tutorials read their data from $DINOTUNE_SHARED/data "
              "(e.g. DINOTUNE_SHARED=../shared)", file=sys.stderr)
        return 2
    scripts = tutorials(args.names)
    from nbclient.exceptions import CellExecutionError

    with tempfile.TemporaryDirectory(prefix="dinotune-examples-") as tmp:
        root = Path(args.keep).expanduser().resolve() if args.keep else Path(tmp)
        failed = []
        for script in scripts:
            work = root / script.stem
            work.mkdir(parents=True, exist_ok=True)
            # the kernel inherits this environment: runs go under the work folder, plots never open a window
            os.environ.update(DINOTUNE_EXAMPLES_OUT=str(work / "runs"), MPLBACKEND="Agg")
            print(f"== {script.name}", flush=True)
            try:
                seconds = execute(script, work, args.timeout)
            except CellExecutionError as exc:
                print(f"FAILED {script.name}:\n{exc}", file=sys.stderr, flush=True)
                failed.append(script.name)
                continue
            print(f"ok {script.name} in {seconds:.0f} s", flush=True)
        if args.keep:
            print(f"executed notebooks in {root}")
    if failed:
        print(f"{len(failed)} of {len(scripts)} tutorials failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"all {len(scripts)} tutorials ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
