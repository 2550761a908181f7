"""One unattended run of dinotune's GPU benchmarks, prepared for a CUDA machine nobody has measured
on yet. ``benchmarks/gpu_suite.sh`` finds or installs the environment, then runs this file.

The parts, in order; each runs in its own process under a time limit, and each is reported ok,
skipped or failed, with the reason, in ``gpu-suite-cuda.{json,md}``: one part failing never stops
the others.

1. ``environment``: the Python the suite runs with (``gpu_suite.sh`` says how it found or made it).
2. ``machine``: GPU name, driver, CUDA and cuDNN, torch / transformers / peft / onnxruntime versions,
   and the attention transformers builds dinotune's backbones with (``sdpa``, its default).
3. ``scripts``: every benchmark script the run calls exists, its ``--help`` parses, and it lists
   every flag the run passes (a part whose script fails this is reported failed, not run).
4. ``mfu``: ``bench_mfu.py``: ViT-S at batch 128 and ViT-B at batch 64, 224 px, full fine-tuning and
   LoRA, bf16 autocast: FLOPs per step (FlopCounterMode), FLOP/s and MFU against the card's peak.
5. ``adapters``: ``bench_adapters.py --device cuda``: dinotune vs a hand-written transformers + PEFT
   loop, and the memory options (ViT-S, 224 px, batch 64, bf16; one run per setting).
6. ``onnxruntime-gpu``: ``pip install --target`` of ``onnxruntime-gpu`` into a folder of its own
   (the venv's CPU onnxruntime stays as it is), then a CUDA session on a one-node graph.
7. ``inference``: ``bench_inference.py --device cuda`` on synthetic images: classification, the
   DETR-style detector and the FPN segmenter (ViT-S, 224 px), each exported: batch-1 latency and
   batch-32 throughput in PyTorch (fp32, bf16) and onnxruntime-gpu (fp32, fp16 export).

Figures land in ``benchmarks/results/{mfu,adapters,inference}-cuda.{json,md}`` with the machine;
logs in ``runs/gpu-suite/logs``. The benchmark parts share a time budget (``--budget-s``, 450 s by
default: under 8 minutes with the start), not counting the one-time install of ``.venv``.

``--dry-run`` is the same plan on the CPU at the smallest sizes (``random:tiny``, 1 step, 28 px, one
adapter, in-process), into a temporary folder (or ``--out``): it installs nothing and plans the
install (``tests/test_gpu_suite.py`` runs it).

    bash benchmarks/gpu_suite.sh                 # on the GPU machine
    bash benchmarks/gpu_suite.sh --dry-run       # on any machine: checks the plan on the CPU
    python benchmarks/gpu_suite.py --parts mfu,inference   # again, some parts only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SUMMARY = "gpu-suite-cuda"
PARTS = ("environment", "machine", "scripts", "mfu", "adapters", "onnxruntime-gpu", "inference")
BENCHMARK_PARTS = PARTS[3:]  # the parts that measure (and may be chosen with --parts)
ORT_PACKAGE = "onnxruntime-gpu"
DEFAULT_ORT_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dinotune" / "gpu-suite" / "ort-gpu"
MIN_PART_S = 20  # a benchmark part is not started with less of the budget left


@dataclass
class Part:
    """A benchmark script run as one part: its flags, time limit and the result files it writes."""

    name: str
    script: str
    args: list[str]
    limit_s: int
    output: str  # the results path without suffix; the part writes .json and .md


@dataclass
class Outcome:
    """What one part did. ``status``: ok, skipped or failed; ``reason`` says why (or what was seen)."""

    name: str
    status: str
    reason: str = ""
    seconds: float = 0.0
    command: list[str] | None = None
    outputs: list[str] = field(default_factory=list)
    log: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ plan
def plan(dry_run: bool, out: Path, compile_rows: bool) -> list[Part]:
    """The benchmark parts: the GPU sizes, or with ``dry_run`` the smallest CPU ones."""
    if dry_run:  # one thread: a busy 2-core machine makes torch's spinning thread pool 5-100x slower
        return [
            Part("mfu", "bench_mfu.py", ["--device", "cpu", "--configs", "tiny:full:2,tiny:lora:2", "--size", "28",
                                         "--steps", "1", "--warmup", "1", "--threads", "1"],
                 120, str(out / "mfu-cuda")),
            Part("adapters", "bench_adapters.py", ["--device", "cpu", "--model", "tiny", "--adapters", "lora",
                                                   "--size", "28", "--batch", "2", "--steps", "1", "--warmup", "1",
                                                   "--repeats", "1", "--no-compile", "--in-process",
                                                   "--threads", "1"],
                 120, str(out / "adapters-cuda")),
            Part("inference", "bench_inference.py", ["--device", "cpu", "--model", "random:tiny", "--image-size", "28",
                                                     "--data", "synthetic", "--tasks", "classify,detect,segment",
                                                     "--repeats", "2", "--batch", "2", "--exporter", "legacy",
                                                     "--threads", "1"],
                 180, str(out / "inference-cuda")),
        ]
    return [
        Part("mfu", "bench_mfu.py", ["--device", "cuda", "--size", "224", "--steps", "20", "--warmup", "5"], 150,
             str(out / "mfu-cuda")),
        Part("adapters", "bench_adapters.py", ["--device", "cuda", "--model", "small", "--size", "224", "--batch", "64",
                                               "--steps", "20", "--warmup", "3", "--repeats", "1"]
             + ([] if compile_rows else ["--no-compile"]), 300 if compile_rows else 240, str(out / "adapters-cuda")),
        Part("inference", "bench_inference.py", ["--device", "cuda", "--model", "random:small", "--image-size", "224",
                                                 "--data", "synthetic", "--tasks", "classify,detect,segment",
                                                 "--repeats", "30", "--batch", "32", "--onnx-fp16"],
             240, str(out / "inference-cuda")),
    ]


def command(part: Part) -> list[str]:
    return [sys.executable, str(HERE / part.script), *part.args, "--out", part.output]


# ------------------------------------------------------------------------------------ processes
def run_logged(cmd: list[str], log: Path, limit_s: float, env: dict[str, str] | None = None
               ) -> tuple[int | None, float]:
    """Run ``cmd`` with its output in ``log``; the exit code (None: killed at ``limit_s``, with
    every process it started) and the seconds it took."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as sink:
        sink.write("$ " + " ".join(cmd) + "\n")
        sink.flush()
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=max(1.0, limit_s))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            code = None
        except BaseException:  # the suite itself interrupted or ended: its part goes with it
            _kill_group(proc)
            raise
    return code, time.perf_counter() - t0


def _kill_group(proc: subprocess.Popen) -> None:
    """End ``proc`` and the processes it started (its own session): TERM, then KILL."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def log_tail(log: Path, lines: int = 15) -> list[str]:
    try:
        return [line.rstrip() for line in log.read_text(errors="replace").splitlines() if line.strip()][-lines:]
    except OSError:
        return []


def failure_line(log: Path) -> str:
    """The line of ``log`` that says best what went wrong: the last error line, else the last line."""
    tail = log_tail(log, 40)
    errors = [line for line in tail if "Error" in line or "error:" in line or line.startswith("SystemExit")]
    return (errors or tail or ["(no output)"])[-1].strip()[:400]


def child_json(mode: str, log: Path, limit_s: float, env: dict[str, str] | None = None) -> tuple[dict | None, str]:
    """Run this file as ``--child mode`` and read the JSON line it prints last; or None and why not."""
    code, _ = run_logged([sys.executable, str(Path(__file__).resolve()), "--child", mode], log, limit_s, env)
    lines = log_tail(log, 400)
    found = next((line for line in reversed(lines) if line.startswith("{")), None)
    if code == 0 and found:
        return json.loads(found), ""
    return None, "timed out" if code is None else f"exit code {code}: {failure_line(log)}"


# ----------------------------------------------------------------------------------- the parts
def environment_part() -> Outcome:
    """What ``gpu_suite.sh`` did to find or make the environment (or: run directly)."""
    status = os.environ.get("GPU_SUITE_ENV_STATUS", "ok")
    reason = os.environ.get("GPU_SUITE_ENV_REASON") or f"{sys.executable} as given (gpu_suite.py run directly)"
    return Outcome("environment", status, reason, details={"python": sys.executable, "version": sys.version.split()[0]})


def machine_part(logs: Path) -> Outcome:
    t0 = time.perf_counter()
    info, why = child_json("machine", logs / "machine.log", 120)
    seconds = round(time.perf_counter() - t0, 1)
    if info is None:
        return Outcome("machine", "failed", f"could not read the machine ({why})", seconds,
                       log=str(logs / "machine.log"))
    gpu = info.get("gpu") or "no CUDA device"
    reason = f"{gpu}, driver {info.get('driver')}, CUDA {info.get('cuda')}, torch {info.get('torch')}"
    return Outcome("machine", "ok", reason, seconds, details=info)


def scripts_part(parts: list[Part]) -> tuple[Outcome, dict[str, str]]:
    """Every part's script exists, ``--help`` parses, and every flag the run passes is in it.
    Returns the outcome and, per part name, what is wrong with its script."""
    t0 = time.perf_counter()
    problems: dict[str, str] = {}
    checked = {}
    for part in parts:
        path = HERE / part.script
        if not path.is_file():
            problems[part.name] = f"{path} does not exist"
            continue
        try:
            out = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=60,
                                 cwd=ROOT)
        except subprocess.TimeoutExpired:
            problems[part.name] = f"{part.script} --help did not answer in 60 s"
            continue
        if out.returncode:
            said = (out.stderr or out.stdout or "(no output)").strip().splitlines()[-1][:300]
            problems[part.name] = f"{part.script} --help: exit code {out.returncode}: {said}"
            continue
        flags = sorted({a for a in part.args + ["--out"] if a.startswith("--")})
        missing = [f for f in flags if f not in out.stdout]
        if missing:
            problems[part.name] = f"{part.script} has no {', '.join(missing)}"
        checked[part.script] = flags
    seconds = round(time.perf_counter() - t0, 1)
    if problems:
        return Outcome("scripts", "failed", "; ".join(f"{k}: {v}" for k, v in problems.items()), seconds,
                       details={"checked": checked}), problems
    return Outcome("scripts", "ok", f"{len(checked)} scripts parse --help and list every flag passed", seconds,
                   details={"checked": checked}), problems


def benchmark_part(part: Part, logs: Path, limit_s: float, env: dict[str, str] | None = None) -> Outcome:
    """Run one benchmark script; ok when it exits 0 and wrote its .json and .md."""
    log = logs / f"{part.name}.log"
    cmd = command(part)
    code, seconds = run_logged(cmd, log, limit_s, env)
    files = [Path(part.output).with_suffix(s) for s in (".json", ".md")]
    outcome = Outcome(part.name, "ok", "", round(seconds, 1), cmd, [str(f) for f in files if f.is_file()], str(log))
    if code is None:
        outcome.status, outcome.reason = "failed", f"timed out after {seconds:.0f} s (limit {limit_s:.0f} s)"
    elif code:
        outcome.status, outcome.reason = "failed", f"exit code {code}: {failure_line(log)}"
    elif len(outcome.outputs) < len(files):
        outcome.status, outcome.reason = "failed", f"exited 0 but did not write {part.output}.json and .md"
    else:
        outcome.reason = f"wrote {Path(part.output).name}.json and .md"
        result = json.loads(files[0].read_text())
        attention = sorted({str(r["attn_implementation"]) for r in result.get("rows", []) if "attn_implementation" in r})
        if attention:
            outcome.reason += f"; attention: {', '.join(attention)}"
        skipped = result.get("skipped") or []
        if skipped:
            outcome.reason += "; not measured: " + "; ".join(f"{s['task']} {s['variant']} ({s['reason']})"
                                                             for s in skipped)
    if outcome.status == "failed":
        outcome.details["log_tail"] = log_tail(log)
    return outcome


def pip_command(target: Path) -> list[str]:
    """Install onnxruntime-gpu into ``target`` alone (its dependencies are onnxruntime's, already in
    the venv); short network timeouts, so a machine without a registry fails in seconds."""
    return [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
            "--timeout", "20", "--retries", "1", "--target", str(target), ORT_PACKAGE]


def with_path(env_dir: Path | None) -> dict[str, str] | None:
    """The environment with ``env_dir`` first on PYTHONPATH (None: this process's environment)."""
    if env_dir is None:
        return None
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(env_dir), env.get("PYTHONPATH", "")]))
    return env


def onnxruntime_part(logs: Path, ort_dir: Path, dry_run: bool, limit_s: float) -> tuple[Outcome, Path | None]:
    """onnxruntime with a working CUDA provider: the venv's own, an earlier install in ``ort_dir``,
    or a new ``pip install --target ort_dir``. Returns the outcome and the folder to put first on
    PYTHONPATH (None: the venv's onnxruntime)."""
    t0 = time.perf_counter()
    pip = pip_command(ort_dir)

    def done(status: str, reason: str, overlay: Path | None, **details: Any) -> tuple[Outcome, Path | None]:
        return Outcome("onnxruntime-gpu", status, reason, round(time.perf_counter() - t0, 1), details=details), overlay

    probe, why = child_json("ort-probe", logs / "ort-probe.log", 120)
    if probe and probe["cuda_ok"]:
        return done("ok", f"the environment's onnxruntime {probe['version']} runs on CUDA", None, probe=probe)
    if dry_run:
        pip_ok = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True,
                                check=False).returncode == 0
        seen = f"onnxruntime {probe['version']}: {probe['problem']}" if probe else f"probe failed ({why})"
        return done("skipped", f"dry run: would run `{' '.join(pip[1:])}` (pip {'found' if pip_ok else 'MISSING'}); "
                    f"probe ran: {seen}", None, probe=probe, pip_command=pip)
    if not (ort_dir / "onnxruntime").is_dir():
        code, _ = run_logged(pip, logs / "ort-install.log", limit_s)
        if code != 0:
            what = "timed out" if code is None else failure_line(logs / "ort-install.log")
            return done("skipped", f"pip could not install {ORT_PACKAGE} ({what}): no GPU onnxruntime figures",
                        None, pip_command=pip)
    probe, why = child_json("ort-probe", logs / "ort-probe-gpu.log", 120, with_path(ort_dir))
    if probe and probe["cuda_ok"]:
        return done("ok", f"{ORT_PACKAGE} {probe['version']} installed in {ort_dir}; a CUDA session runs", ort_dir,
                    probe=probe)
    problem = probe["problem"] if probe else why
    said = ort_complaints(logs / "ort-probe-gpu.log")
    return done("failed", f"{ORT_PACKAGE} installed but its CUDA provider does not start: {problem}"
                + (f" ({'; '.join(said)})" if said else ""), ort_dir, probe=probe)


def ort_complaints(log: Path) -> list[str]:
    """What onnxruntime logged about its CUDA provider: the library it could not load and the
    CUDA / cuDNN versions it requires (colour codes and timestamps left out)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(log_tail(log, 80)))
    found = [f"could not load {m.group(1).strip()}" for m in re.finditer(r"with error: ([^\n]+)", text)]
    found += [f"it requires {m.group(1)}" for m in re.finditer(r"Require (.+?)\. Please", text)]
    return list(dict.fromkeys(found))[:3]


# ------------------------------------------------------------------------------- child modes
def child_machine() -> None:
    """Print the machine as JSON (this runs in the benchmarks' interpreter, so torch is there)."""
    sys.path.insert(0, str(HERE))
    import importlib.metadata as md

    import torch
    from _common import machine_info

    cuda = torch.cuda.is_available()
    info = machine_info("cuda" if cuda else "cpu")
    info["cuda_available"] = cuda
    info["torch_cuda_build"] = torch.version.cuda
    for package in ("dinotune", "transformers", "peft", "onnxruntime", "onnxruntime-gpu", "onnx"):
        try:
            info[package] = md.version(package)
        except md.PackageNotFoundError:
            info[package] = None
    if cuda:
        info["sdpa_kernels_enabled"] = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                                        "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                                        "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                                        "math": torch.backends.cuda.math_sdp_enabled()}
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit,"
                                  "clocks.max.sm", "--format=csv"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip() if smi.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            info["nvidia_smi"] = None
    print(json.dumps(info))


def child_ort_probe() -> None:
    """Print whether onnxruntime (whichever PYTHONPATH finds) runs a one-node graph on CUDA."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    result = {"version": ort.__version__, "path": str(Path(ort.__file__).parent), "device": ort.get_device(),
              "providers": ort.get_available_providers(), "session_providers": None, "cuda_ok": False, "problem": ""}
    if "CUDAExecutionProvider" not in result["providers"]:
        result["problem"] = "no CUDAExecutionProvider in this build (the CPU package)"
        print(json.dumps(result))
        return
    import torch  # noqa: F401 - torch's CUDA libraries loaded first, as in the benchmark

    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as exc:  # noqa: BLE001 - the session below says what is missing
            result["preload_dlls"] = str(exc)[:300]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime the suite may meet
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    result["session_providers"] = session.get_providers()
    import numpy as np

    session.run(None, {"x": np.eye(2, dtype=np.float32)})
    result["cuda_ok"] = result["session_providers"][0] == "CUDAExecutionProvider"
    if not result["cuda_ok"]:
        result["problem"] = f"the session fell back to {result['session_providers'][0]}"
    print(json.dumps(result))


# ----------------------------------------------------------------------------------- summary
def write_summary(out: Path, outcomes: list[Outcome], args: argparse.Namespace, started: str, wall_s: float) -> Path:
    machine = next((o.details for o in outcomes if o.name == "machine"), {})
    result = {"suite": "dinotune gpu suite", "dry_run": args.dry_run, "started_utc": started,
              "wall_s": round(wall_s, 1),
              "budget_s": args.budget_s, "python": sys.executable, "results": str(out), "logs": str(args.logs),
              "machine": machine, "parts": [asdict(o) for o in outcomes],
              "counts": {s: sum(o.status == s for o in outcomes) for s in ("ok", "skipped", "failed")}}
    path = out / f"{SUMMARY}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    title = "dry run on the CPU (smallest sizes; not figures)" if args.dry_run else machine.get("gpu", "no GPU")
    lines = [f"# GPU suite: {title}", "",
             f"Started {started} UTC, {wall_s:.0f} s in all (benchmark budget {args.budget_s} s); `bash "
             "benchmarks/gpu_suite.sh` (`--dry-run`: the plan on the CPU). Machine: "
             + json.dumps({k: machine.get(k) for k in ("gpu", "driver", "cuda", "cudnn", "torch", "transformers",
                                                       "onnxruntime")}), "",
             "| part | status | seconds | reason |", "|---|---|---|---|"]
    for o in outcomes:
        reason = " ".join(o.reason.split()).replace("|", "/")
        lines.append(f"| {o.name} | {o.status} | {o.seconds:.1f} | {reason} |")
    counts = result["counts"]
    lines += ["", f"{counts['ok']} ok, {counts['skipped']} skipped, {counts['failed']} failed. Logs: {args.logs}", ""]
    path.with_suffix(".md").write_text("\n".join(lines))
    return path


# -------------------------------------------------------------------------------------- main
def run_suite(args: argparse.Namespace, report: Callable[[list[Outcome]], Any]) -> list[Outcome]:
    """Every part in order; ``report`` is called with the outcomes so far after each part (a run
    cut short still leaves its summary)."""
    deadline = time.monotonic() + args.budget_s
    selected = set(args.parts.split(",")) if args.parts else set(PARTS)
    if "inference" in selected:  # its onnxruntime-gpu variants need the install (quick when done before)
        selected.add("onnxruntime-gpu")
    outcomes = [environment_part(), machine_part(args.logs)]
    machine = outcomes[-1]
    parts = plan(args.dry_run, args.out, args.compile)
    scripts, problems = scripts_part(parts)
    outcomes.append(scripts)
    cuda = bool(machine.details.get("cuda_available"))
    if machine.status != "ok":
        blocker = f"no working environment (machine: {machine.reason})"
    elif not cuda and not args.dry_run:
        blocker = (f"no CUDA device here (torch {machine.details.get('torch')}, built for CUDA "
                   f"{machine.details.get('torch_cuda_build')}, sees none); `--dry-run` checks the plan on the CPU")
    else:
        blocker = ""
    by_name = {p.name: p for p in parts}
    ort_dir: Path | None = None
    for name in BENCHMARK_PARTS:
        left = deadline - time.monotonic()
        if name not in selected:
            outcomes.append(Outcome(name, "skipped", "not selected (--parts)"))
        elif blocker:
            outcomes.append(Outcome(name, "skipped", blocker))
        elif name in problems:
            outcomes.append(Outcome(name, "failed", f"script check: {problems[name]}"))
        elif left < MIN_PART_S:
            outcomes.append(Outcome(name, "skipped", f"time budget spent ({args.budget_s} s, --budget-s)"))
        elif name == "onnxruntime-gpu":
            outcome, ort_dir = onnxruntime_part(args.logs, args.ort_dir, args.dry_run, min(180, left))
            outcomes.append(outcome)
        else:
            part = by_name[name]
            env = with_path(ort_dir) if name == "inference" else None
            outcomes.append(benchmark_part(part, args.logs, min(part.limit_s, left), env))
        print(f"[gpu-suite] {outcomes[-1].name}: {outcomes[-1].status} {outcomes[-1].reason}", flush=True)
        report(outcomes)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="the plan on the CPU at the smallest sizes, into a temporary folder; installs nothing")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default benchmarks/results; a new temporary folder with --dry-run)")
    p.add_argument("--logs", type=Path, default=None, help="log folder (default runs/gpu-suite/logs; OUT/logs dry)")
    p.add_argument("--budget-s", type=int, default=450, help="seconds for the benchmark parts together")
    p.add_argument("--parts", default="", help=f"comma-separated subset of {','.join(BENCHMARK_PARTS)} (default all)")
    p.add_argument("--compile", action="store_true", help="adapters: add the --compile rows (a cold compile each)")
    p.add_argument("--ort-dir", type=Path, default=DEFAULT_ORT_DIR, help="where onnxruntime-gpu is installed")
    p.add_argument("--strict", action="store_true", help="exit 1 when a part failed (default: always 0)")
    p.add_argument("--child", choices=["machine", "ort-probe"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_machine() if args.child == "machine" else child_ort_probe()
        return 0
    unknown = set(filter(None, args.parts.split(","))) - set(BENCHMARK_PARTS)
    if unknown:
        p.error(f"--parts: unknown {', '.join(sorted(unknown))}; choose among {', '.join(BENCHMARK_PARTS)}")
    args.out = (args.out or (Path(tempfile.mkdtemp(prefix="gpu-suite-dry-")) if args.dry_run
                             else HERE / "results")).resolve()
    args.logs = (args.logs or (args.out / "logs" if args.dry_run else ROOT / "runs" / "gpu-suite" / "logs")).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    t0 = time.perf_counter()
    print(f"[gpu-suite] {'dry run' if args.dry_run else 'run'}: results in {args.out}, logs in {args.logs}", flush=True)
    args.logs.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _terminated)

    def report(outcomes: list[Outcome]) -> Path:
        # a run that measured nothing (no GPU here) leaves the results folder's figures alone
        measured = args.dry_run or any(o.name in BENCHMARK_PARTS and o.status != "skipped" for o in outcomes)
        return write_summary(args.out if measured else args.logs, outcomes, args, started, time.perf_counter() - t0)

    outcomes = run_suite(args, report)
    path = report(outcomes)
    print(path.with_suffix(".md").read_text())
    print(f"[gpu-suite] wrote {path} and {path.with_suffix('.md')}")
    return 1 if args.strict and any(o.status == "failed" for o in outcomes) else 0


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(f"gpu_suite: ended by signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
