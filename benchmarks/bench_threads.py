"""How many CPU threads: PyTorch's default, one, and ``--threads 0`` (auto), on an idle machine and
on one kept busy by other processes.

Each measurement is a fresh ``dinotune`` process (as a user runs it), timed from start to end:
``predict`` of a classification run on real photos with the PyTorch backend and with onnxruntime,
and a short ``train``. "Busy" runs one CPU-bound process per core beside it (as a shared machine,
or a data loader of another job). Times are medians of ``--repeats`` runs; ratios are to PyTorch's
default on the same load.

    python benchmarks/bench_threads.py            # writes results/threads-cpu.{json,md}, ~5 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _burn(stop: multiprocessing.Event) -> None:
    x = 0
    while not stop.is_set():
        for i in range(100_000):
            x = (x * 31 + i) % 1_000_003


def timed(argv: list[str], threads: str | None, repeats: int) -> float:
    """Median wall seconds of ``python -m dinotune ARGV`` (``threads``: the ``--threads`` value, or
    None for the libraries' own default: PyTorch's one thread per core)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    # None: the libraries' defaults, a thread per core whatever else runs
    extra = ["--threads", threads if threads is not None else str(os.cpu_count() or 1)]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dinotune", *argv, *extra], cwd=ROOT, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def prepare(root: Path, images: Path) -> dict[str, list[str]]:
    """A trained classification run on ``images`` (class folders), its ONNX export, and the three
    commands to time."""
    run, export = root / "run", root / "export"
    common = ["--model", "random:small", "--image-size", "112", "--device", "cpu", "--workers", "0", "--no-progress"]
    subprocess.run([sys.executable, "-m", "dinotune", "train", "classify", "--data", str(images), "--epochs", "1",
                    "--batch-size", "16", "--adapter", "lora", "--out", str(run), *common], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "dinotune", "export", str(run), "--format", "onnx", "--exporter", "legacy",
                    "--out", str(export)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    val = str(images / "val")
    return {"predict (PyTorch, 40 photos)": ["predict", str(run), val, "--device", "cpu", "--out",
                                             str(root / "p.json")],
            "predict (onnxruntime, 40 photos)": ["predict", str(export), val, "--out", str(root / "o.json")],
            "train (1 epoch, 80 photos)": ["train", "classify", "--data", str(images), "--epochs", "1",
                                           "--batch-size", "16", "--adapter", "lora", "--out", str(root / "t"),
                                           "--report-to", "none", *common]}


def photos(source: Path, dest: Path, per_class: int) -> Path:
    """``dest/{train,val}/<class>/`` with ``per_class`` photos of each of ``source``'s classes."""
    for split in ("train", "val"):
        for folder in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            target = dest / split / folder.name
            target.mkdir(parents=True)
            for f in sorted(folder.glob("*.jpg"))[:per_class if split == "val" else 2 * per_class]:
                (target / f.name).symlink_to(f.resolve())
    return dest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help="hymenoptera class folders (default: $DINOTUNE_SHARED/data/hymenoptera)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "threads-cpu"))
    args = parser.parse_args()
    from _common import shared_dataset

    source = shared_dataset("hymenoptera", args.data)
    cores = os.cpu_count() or 1
    rows: list[dict] = []
    auto: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        commands = prepare(Path(tmp), photos(source, Path(tmp) / "data", 20))
        for load in ("idle", "busy"):
            stop = multiprocessing.Event()
            burners = [multiprocessing.Process(target=_burn, args=(stop,)) for _ in range(cores if load == "busy" else 0)]
            for b in burners:
                b.start()
            try:
                time.sleep(3 if burners else 0)
                picked = subprocess.run([sys.executable, "-c", "from dinotune.threads import choose_threads; "
                                         "print(choose_threads(0))"], cwd=ROOT, capture_output=True, text=True,
                                        env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
                auto[load] = int(picked.stdout.strip() or 0)
                print(f"{load}: auto picks {auto[load]} thread(s)", flush=True)
                for name, argv in commands.items():
                    default = timed(argv, None, args.repeats)
                    for label, threads in (("PyTorch default", None), ("1", "1"), ("auto (0)", "0")):
                        seconds = default if threads is None else timed(argv, threads, args.repeats)
                        rows.append({"load": load, "command": name, "threads": label, "seconds": round(seconds, 2),
                                     "vs_default": round(seconds / default, 2)})
                        print(f"{load:5s} {name:34s} threads {label:16s} {seconds:6.2f} s  x{seconds / default:.2f}",
                              flush=True)
            finally:
                stop.set()
                for b in burners:
                    b.join()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"machine": machine_info("cpu"), "cores": cores, "repeats": args.repeats, "auto_picks": auto,
               "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = ["# CPU threads: PyTorch's default, one, and auto", "",
             f"`python benchmarks/bench_threads.py`; {cores} cores ({summary['machine'].get('cpu_model', '?')}); "
             f"median of {args.repeats} runs, each a fresh process; busy = {cores} CPU-bound processes beside it; "
             f"auto picked {auto.get('idle')} thread(s) idle and {auto.get('busy')} busy.", "",
             "| load | command | threads | seconds | vs default |", "|---|---|---|---|---|"]
    lines += [f"| {r['load']} | {r['command']} | {r['threads']} | {r['seconds']} | {r['vs_default']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
