"""Multi-process training under torchrun (Gloo on the CPU): two processes with batch B each train
exactly what one process with batch 2B trains, for every task, and only process 0 writes the run
folder; evaluation sharded over processes gives the metrics of one process."""

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
from tests.conftest import (
    make_class_folders,
    make_coco_dataset,
    make_segmentation_folders,
    tiny_options,
)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def _torchrun(nproc: int, data: Path, out: Path, batch_size: int, *extra: str,
              task: str = "classify") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "dinotune", "train", task, "--data", str(data), "--out", str(out),
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


def _assert_same_training(ref: Path, run: Path, metrics: tuple[str, ...] = ("val/top1",), atol: float = 2e-5) -> None:
    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    assert any(v.abs().sum() > 0 for k, v in b.items() if "lora_B" in k)  # the adapter did learn
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)
    la = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == 2
    for ra, rb in zip(la, lb):  # train loss averaged over both processes, evaluation sharded over them
        assert ra["train/loss"] == pytest.approx(rb["train/loss"], abs=1e-5)
        assert ra["val/loss"] == pytest.approx(rb["val/loss"], abs=1e-4)
        for key in metrics:
            assert ra[key] == pytest.approx(rb[key], abs=1e-6), key


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


# Detection: images hold 0 to 5 boxes, so each process's share of a step holds a different number
# of boxes; the loss must divide by the count over all processes (DETR's num_boxes all-reduce),
# or two processes train something else than one. The validation set (5 images) splits unevenly.
DETR_FLAGS = ("--image-size", "56", "--num-queries", "5", "--decoder-layers", "2", "--hidden-dim", "16",
              "--num-heads", "2", "--ffn-dim", "32", "--sampling-points", "1", "--lr", "1e-3")


def test_detection_two_processes_equal_one_with_the_global_batch(tmp_path):
    data = make_coco_dataset(tmp_path / "coco", {"train": [1, 5, 0, 2, 4, 1, 0, 3], "val": [2, 1, 3, 0, 2]})
    one = _torchrun(1, data, tmp_path / "one", 4, *DETR_FLAGS, task="detect")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(2, data, tmp_path / "two", 2, *DETR_FLAGS, task="detect")
    assert two.returncode == 0, two.stderr[-3000:]
    _assert_same_training(tmp_path / "one", tmp_path / "two", ("val/AP", "val/AP50", "val/AP75", "val/AR100"))


# Segmentation: every image has an ignore border of its own width, so each process's share of a
# step holds a different number of labelled pixels. FPN decoder: GroupNorm, no batch statistics
# (BatchNorm only synchronises over GPUs, through SyncBatchNorm).
def test_segmentation_two_processes_equal_one_with_the_global_batch(tmp_path):
    data = make_segmentation_folders(tmp_path / "seg", {"train": 8, "val": 5})
    flags = ("--decoder", "fpn", "--fpn-dim", "16", "--lr", "1e-2")
    one = _torchrun(1, data, tmp_path / "one", 4, *flags, task="segment")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _torchrun(2, data, tmp_path / "two", 2, *flags, task="segment")
    assert two.returncode == 0, two.stderr[-3000:]
    # Adam turns the float noise of near-zero gradients (sums taken in another order) into steps of
    # up to lr: measured 8e-5 here, against 3e-2 when each process divides by its own pixel count
    _assert_same_training(tmp_path / "one", tmp_path / "two", ("val/mIoU", "val/pixel_accuracy"), atol=1e-3)


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


# --- sharded evaluation ---------------------------------------------------------------------------
# Every process evaluates its own shard of the validation set; the partial results are gathered.
# Checked directly: two Gloo processes (spawned, not torchrun) each evaluate a disjoint part of an
# odd-sized set, and both get exactly the metrics of one process evaluating everything.
EVAL_TASKS = {
    "classify": dict(image_size=28),
    "detect": dict(image_size=56, num_queries=5, decoder_layers=2, hidden_dim=16, num_heads=2, ffn_dim=32,
                   sampling_points=1),
    "segment": dict(image_size=28, decoder="fpn", fpn_dim=16),
}


def _eval_data(root: Path) -> dict[str, Path]:
    make_class_folders(root / "cls" / "train", ["red", "blue"], 2, seed=1)
    make_class_folders(root / "cls" / "val", ["red", "blue"], 3, seed=2)
    (root / "cls" / "val" / "red" / "red_2.png").unlink()  # 5 images: shards of 3 and 2
    return {"classify": root / "cls",
            "detect": make_coco_dataset(root / "coco", {"train": [1, 2], "val": [2, 1, 3, 0, 2]}),
            "segment": make_segmentation_folders(root / "seg", {"train": 2, "val": 5})}


def _evaluate(task_name: str, data: Path) -> tuple[dict, list[int]]:
    """Metrics of a deterministic random-weight model on ``data``'s validation set, evaluated
    sharded under the current process group, and the indices this process evaluated."""
    from dinotune.config import build_config
    from dinotune.engine import distributed
    from dinotune.tasks import build_backbone, get_task
    from dinotune.utils import seed_everything

    cfg = build_config(task_name, data=str(data), model="random:tiny", batch_size=2, workers=0, progress=False,
                       device="cpu", adapter="none", **EVAL_TASKS[task_name])
    seed_everything(0)
    task = get_task(cfg)
    backbone, _ = build_backbone(cfg)
    built = task.build_data(None, backbone.patch_size)
    bundle = task.build_model(built.meta, backbone)
    loader = distributed.shard_eval_loader(task.loaders(built)[1])
    metrics = task.evaluate(bundle, loader, torch.device("cpu"), "fp32")
    return metrics, list(loader.sampler)


def _eval_worker(rank: int, world: int, init_file: str, out: str, data: dict) -> None:
    import torch.distributed as dist

    from dinotune.utils import set_quiet

    set_quiet(True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result: dict = {name: _evaluate(name, Path(path)) for name, path in data.items()}
        # before a sharded evaluation the engine gives every process process 0's buffers
        # (BatchNorm statistics drift apart per process on the CPU, where there is no SyncBatchNorm)
        from dinotune.engine import distributed

        bn = torch.nn.BatchNorm1d(3)
        bn.running_mean.fill_(float(rank + 1))
        distributed.broadcast_buffers(bn)
        result["buffers"] = bn.running_mean.tolist()
        (Path(out) / f"{rank}.json").write_text(json.dumps(result, default=str))
        dist.barrier()  # leave together: tearing Gloo down while the peer is gone can abort the process
    finally:
        dist.destroy_process_group()


def test_sharded_evaluation_equals_one_process(tmp_path):
    data = {k: str(v) for k, v in _eval_data(tmp_path / "data").items()}
    reference = {name: _evaluate(name, Path(path))[0] for name, path in data.items()}
    torch.multiprocessing.spawn(_eval_worker, args=(2, str(tmp_path / "init"), str(tmp_path), data), nprocs=2)
    ranks = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert [r["buffers"] for r in ranks] == [[1.0, 1.0, 1.0]] * 2
    for name, expected in reference.items():
        shards = [set(r[name][1]) for r in ranks]
        assert shards[0] and shards[1] and not shards[0] & shards[1]  # each process evaluated a part
        assert sorted(shards[0] | shards[1]) == list(range(5))  # together every image, once
        for r in ranks:
            got = r[name][0]
            for key, value in expected.items():
                if isinstance(value, float):
                    assert got[key] == pytest.approx(value, abs=1e-6), (name, key)
                elif isinstance(value, (int, str, list)) or value is None:
                    assert got[key] == value, (name, key)
        # and the numbers are not trivially equal: the model got some things right and some wrong
        assert 0.0 < expected["loss"]
