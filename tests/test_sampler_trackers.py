"""``--sampler balanced`` (class-balanced and rarest-class draws, exact on resume, sharded under
torchrun) and ``--report-to`` (TensorBoard, CSV, wandb offline, MLflow file store; a resumed run
continues the same tracker runs)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from dinotune.config import build_config
from dinotune.data.loader import make_loader
from dinotune.data.sampler import (
    BalancedSampler,
    class_balanced_weights,
    expected_image_draws,
    rarest_class_weights,
)
from dinotune.engine import distributed
from dinotune.engine.logging import RunLogger, read_metrics
from dinotune.engine.trackers import TRACKER_IDS, check_trackers, read_csv_metrics
from dinotune.errors import ConfigError
from dinotune.tasks import get_task
from dinotune.tasks.classify.probe import FeatureDataset
from dinotune.tasks.classify.task import training_labels
from dinotune.utils import set_quiet
from tests.conftest import (
    make_class_folders,
    make_coco_dataset,
    make_trainer,
    tiny_options,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------- sampling
def test_balanced_draws_every_class_equally_often():
    labels = [0] * 40 + [1] * 12 + [2] * 8 + [3] * 4
    sampler = BalancedSampler(class_balanced_weights(labels), torch.Generator().manual_seed(0))
    assert len(sampler) == len(labels)  # one epoch = len(dataset) draws
    epochs = 200
    drawn = torch.tensor([labels[i] for _ in range(epochs) for i in sampler])
    n, p = drawn.numel(), 1 / 4
    counts = torch.bincount(drawn, minlength=4).double()
    sigma = math.sqrt(n * p * (1 - p))  # binomial spread of one class's count
    assert (counts - n * p).abs().max() < 4.5 * sigma, counts  # a false alarm ~1e-5 per class
    assert abs(40 / 64 * n - n * p) > 20 * sigma  # what a plain shuffle draws of class 0: far outside


def test_rarest_class_weights_of_hand_made_annotations():
    # images containing each class: 0 -> 4 (images 0, 1, 2, 5), 1 -> 2 (0, 3), 2 -> 2 (3, 5)
    boxes = [[0, 0, 1], [0], [0], [1, 2], [], [2, 0]]
    weights = rarest_class_weights(boxes, 3)
    boxed = [1 / 2, 1 / 4, 1 / 4, 1 / 2, 1 / 2]  # 1 / images containing the image's rarest class
    expected = boxed[:4] + [sum(boxed) / 5] + boxed[4:]  # the empty image: the mean boxed weight
    torch.testing.assert_close(weights, torch.tensor(expected, dtype=torch.float64))
    # the empty image keeps its share of a plain shuffle: 1 of 6 images
    assert float(weights[4] / weights.sum()) == pytest.approx(1 / 6)
    per_class = expected_image_draws(weights, boxes, 3, draws=6)
    assert per_class[1] > 2 and per_class[0] < 4  # the rare class comes up more, the common one less
    assert torch.equal(rarest_class_weights([[], []], 2), torch.ones(2, dtype=torch.float64))


def test_the_same_draws_after_reseeding_and_one_draw_shared_by_processes(monkeypatch):
    loader = make_loader(TensorDataset(torch.arange(10)), 2, shuffle=True, workers=0,
                         weights=class_balanced_weights([0] * 7 + [1] * 3))

    def epoch(dl, seed):  # what the trainer does at the start of every epoch
        dl.generator.manual_seed(seed)
        return [int(i) for (batch,) in dl for i in batch]

    first = epoch(loader, 5)
    assert len(first) == 10 and epoch(loader, 5) == first  # a resumed run sees the same batches
    assert epoch(loader, 6) != first
    shards = []
    for rank in (0, 1):  # under torchrun: each process takes its share of the same draw
        monkeypatch.setattr(distributed, "current", lambda rank=rank: distributed.DistContext(rank, 2, 0, True))
        sharded = distributed.shard_loader(loader, seed=0)
        assert sharded.generator is loader.generator and len(sharded) == 3  # 5 indices in batches of 2
        shards.append(epoch(sharded, 5))
    assert shards[0] == first[0::2] and shards[1] == first[1::2]


def test_classify_loader_balances_by_class_from_the_file_list(tiny_folder, tmp_path, capsys):
    for path in sorted((tiny_folder / "train" / "red").iterdir())[2:]:
        path.unlink()  # 6 blue, 2 red
    cfg = build_config("classify", data=str(tiny_folder), sampler="balanced", **tiny_options(tmp_path / "r"))
    task = get_task(cfg)
    data = task.build_data(None, 14)
    set_quiet(False)
    try:
        train, _ = task.loaders(data)
    finally:
        set_quiet(True)
    assert "images per class blue 6, red 2; each epoch draws 8 with replacement, every class equally often (about 4.0 each)" in capsys.readouterr().err
    labels = training_labels(data.train)
    assert sorted(labels) == [0] * 6 + [1] * 2
    assert isinstance(train.sampler, BalancedSampler)
    torch.testing.assert_close(train.sampler.weights, torch.tensor([1 / 6 if v == 0 else 1 / 2 for v in labels],
                                                                   dtype=torch.float64))
    train.generator.manual_seed(3)
    drawn = [int(i) for batch in train for i in batch["index"]]
    train.generator.manual_seed(3)
    assert len(drawn) == 8 and [int(i) for batch in train for i in batch["index"]] == drawn
    # cached features carry their labels too
    assert training_labels(FeatureDataset(torch.zeros(3, 2), torch.tensor([1, 0, 1]))) == [1, 0, 1]


def test_detection_loader_weights_images_by_their_rarest_class(tmp_path):
    root = make_coco_dataset(tmp_path / "coco", {"train": [3, 1, 0, 2, 1, 2], "val": [1]})
    cfg = build_config("detect", data=str(root), sampler="balanced", check_images="off",
                       **{k: v for k, v in tiny_options(tmp_path / "r").items() if k != "check_images"})
    task = get_task(cfg)
    data = task.build_data(None, 14)
    train, _ = task.loaders(data)
    # the same weights from the annotation file itself (category ids 3 and 7 -> classes 0 and 1)
    coco = json.loads((root / "annotations" / "instances_train.json").read_text())
    per_image = {im["id"]: [] for im in coco["images"]}
    for a in coco["annotations"]:
        per_image[a["image_id"]].append({3: 0, 7: 1}[a["category_id"]])
    expected = rarest_class_weights([per_image[i] for i in data.train.image_ids], 2)
    torch.testing.assert_close(train.sampler.weights, expected)
    assert len(set(expected.tolist())) > 1  # the set is imbalanced enough for the weights to differ


# ------------------------------------------------------------------------------------- trackers
def _wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline ``run-*.wandb`` file (wandb has no Python reader for it):
    a 7-byte header, then LevelDB-log records (32 KiB blocks, 7-byte chunk headers) of protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, chunk, rows = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's zero-filled trailer
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4: pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.HasField("history"):
                rows.append({"_step": record.history.step.num,
                             **{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}})
    return rows


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A balanced run interrupted after epoch 2 of 3 and resumed, logging to every tracker, and
    the same run uninterrupted without trackers: ``(run folder, resumed trainer, full trainer)``."""
    root = tmp_path_factory.mktemp("tracked")
    make_class_folders(root / "data" / "train", ["red", "blue", "green"], 6, seed=1)
    for path in sorted((root / "data" / "train" / "red").iterdir())[2:]:
        path.unlink()
    make_class_folders(root / "data" / "val", ["red", "blue", "green"], 1, seed=2)
    opts = tiny_options(root / "run", epochs=3, sampler="balanced", adapter="none", lr=1e-2)
    with pytest.MonkeyPatch.context() as mp:
        for name in ("WANDB_MODE", "WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(name, raising=False)
        mp.setenv("WANDB_SILENT", "true")
        cfg = build_config("classify", data=str(root / "data"), report_to=["tensorboard", "csv", "wandb", "mlflow"],
                           **opts)
        first = make_trainer(cfg, root / "run")
        first.stop_after_epoch = 2
        first.fit()
        # what a run killed while rewriting its table would leave: the resumed run rebuilds it
        (root / "run" / "metrics.csv").write_text("epoch\n1\n")
        ids = json.loads((root / "run" / TRACKER_IDS).read_text())
        resumed = make_trainer(cfg, root / "run")
        resumed.fit(resume=True)
        full_cfg = build_config("classify", data=str(root / "data"), report_to=["none"],
                                **{**opts, "out": str(root / "full")})
        full = make_trainer(full_cfg, root / "full")
        full.fit()
    return root / "run", resumed, full, ids


def test_balanced_training_resumes_exactly(tracked):
    run, resumed, full, _ = tracked
    n = len(full.train_loader)
    assert len(full.step_losses) == 3 * n
    assert resumed.step_losses == pytest.approx(full.step_losses[2 * n:], rel=1e-6)
    assert not list((run.parent / "full").glob("tb")) and not (run.parent / "full" / "metrics.csv").exists()


def test_csv_table_equals_metrics_jsonl(tracked):
    run = tracked[0]
    records, rows = read_metrics(run), read_csv_metrics(run / "metrics.csv")
    assert [r["epoch"] for r in records] == [1, 2, 3] and len(rows) == 3
    for record, row in zip(records, rows):
        assert set(row) == set(record)
        for key, value in record.items():
            assert (row[key] == value) if isinstance(value, str) else (float(row[key]) == value), key


def test_tensorboard_events_hold_the_epoch_scalars(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tracked[0]
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    records = read_metrics(run)
    events = acc.Scalars("val/top1")
    assert [e.value for e in events] == pytest.approx([r["val/top1"] for r in records])
    assert [e.step for e in events] == sorted({e.step for e in events})  # no step twice after the resume


def test_wandb_offline_run_is_continued_with_the_history(tracked):
    run, _, _, ids = tracked
    assert json.loads((run / TRACKER_IDS).read_text())["wandb"] == ids["wandb"]  # the same run resumed
    parts = sorted(run.glob(f"wandb/offline-run-*-{ids['wandb']['id']}/run-{ids['wandb']['id']}.wandb"))
    assert len(parts) == 2  # the first start and the resume
    rows = [r for p in parts for r in _wandb_history(p) if "epoch" in r]
    records = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    for row, record in zip(rows, records):
        assert row["val/top1"] == pytest.approx(record["val/top1"]) and row["train/loss"] == pytest.approx(record["train/loss"])


def test_mlflow_file_store_holds_the_metrics(tracked, monkeypatch):
    from mlflow.tracking import MlflowClient

    run, _, _, ids = tracked
    saved = json.loads((run / TRACKER_IDS).read_text())["mlflow"]
    assert saved == ids["mlflow"] and saved["tracking_uri"] == (run / "mlruns").resolve().as_uri()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=saved["tracking_uri"])
    mlrun = client.get_run(saved["run_id"])
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["data.sampler"] == "balanced" and mlrun.data.params["train.epochs"] == "3"
    history = sorted(client.get_metric_history(saved["run_id"], "val/top1"), key=lambda m: m.step)
    records = read_metrics(run)
    assert [m.value for m in history] == pytest.approx([r["val/top1"] for r in records])
    steps = [m.step for m in history]
    assert steps == sorted(steps) and len(set(steps)) == 3


def test_none_keeps_metrics_jsonl_only(tmp_path):
    logger = RunLogger(tmp_path, report_to=["none"])
    logger.scalars({"step/loss": 1.0}, 10)
    logger.epoch({"epoch": 1, "train/loss": 0.5}, 12)
    logger.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert read_metrics(tmp_path) == [{"epoch": 1, "train/loss": 0.5}]


def test_csv_gains_a_column_when_a_record_brings_one(tmp_path):
    logger = RunLogger(tmp_path, report_to=["csv"])
    logger.epoch({"epoch": 1, "train/loss": 0.5}, 2)
    logger.epoch({"epoch": 2, "train/loss": 0.25, "val/top1": 0.75}, 4)
    logger.close()
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [
        "epoch,train/loss,val/top1", "1,0.5,", "2,0.25,0.75"]


@pytest.mark.parametrize("name", ["wandb", "mlflow"])
def test_a_missing_tracker_package_is_named_with_its_install_command(name, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, name, None)  # what an import of a package not installed does
    with pytest.raises(ConfigError, match=rf'--report-to {name} needs the {name} package.*pip install "dinotune\[{name}\]"'):
        check_trackers(["tensorboard", name])
    with pytest.raises(ConfigError, match=rf"--report-to {name}"):
        RunLogger(tmp_path, report_to=["csv", name])
    check_trackers(["tensorboard", "csv", "none"])  # nothing optional: nothing to check
