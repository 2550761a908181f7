"""Multi-process training under torchrun (Gloo on the CPU): two processes with batch B each train
exactly what one process with batch 2B trains, for every task, and only process 0 writes the run
folder; evaluation sharded over processes gives the metrics of one process.

One ``torchrun --nproc_per_node 2`` launch serves every test here (a launch costs the launcher and
two interpreters importing torch: seconds each on 2 CPU cores): it runs this file as a module
(``python -m tests.test_distributed``, ``_launched``), which runs the commands of a plan one after
the other in one process group, each ``dinotune train`` through ``dinotune.cli.main`` as ``python -m
dinotune`` does, with each process's output of each command in files of its own. The one-process
references train in this process under a process group of one (the environment ``torchrun
--nproc_per_node 1`` gives: ``launched()``, DDP, the distributed sampler), with the same flags."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dinotune
import dinotune.utils as dutils
from tests.conftest import (
    make_class_folders,
    make_coco_dataset,
    make_segmentation_folders,
    tiny_options,
)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")

ROOT = Path(__file__).resolve().parents[1]


def _train_argv(task: str, data: Path, out: Path, batch_size: int, *extra: str) -> list[str]:
    return ["train", task, "--data", str(data), "--out", str(out), "--model", "random:tiny", "--image-size", "28",
            "--batch-size", str(batch_size), "--epochs", "2", "--workers", "0", "--device", "cpu", "--no-augment",
            "--no-progress", "--adapter", "lora", "--backbone-lr", "1e-2", "--threads", "1", *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _group_of_one():
    """The environment of ``torchrun --nproc_per_node 1`` in this process: ``dinotune.train`` joins a
    Gloo group of one (and ``cli.main`` leaves it). The quiet flag and thread count are put back."""
    from dinotune.engine import distributed

    quiet, threads = dutils._QUIET, torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "1",
                           "RANK": "0", "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"}.items():
            mp.setenv(key, value)
        try:
            yield
        finally:
            distributed.cleanup()
            dutils.set_quiet(quiet)
            torch.set_num_threads(threads)


def _one_process(argv: list[str]) -> None:
    from dinotune.cli import main

    with _group_of_one():
        assert main(argv) == 0


def _weights(run: Path) -> dict[str, torch.Tensor]:
    ckpt = run / "checkpoints" / "last"
    out = {}
    for f in sorted(ckpt.rglob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
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


# Detection: images hold 0 to 5 boxes, so each process's share of a step holds a different number
# of boxes; the loss must divide by the count over all processes (DETR's num_boxes all-reduce),
# or two processes train something else than one. The validation set (5 images) splits unevenly.
DETR_FLAGS = ("--image-size", "56", "--num-queries", "5", "--decoder-layers", "2", "--hidden-dim", "16",
              "--num-heads", "2", "--ffn-dim", "32", "--sampling-points", "1", "--lr", "1e-3")
# Segmentation: every image has an ignore border of its own width, so each process's share of a
# step holds a different number of labelled pixels. FPN decoder: GroupNorm, no batch statistics
# (BatchNorm only synchronises over GPUs, through SyncBatchNorm).
SEGMENT_FLAGS = ("--decoder", "fpn", "--fpn-dim", "16", "--lr", "1e-2")

# --- sharded evaluation ---------------------------------------------------------------------------
# Every process evaluates its own shard of the validation set; the partial results are gathered.
# Checked directly: the two processes of the launch each evaluate a disjoint part of an odd-sized
# set, and both get exactly the metrics of one process evaluating everything.
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


def _sharded_evaluation(data: dict[str, str], out: Path) -> int:
    """Under the launch: this process's shard of each task's validation set, and a BatchNorm's
    buffers after ``broadcast_buffers`` (before a sharded evaluation the engine gives every process
    process 0's buffers: BatchNorm statistics drift apart per process on the CPU, where there is no
    SyncBatchNorm)."""
    from dinotune.engine import distributed

    result: dict = {name: _evaluate(name, Path(path)) for name, path in data.items()}
    bn = torch.nn.BatchNorm1d(3)
    bn.running_mean.fill_(float(distributed.current().rank + 1))
    distributed.broadcast_buffers(bn)
    result["buffers"] = bn.running_mean.tolist()
    out.write_text(json.dumps(result, default=str))
    return 0


# --- the launch -----------------------------------------------------------------------------------
@contextlib.contextmanager
def _output_to(stem: Path):
    """This process's stdout and stderr (the file descriptors: every writer) into ``stem.out`` / ``.err``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(f"{stem}.out", "w") as out, open(f"{stem}.err", "w") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _launched(plan_file: Path, out: Path) -> None:
    """One process of the launch (``torchrun ... -m tests.test_distributed PLAN OUT``): each step of
    the plan in order, in the process group torchrun set up: ``eval`` the sharded evaluation, every
    other step a command line for ``dinotune.cli.main``. Writes ``OUT/STEP.RANK.{out,err,code}``."""
    from dinotune.cli import main
    from dinotune.engine import distributed

    torch.set_num_threads(1)
    distributed.setup("cpu")
    rank = distributed.current().rank
    out.mkdir(parents=True, exist_ok=True)
    leave, distributed.cleanup = distributed.cleanup, lambda: None  # main leaves the group after each command
    try:
        for name, step in json.loads(plan_file.read_text()).items():
            with _output_to(out / f"{name}.{rank}"):
                code = _sharded_evaluation(step, out / f"{name}.{rank}.json") if name == "eval" else main(step)
            (out / f"{name}.{rank}.code").write_text(str(code))
        distributed.barrier()  # leave together: tearing Gloo down while the peer is gone can abort the process
    finally:
        leave()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ddp")
    make_class_folders(root / "cls" / "train", ["red", "blue"], 8, seed=1)  # 16 images: 2 full steps of 8
    make_class_folders(root / "cls" / "val", ["red", "blue"], 2, seed=2)
    return {"classify": root / "cls",
            "detect": make_coco_dataset(root / "coco", {"train": [1, 5, 0, 2, 4, 1, 0, 3], "val": [2, 1, 3, 0, 2]}),
            "segment": make_segmentation_folders(root / "seg", {"train": 8, "val": 5}),
            "eval": _eval_data(root / "eval"), "scene": _scene(root / "scene.tif")}


def _scene(path: Path) -> Path | None:
    """A 150 x 170 RGB GeoTIFF for tiled prediction (None without rasterio: those steps are left out)."""
    try:
        import numpy as np
        import rasterio
        from rasterio.transform import from_origin
    except ImportError:
        return None
    pixels = np.random.default_rng(4).integers(0, 255, (3, 150, 170), dtype=np.uint8)
    pixels[:, 40:70, 50:90] = 250
    with rasterio.open(path, "w", driver="GTiff", height=150, width=170, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(500000, 4000000, 10, 10), tiled=True, blockxsize=32,
                       blockysize=32) as ds:
        ds.write(pixels)
    return path


# predict --tile under the launch: each process takes its share of the tiles, process 0 writes
TILED = {"detect": ("--tile", "56", "--overlap", "0.3", "--top-k", "1000", "--draw-threshold", "0"),
         "segment": ("--tile", "28", "--overlap", "0.3")}


def _predict_argv(task: str, runs: Path, scene: Path, out: Path) -> list[str]:
    return ["predict", str(runs / task / "run"), str(scene), "--out", str(out), "--device", "cpu", "--threads", "1",
            *TILED[task]]


def _embed_argv(data: Path, out: Path) -> list[str]:
    return ["embed", "random:tiny", str(data), "--out", str(out), "--image-size", "28", "--batch-size", "3",
            "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def launch(data, tmp_path_factory) -> dict:
    """The one ``torchrun --nproc_per_node 2`` launch: its steps' run folders (``runs/STEP/run``),
    their output files, and what the launcher said."""
    root = tmp_path_factory.mktemp("launch")
    runs = root / "runs"
    plan = {
        "eval": {name: str(path) for name, path in data["eval"].items()},
        "two": _train_argv("classify", data["classify"], runs / "two" / "run", 4),
        # 2 processes x batch 2 x 2 micro-batches per step: gradients synchronised once per step
        "accum": _train_argv("classify", data["classify"], runs / "accum" / "run", 2, "--accumulate", "2"),
        "detect": _train_argv("detect", data["detect"], runs / "detect" / "run", 2, *DETR_FLAGS),
        "segment": _train_argv("segment", data["segment"], runs / "segment" / "run", 2, *SEGMENT_FLAGS),
        "cache": _train_argv("classify", data["classify"], runs / "cache" / "run", 4, "--adapter", "none",
                             "--cache-features"),
    }
    plan["embed"] = _embed_argv(data["classify"], root / "emb.parquet")
    # self-supervised: Sinkhorn-Knopp's sums over both processes' images, the teacher updated alike on each
    plan["pretrain"] = ["pretrain", "--data", str(data["classify"] / "train"), "--val-data", str(data["classify"]),
                        "--out", str(runs / "pretrain" / "run"), "--model", "random:tiny", "--image-size", "28",
                        "--batch-size", "4", "--epochs", "1", "--workers", "0", "--device", "cpu", "--no-progress",
                        "--local-crops", "1", "--prototypes", "32", "--head-hidden", "32", "--threads", "1"]
    if data["scene"] is not None:  # the detection and segmentation runs just trained, on a scene in tiles
        plan["predict-detect"] = _predict_argv("detect", runs, data["scene"], root / "tiled.json")
        plan["predict-segment"] = _predict_argv("segment", runs, data["scene"], root / "tiled.tif")
    (root / "plan.json").write_text(json.dumps(plan))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests.test_distributed", str(root / "plan.json"), str(root / "out")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        said = f"exit code {done.returncode}:\n{done.stderr[-3000:]}"
    except subprocess.TimeoutExpired as exc:
        said = f"timed out after {exc.timeout:g} s"
    return {"runs": runs, "out": root / "out", "said": said, "root": root}


def _step(launch: dict, name: str) -> tuple[list[int], str, str]:
    """The exit codes of step ``name`` in processes 0 and 1, and their stdout and stderr together."""
    out = launch["out"]
    err = "".join((out / f"{name}.{r}.err").read_text() for r in (0, 1) if (out / f"{name}.{r}.err").is_file())
    codes = [out / f"{name}.{r}.code" for r in (0, 1)]
    assert all(c.is_file() for c in codes), f"the launch did not finish step {name}:\n{err[-3000:]}\n{launch['said']}"
    said = "".join((out / f"{name}.{r}.out").read_text() for r in (0, 1))
    return [int(c.read_text()) for c in codes], said, err


def _trained(launch: dict, name: str) -> tuple[Path, str, str]:
    codes, said, err = _step(launch, name)
    assert codes == [0, 0], err[-3000:]
    return launch["runs"] / name / "run", said, err


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> Path:
    """One process, batch 8: the reference every multi-process classification run must reproduce."""
    out = tmp_path_factory.mktemp("single") / "one"
    _one_process(_train_argv("classify", data["classify"], out, 8))
    return out


def test_two_processes_equal_one_with_the_global_batch(single, launch):
    run, said, err = _trained(launch, "two")
    _assert_same_training(single, run)
    # one run folder, written by process 0 alone; the usual outputs, printed once
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]
    assert (run / "results.json").is_file()
    assert err.count("trainable parameters") == 1 and said.count("run folder:") == 1


def test_accumulation_across_processes(single, launch):
    _assert_same_training(single, _trained(launch, "accum")[0])


def test_detection_two_processes_equal_one_with_the_global_batch(data, launch, tmp_path):
    _one_process(_train_argv("detect", data["detect"], tmp_path / "one", 4, *DETR_FLAGS))
    _assert_same_training(tmp_path / "one", _trained(launch, "detect")[0], ("val/AP", "val/AP50", "val/AP75",
                                                                             "val/AR100"))


def test_segmentation_two_processes_equal_one_with_the_global_batch(data, launch, tmp_path):
    _one_process(_train_argv("segment", data["segment"], tmp_path / "one", 4, *SEGMENT_FLAGS))
    # Adam turns the float noise of near-zero gradients (sums taken in another order) into steps of
    # up to lr: measured 8e-5 here, against 3e-2 when each process divides by its own pixel count
    _assert_same_training(tmp_path / "one", _trained(launch, "segment")[0], ("val/mIoU", "val/pixel_accuracy"),
                          atol=1e-3)


def test_cached_features_refused_under_torchrun(data, launch, tmp_path):
    codes, _, err = _step(launch, "cache")
    assert codes == [2, 2] and "--cache-features extracts features in one process" in err, err[-3000:]
    assert not (launch["runs"] / "cache").exists()  # refused before the run folder is made
    # in one process the same options train
    result = dinotune.train(task="classify", data=str(data["classify"]),
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


def test_sharded_evaluation_equals_one_process(data, launch):
    codes, _, err = _step(launch, "eval")
    assert codes == [0, 0], err[-3000:]
    reference = {name: _evaluate(name, path)[0] for name, path in data["eval"].items()}
    ranks = [json.loads((launch["out"] / f"eval.{r}.json").read_text()) for r in range(2)]
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


if __name__ == "__main__":  # one process of the launch
    _launched(Path(sys.argv[1]), Path(sys.argv[2]))


def test_tiled_prediction_shares_the_tiles_and_gives_the_one_process_result(data, launch, tmp_path):
    """``torchrun ... dinotune predict RUN scene.tif --tile``: the two processes' tiles merged into one
    file, written once by process 0, equal to what one process predicts."""
    if data["scene"] is None:
        pytest.skip("tiled prediction needs the geo extra (rasterio)")
    import numpy as np
    import rasterio

    runs, root = launch["runs"], launch["root"]
    for task, out, one in (("detect", root / "tiled.json", tmp_path / "one.json"),
                           ("segment", root / "tiled.tif", tmp_path / "one.tif")):
        codes, said, err = _step(launch, f"predict-{task}")
        assert codes == [0, 0], err[-3000:]
        assert err.count("wrote") == 1  # process 0 alone writes and says so
        _one_process(_predict_argv(task, runs, data["scene"], one))
    two, single = json.loads((root / "tiled.json").read_text()), json.loads((tmp_path / "one.json").read_text())
    assert len(two[0]["detections"]) == len(single[0]["detections"]) > 0
    assert [d["bbox"] for d in two[0]["detections"]] == [d["bbox"] for d in single[0]["detections"]]
    with rasterio.open(root / "tiled.tif") as a, rasterio.open(tmp_path / "one.tif") as b:
        assert np.array_equal(a.read(1), b.read(1)) and a.crs == b.crs and a.transform == b.transform
    assert not list(root.glob("*.part*"))  # the processes' rows were assembled and removed


def test_embedding_shares_the_images_and_gives_the_one_process_file(data, launch, tmp_path):
    """``torchrun ... dinotune embed``: each process embeds its share into a part, process 0 assembles
    the parts in the one-process order, writes the file once and removes the parts."""
    import numpy as np

    from dinotune.embed.store import read_embeddings

    codes, said, err = _step(launch, "embed")
    assert codes == [0, 0], err[-3000:]
    assert err.count("wrote") == 1
    _one_process(_embed_argv(data["classify"], tmp_path / "one.parquet"))
    two, one = read_embeddings(launch["root"] / "emb.parquet"), read_embeddings(tmp_path / "one.parquet")
    assert len(one) == 20 and two.paths == one.paths and two.labels == one.labels and two.splits == one.splits
    np.testing.assert_allclose(two.vectors, one.vectors, atol=1e-5)
    assert {k: v for k, v in two.meta.items()} == one.meta
    assert not (launch["root"] / "emb.parquet.parts").exists()


def test_pretraining_runs_under_torchrun(launch):
    """``torchrun ... dinotune pretrain``: both processes train (the Sinkhorn-Knopp sums are
    all-reduced), process 0 writes the run and its backbone once; the teacher, updated by every
    process from the same synchronised student, is the same on both (the checkpoint of process 0
    reloads and evaluates)."""
    run, said, err = _trained(launch, "pretrain")
    assert (run / "backbone" / "config.json").is_file() and err.count("the pretrained backbone") == 1
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= record["val/knn_top1"] <= 1 and record["train/loss"] > 0
