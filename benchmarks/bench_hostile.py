"""Replay the hostile-input list: every bad input and fault of the hardening reviews, end to end.

Each case builds what a careless or hostile user would hand dinotune (a damaged run folder, an
escaping annotation path, an out-of-range flag, a tampered export, a billion-laughs YAML, a zip bomb,
...), runs the command line the way the user would (``dinotune.cli.main`` in this process, or a child
process under a memory cap where an open hole could exhaust the machine), and judges the outcome:

- handled: refused with one ``dinotune: error:`` line that names the file / flag (exit 2), or
  skipped / warned about with the file named, while the rest works; and nothing bad happened
  (no payload ran, no half-written folder left, nothing decoded that should not be, memory and disk
  within their limits);
- lost: a traceback, a silent acceptance, a wrong result, or the wrong file named. A lost case
  marked as a hole (code ran, memory or disk without bound) is counted apart.

    python benchmarks/bench_hostile.py            # prints tried / handled / lost / holes, writes results/hostile-inputs.*

The cases live in ``benchmarks/hostile/`` (one module per surface). Tiny random-weight models
(``random:tiny``, 28 px) and payloads built small (stride-0 tensors, sparse or compressed files) keep
the whole list to a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the hostile/ package of cases

import hostile  # noqa: E402
from hostile.common import CASES  # noqa: E402

from dinotune.utils import set_quiet  # noqa: E402


def load_cases() -> None:
    """Import every module of ``hostile/``: each registers its cases."""
    for module in pkgutil.iter_modules(hostile.__path__):
        if module.name != "common":
            importlib.import_module(f"hostile.{module.name}")


def main_() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "hostile-inputs"),
                        help="results path without suffix (writes .json and .md)")
    parser.add_argument("--only", nargs="+", metavar="ITEM", help="run only these items (e.g. 20.1 20.4)")
    args = parser.parse_args()
    set_quiet(True)
    load_cases()
    rows = []
    t0 = time.time()
    for item, name, hole, fn in CASES:
        if args.only and item not in args.only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            try:
                ok, why = fn(Path(tmp))
            except Exception as exc:  # the harness itself must not hide a failure
                ok, why = False, f"harness error: {type(exc).__name__}: {exc}"
        rows.append({"item": item, "case": name, "hole": hole, "handled": bool(ok), "evidence": why})
        print(f"[{'handled' if ok else 'HOLE   ' if hole else 'LOST   '}] {item:>6}  {name}: {why}", flush=True)
    handled = sum(r["handled"] for r in rows)
    holes = sum(1 for r in rows if r["hole"] and not r["handled"])
    summary = {"tried": len(rows), "handled": handled, "lost": len(rows) - handled, "holes": holes,
               "seconds": round(time.time() - t0, 1), "cases": rows}
    print(f"\ntried {len(rows)}, handled {handled}, lost {len(rows) - handled}, holes {holes} "
          f"({summary['seconds']} s)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["# Hostile inputs and faults, replayed", "",
             f"tried {len(rows)}, handled {handled}, lost {len(rows) - handled}, holes {holes}; "
             f"`python benchmarks/bench_hostile.py`, {summary['seconds']} s on a CPU.", "",
             "| item | case | outcome | what the user saw |", "|---|---|---|---|"]
    lines += [f"| {r['item']} | {r['case']} | {'handled' if r['handled'] else '**hole**' if r['hole'] else '**lost**'} | "
              f"{r['evidence'].replace('|', '/')} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0 if handled == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main_())
