"""Multi-process training under torchrun (Gloo on the CPU): two processes with batch 4 each train
exactly what one process with batch 8 trains, and only process 0 writes the run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dinotune
from tests.conftest import make_class_folders, tiny_options

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def _torchrun(nproc: int, data: Path, out: Path, batch_size: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "dinotune", "train", "classify", "--data", str(data), "--out", str(out),
           "--model", "random:tiny", "--image-size", "28", "--batch-size", str(batch_size), "--epochs", "2",
           "--workers", "0", "--device", "cpu", "--no-augment", "--no-progress", "--adapter", "lora",
           "--backbone-lr", "1e-2", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = run / "checkpoints" / "last"
    out = {}
    for f in sorted(ckpt.rglob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    make_class_folders(root / "data" / "train", ["red", "blue"], 8, seed=1)  # 16 images: 2 full steps of 8
    make_class_folders(root / "data" / "val", ["red", "blue"], 2, seed=2)
    return root / "data"


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> Path:
    """One process, batch 8: the reference every multi-process run must reproduce."""
    out = tmp_path_factory.mktemp("single") / "one"
    r = _torchrun(1, data, out, 8)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _assert_same_training(ref: Path, run: Path) -> None:
    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    assert any(v.abs().sum() > 0 for k, v in b.items() if "lora_B" in k)  # the adapter did learn
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-4, msg=k)
    la = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == 2
    for ra, rb in zip(la, lb):  # train loss averaged over both processes, evaluation by process 0
        assert ra["train/loss"] == pytest.approx(rb["train/loss"], abs=1e-5)
        assert ra["val/loss"] == pytest.approx(rb["val/loss"], abs=1e-4)


def test_two_processes_equal_one_with_the_global_batch(single, data, tmp_path):
    two = _torchrun(2, data, tmp_path / "two", 4)
    assert two.returncode == 0, two.stderr[-3000:]
    _assert_same_training(single, tmp_path / "two")
    # one run folder, written by process 0 alone; the usual outputs, printed once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]
    assert (tmp_path / "two" / "results.json").is_file()
    assert two.stderr.count("trainable parameters") == 1 and two.stdout.count("run folder:") == 1


def test_accumulation_across_processes(single, data, tmp_path):
    # 2 processes x batch 2 x 2 micro-batches per step: gradients synchronised once per step
    r = _torchrun(2, data, tmp_path / "accum", 2, "--accumulate", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    _assert_same_training(single, tmp_path / "accum")


def test_cached_features_refused_under_torchrun(data, tmp_path):
    r = _torchrun(2, data, tmp_path / "cache", 4, "--adapter", "none", "--cache-features")
    assert r.returncode != 0 and "--cache-features extracts features in one process" in r.stderr
    # in one process the same options train
    result = dinotune.train(task="classify", data=str(data),
                            **tiny_options(tmp_path / "single", adapter="none", cache_features=True, epochs=1))
    assert Path(result["run_dir"]).is_dir()


def test_a_stray_world_size_is_not_a_launch(monkeypatch):
    from dinotune.engine import distributed

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert not distributed.launched()
    ctx = distributed.setup("cpu")
    assert not ctx.enabled and ctx.world_size == 1 and ctx.is_main
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    assert distributed.launched()
