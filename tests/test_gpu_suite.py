"""The GPU suite (``benchmarks/gpu_suite.sh`` / ``gpu_suite.py``) checked on the CPU: its dry run plans
every part, runs each benchmark at its smallest size (``random:tiny``, 1 step, 28 px) and reports
every part, writing result files with the keys the GPU run writes into a temporary folder (about
40 s on 2 idle CPU cores); and the suite's own logic: the peak table, a part that fails or overruns
its limit is reported and the others still run, a flag a script lacks is caught before the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_mfu
import gpu_suite


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The dry run through the shell entry, with this interpreter (nothing installed)."""
    out = tmp_path_factory.mktemp("gpu-suite")
    env = {**os.environ, "GPU_SUITE_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", str(BENCHMARKS / "gpu_suite.sh"), "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return out, json.loads((out / "gpu-suite-cuda.json").read_text())


def test_every_part_reports_with_a_reason(dry_run):
    out, summary = dry_run
    parts = {p["name"]: p for p in summary["parts"]}
    assert list(parts) == list(gpu_suite.PARTS)
    assert all(p["reason"] for p in parts.values())
    failed = {name: p["reason"] + "\n" + "\n".join(p["details"].get("log_tail", [])) for name, p in parts.items()
              if p["status"] != {"onnxruntime-gpu": "skipped"}.get(name, "ok")}
    assert not failed, failed
    ort = parts["onnxruntime-gpu"]["reason"]
    assert "dry run: would run" in ort and "--target" in ort
    assert summary["dry_run"] is True and summary["counts"] == {"ok": 6, "skipped": 1, "failed": 0}
    assert (out / "gpu-suite-cuda.md").read_text().count("| ok |") == 6


def test_results_stay_in_the_temporary_folder(dry_run):
    out, summary = dry_run
    for part in summary["parts"]:
        assert all(Path(f).parent == out for f in part["outputs"])
        if part["log"]:
            assert Path(part["log"]).is_relative_to(out)
    written = sorted(p.name for p in out.glob("*-cuda.*"))
    assert written == sorted(f"{stem}-cuda.{ext}" for stem in ("adapters", "gpu-suite", "inference", "mfu")
                             for ext in ("json", "md"))


def test_mfu_results_count_forward_and_backward(dry_run):
    out, _ = dry_run
    result = json.loads((out / "mfu-cuda.json").read_text())
    assert {"settings", "machine", "peak", "peak_note", "flop_count", "rows"} <= set(result)
    rows = {r["adapter"]: r for r in result["rows"]}
    assert set(rows) == {"full", "lora"}
    for r in rows.values():
        assert {"forward_flops", "backward_flops", "step_flops", "achieved_tflops", "mfu", "step_ms",
                "images_per_s", "precision", "peak_tflops"} <= set(r)
        assert r["step_flops"] == r["forward_flops"] + r["backward_flops"] > 0
        assert r["attn_implementation"] == "sdpa"
        assert r["mfu"] is None  # the CPU has no entry in the peak table
    # the counter agrees with the backbone's sizes; a frozen backbone computes no weight gradients
    assert rows["full"]["counted_over_analytic_forward"] == pytest.approx(1.0, abs=0.01)
    assert rows["full"]["backward_over_forward"] > 1.5
    assert rows["lora"]["backward_over_forward"] < 1.0


def test_adapter_and_inference_results_have_the_gpu_run_keys(dry_run):
    out, _ = dry_run
    adapters = json.loads((out / "adapters-cuda.json").read_text())
    assert {"settings", "machine", "rows", "variants"} <= set(adapters)
    assert {(r["impl"], r["setting"]) for r in adapters["rows"]} >= {("baseline", "lora"), ("dinotune", "lora"),
                                                                     ("dinotune", "lora + checkpointing")}
    assert all({"images_per_s", "peak_mb", "saved_activation_mb"} <= set(r) for r in adapters["rows"])
    assert {r["attn_implementation"] for r in adapters["rows"]} == {"sdpa"}
    inference = json.loads((out / "inference-cuda.json").read_text())
    assert {"settings", "machine", "onnxruntime", "rows", "skipped"} <= set(inference)
    assert {r["task"] for r in inference["rows"]} == {"classify", "detect", "segment"}
    for r in inference["rows"]:
        assert {"variant", "latency_ms", "throughput_img_s", "latency_ratio", "batch", "export_s"} <= set(r)
        assert r["latency_ms"] > 0 and r["throughput_img_s"] > 0
    segment = [r for r in inference["rows"] if r["task"] == "segment" and r["variant"] == "onnxruntime fp32"]
    assert segment and segment[0]["pixel_agreement"] > 0.99


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", ("bf16", 989.0)), ("NVIDIA H100 PCIe", ("bf16", 756.0)),
    ("NVIDIA H200", ("bf16", 989.0)), ("NVIDIA A100-SXM4-80GB", ("bf16", 312.0)),
    ("NVIDIA A100 80GB PCIe", ("bf16", 312.0)), ("NVIDIA L4", ("bf16", 121.0)), ("NVIDIA L40S", ("bf16", 362.0)),
    ("Tesla T4", ("fp16", 65.0)), ("NVIDIA A10G", None), ("NVIDIA GeForce RTX 4090", None),
])
def test_peak_table(name, expected):
    row = bench_mfu.peak_tflops(name)
    assert (row[1:] if row else None) == expected


def test_a_failing_or_overrunning_part_is_reported_and_the_rest_runs(tmp_path):
    boom, slow = tmp_path / "boom.py", tmp_path / "slow.py"
    boom.write_text("raise SystemExit('RuntimeError: no kernel image for this card')\n")
    slow.write_text("import time\ntime.sleep(60)\n")
    ok = tmp_path / "ok.py"
    ok.write_text("import sys, json, pathlib\nout = pathlib.Path(sys.argv[sys.argv.index('--out') + 1])\n"
                  "out.with_suffix('.json').write_text(json.dumps({'rows': [], 'skipped': [{'task': 'detect', "
                  "'variant': 'onnxruntime-gpu fp16', 'reason': 'half export failed'}]}))\n"
                  "out.with_suffix('.md').write_text('x')\n")
    logs = tmp_path / "logs"
    failed = gpu_suite.benchmark_part(gpu_suite.Part("a", str(boom), [], 30, str(tmp_path / "a")), logs, 30)
    assert failed.status == "failed" and "exit code 1" in failed.reason and "no kernel image" in failed.reason
    late = gpu_suite.benchmark_part(gpu_suite.Part("b", str(slow), [], 30, str(tmp_path / "b")), logs, 2)
    assert late.status == "failed" and late.reason.startswith("timed out")
    done = gpu_suite.benchmark_part(gpu_suite.Part("c", str(ok), [], 30, str(tmp_path / "c")), logs, 30)
    assert done.status == "ok" and "detect onnxruntime-gpu fp16 (half export failed)" in done.reason
    nothing = gpu_suite.benchmark_part(gpu_suite.Part("d", str(ok).replace("ok.py", "boom.py"), [], 30,
                                                      str(tmp_path / "d")), logs, 30)
    assert nothing.status == "failed"


def test_a_flag_the_script_lacks_is_caught_before_the_run(tmp_path):
    parts = gpu_suite.plan(False, tmp_path, compile_rows=False)
    outcome, problems = gpu_suite.scripts_part(parts)
    assert outcome.status == "ok" and not problems  # the GPU plan's flags all exist
    wrong = [gpu_suite.Part("mfu", "bench_mfu.py", ["--no-such-flag"], 10, str(tmp_path / "m")),
             gpu_suite.Part("gone", "bench_gone.py", [], 10, str(tmp_path / "g"))]
    outcome, problems = gpu_suite.scripts_part(wrong)
    assert outcome.status == "failed"
    assert "--no-such-flag" in problems["mfu"] and "does not exist" in problems["gone"]


def test_shell_entry_parses():
    assert subprocess.run(["bash", "-n", str(BENCHMARKS / "gpu_suite.sh")]).returncode == 0
