"""Run folders under faults: a hostile trainer state runs nothing, a kill between checkpoint and log
loses no epoch, a full disk keeps the previous checkpoint, damaged files are named (with whether
the other checkpoint is usable), and a cut saved config is refused instead of filled with defaults."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError

import dinotune
from dinotune.config import ClassifyConfig, ConfigError, DetectConfig, build_config, load_yaml, to_dict
from dinotune.config.io import ADDED_KEYS, load_run_config
from dinotune.engine import checkpoint
from dinotune.engine.logging import RunLogger, read_metrics
from dinotune.errors import CheckpointError
from tests.conftest import make_class_folders, make_trainer, tiny_options


# ------------------------------------------------------------------------------------ fixtures
def _train_template(root: Path, **extra) -> Path:
    make_class_folders(root / "data" / "train", ["red", "blue"], 6, seed=1)
    make_class_folders(root / "data" / "val", ["red", "blue"], 3, seed=2)
    result = dinotune.train(task="classify", data=str(root / "data"), **tiny_options(root / "run", **extra))
    return Path(result["run_dir"])


@pytest.fixture(scope="module")
def lora_template(tmp_path_factory) -> Path:
    """A finished 2-epoch LoRA run (best and last); tests work on copies of it."""
    return _train_template(tmp_path_factory.mktemp("lora"), adapter="lora", epochs=2)


@pytest.fixture(scope="module")
def full_template(tmp_path_factory) -> Path:
    return _train_template(tmp_path_factory.mktemp("full"), adapter="full", epochs=2)


def _copy_run(template: Path, tmp_path: Path) -> Path:
    """A private copy (separate files: the template's best / last may share hard links)."""
    run = tmp_path / "run"
    shutil.copytree(template, run)
    return run


def _truncate(path: Path) -> None:
    """Cut ``path`` to half its size as a new file, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 2])


# ---------------------------------------------------------------- 1. no code runs on resume
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _write_plain_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"epoch": 1, "rng": _Payload(marker)}))


def _write_torch_pickle(path: Path, marker: Path) -> None:
    torch.save({"epoch": 1, "rng": _Payload(marker)}, path)


@pytest.mark.parametrize("name, writer", [
    ("trainer_state.pt", _write_plain_pickle),  # the pickle format of older versions
    ("trainer_state.pt", _write_torch_pickle),
    ("trainer_state.safetensors", _write_plain_pickle),  # a pickle under the current name
])
def test_a_pickled_trainer_state_runs_nothing_on_resume(lora_template, tmp_path, name, writer):
    run = _copy_run(lora_template, tmp_path)
    last = run / "checkpoints" / "last"
    (last / checkpoint.TRAINER_STATE).unlink()
    marker = tmp_path / "MARKER"
    writer(last / name, marker)
    with pytest.raises(CheckpointError, match=rf"checkpoints/last/{name}") as caught:
        dinotune.train(resume=run)
    assert not marker.exists(), "the pickle's payload ran"
    assert "pickle" in str(caught.value) or "damaged" in str(caught.value)


def test_trainer_state_round_trips_exactly_without_pickle(tmp_path):
    state = {
        "epoch": 3, "phase": None, "global_step": 12, "best": {"epoch": 2, "val/top1": 0.5, "phase": "train"},
        "optimizer": {"state": {0: {"step": torch.tensor(4.0), "exp_avg": torch.randn(3, 2)}},
                      "param_groups": [{"params": [0], "betas": (0.9, 0.999), "name": "head", "fused": None}]},
        "scheduler": {"last_epoch": 12, "_last_lr": [1e-3], "lr_lambdas": [None]},
        "scaler": None,
        "rng": dinotune.utils.get_rng_state(),
        "odd": {"__tuple__": "a dict that looks like a marker"},
        "nan": float("nan"),
    }
    checkpoint.write_trainer_state(tmp_path / "s.safetensors", state)
    assert not (tmp_path / "s.safetensors").read_bytes().startswith(b"PK")  # not a torch (zip + pickle) file
    back = checkpoint.read_trainer_state(tmp_path / "s.safetensors")
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    assert back["odd"] == state["odd"] and back["best"] == state["best"] and back["scheduler"] == state["scheduler"]
    assert back["rng"]["python"] == state["rng"]["python"] and back["rng"]["numpy"] == state["rng"]["numpy"]
    assert torch.equal(back["rng"]["torch"], state["rng"]["torch"])
    assert back["nan"] != back["nan"]


# ------------------------------------------------- 14. a kill between checkpoint and log line
def _epochs(run: Path) -> list[int]:
    return [r["epoch"] for r in read_metrics(run)]


def test_a_kill_right_after_the_checkpoint_loses_no_epoch_record(tiny_folder, tmp_path, monkeypatch):
    cfg = build_config("classify", data=str(tiny_folder), **tiny_options(tmp_path / "r", epochs=3))
    real_save = checkpoint.save

    def save_then_die(folder, model, cfg, meta, trainer_state=None):
        real_save(folder, model, cfg, meta, trainer_state)
        if Path(folder).name == "last" and meta["epoch"] == 2:
            raise SystemExit("killed")

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(SystemExit):
        make_trainer(cfg, tmp_path / "r").fit()
    assert _epochs(tmp_path / "r") == [1, 2]  # logged before its checkpoint: there even if never resumed
    monkeypatch.undo()
    make_trainer(cfg, tmp_path / "r").fit(resume=True)
    assert _epochs(tmp_path / "r") == [1, 2, 3]


def test_resume_restores_a_missing_epoch_record_from_the_checkpoint(tiny_folder, tmp_path):
    cfg = build_config("classify", data=str(tiny_folder), **tiny_options(tmp_path / "r", epochs=3))
    first = make_trainer(cfg, tmp_path / "r")
    first.stop_after_epoch = 2
    first.fit()
    kept = checkpoint.read_meta(tmp_path / "r" / "checkpoints" / "last")["metrics"]
    metrics = tmp_path / "r" / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()[:1]))  # as lost
    make_trainer(cfg, tmp_path / "r").fit(resume=True)
    history = read_metrics(tmp_path / "r")
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[1] == kept


def test_a_line_cut_short_by_a_kill_does_not_block_resume(tiny_folder, tmp_path):
    cfg = build_config("classify", data=str(tiny_folder), **tiny_options(tmp_path / "r", epochs=3))
    first = make_trainer(cfg, tmp_path / "r")
    first.stop_after_epoch = 2
    first.fit()
    with (tmp_path / "r" / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 3, "train/lo')  # killed while appending
    make_trainer(cfg, tmp_path / "r").fit(resume=True)
    assert _epochs(tmp_path / "r") == [1, 2, 3]


# --------------------------------------------------------------- 15. a full disk while saving
def _fail_second_state_write(monkeypatch, error):
    real, calls = checkpoint.write_trainer_state, []

    def writer(path, state):
        calls.append(path)
        if len(calls) == 2:
            raise error
        real(path, state)

    monkeypatch.setattr(checkpoint, "write_trainer_state", writer)


def _fail_second_head_write(monkeypatch, error):
    real, calls = checkpoint.save_file, []

    def writer(tensors, path, metadata=None):
        if Path(path).name == checkpoint.HEAD_WEIGHTS:
            calls.append(path)
            if len(calls) == 2:
                raise error
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", writer)


_INTACT = r"; the previous checkpoint is intact"


@pytest.mark.parametrize("patch, error, message", [
    (_fail_second_state_write, OSError(errno.ENOSPC, "No space left on device"),
     r"no space left on device while saving \S*/checkpoints/last" + _INTACT),
    # what safetensors raises on a full disk: text, no errno
    (_fail_second_head_write, SafetensorError("Error while serializing: I/O error: No space left on device "
                                              "(os error 28)"),
     r"no space left on device while saving \S*/checkpoints/last" + _INTACT),
    (_fail_second_state_write, OSError(errno.EIO, "Input/output error"),
     r"saving \S*/checkpoints/last failed \(\[Errno 5\] Input/output error\)" + _INTACT),
])
def test_a_failed_save_keeps_the_previous_checkpoint(tiny_folder, tmp_path, monkeypatch, patch, error, message):
    cfg = build_config("classify", data=str(tiny_folder), **tiny_options(tmp_path / "r", epochs=2))
    trainer = make_trainer(cfg, tmp_path / "r")
    patch(monkeypatch, error)
    with pytest.raises(CheckpointError, match=message):
        trainer.fit()
    monkeypatch.undo()
    ckpts = tmp_path / "r" / "checkpoints"
    assert not (ckpts / ".last.tmp").exists()
    assert checkpoint.read_meta(ckpts / "last")["epoch"] == 1
    assert checkpoint.load_trainer_state(ckpts / "last")["epoch"] == 1
    checkpoint.load_weights(ckpts / "last", trainer.model, cfg.adapter)


def test_a_full_disk_while_logging_the_epoch_is_told_clearly(tiny_folder, tmp_path, monkeypatch):
    """The epoch's line is written before its checkpoint, so a full disk may show there first."""
    cfg = build_config("classify", data=str(tiny_folder), **tiny_options(tmp_path / "r", epochs=2))
    trainer = make_trainer(cfg, tmp_path / "r")
    real = RunLogger.epoch

    def epoch(self, record, step):
        if record["epoch"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, record, step)

    monkeypatch.setattr(RunLogger, "epoch", epoch)
    with pytest.raises(CheckpointError, match=r"no space left on device while logging epoch 2 in \S*/r; the run "
                                              r"stopped before saving this epoch's checkpoint"):
        trainer.fit()
    assert checkpoint.read_meta(tmp_path / "r" / "checkpoints" / "last")["epoch"] == 1


# ------------------------------------------------------------------- 17. truncated files
@pytest.mark.parametrize("name", ["head.safetensors", "adapter_model.safetensors"])
def test_a_truncated_weights_file_is_named_and_the_other_checkpoint_offered(lora_template, tmp_path, name):
    run = _copy_run(lora_template, tmp_path)
    best_epoch = checkpoint.read_meta(run / "checkpoints" / "best")["epoch"]
    _truncate(run / "checkpoints" / "last" / name)
    with pytest.raises(CheckpointError, match=rf"last/{name} is damaged .*best \(epoch {best_epoch}\) is intact"):
        dinotune.load(run, checkpoint_name="last", device="cpu")
    _truncate(run / "checkpoints" / "best" / name)
    with pytest.raises(CheckpointError, match=rf"best/{name} is damaged .*other checkpoint is not usable either"):
        dinotune.load(run, device="cpu")


def test_a_truncated_full_backbone_is_named(full_template, tmp_path):
    run = _copy_run(full_template, tmp_path)
    _truncate(run / "checkpoints" / "best" / "backbone.safetensors")
    with pytest.raises(CheckpointError, match=r"best/backbone.safetensors is damaged .*last \(epoch 2\) is intact: "
                                              r"use it instead \(--checkpoint last\)"):
        dinotune.load(run, device="cpu")


def test_a_truncated_meta_is_named(lora_template, tmp_path):
    run = _copy_run(lora_template, tmp_path)
    _truncate(run / "checkpoints" / "last" / "meta.json")
    with pytest.raises(CheckpointError, match=r"last/meta.json is damaged .*best \(epoch \d\) is intact"):
        dinotune.load(run, checkpoint_name="last", device="cpu")


def test_a_truncated_trainer_state_is_named(lora_template, tmp_path):
    run = _copy_run(lora_template, tmp_path)
    _truncate(run / "checkpoints" / "last" / checkpoint.TRAINER_STATE)
    with pytest.raises(CheckpointError, match=r"last/trainer_state.safetensors is damaged .*training cannot "
                                              r"resume; .*best \(epoch \d\) is intact for eval and predict"):
        dinotune.train(resume=run)


# ------------------------------------------------------------- 18. incomplete saved configs
def _cut_config(path: Path) -> None:
    path.write_text(yaml.safe_dump({"task": "classify", "data": {"data": "somewhere"},
                                    "adapter": {"kind": "lora"}}))


def test_a_cut_saved_config_is_refused_naming_the_missing_keys(lora_template, tmp_path):
    run = _copy_run(lora_template, tmp_path)
    best = run / "checkpoints" / "best"
    assert load_run_config(best / "config.yaml").backbone.image_size == 28  # complete as saved
    _cut_config(best / "config.yaml")
    with pytest.raises(ConfigError, match=r"best/config.yaml: this saved config lacks .*backbone.image_size"):
        load_run_config(best / "config.yaml")
    with pytest.raises(ConfigError, match=r"backbone.image_size.*last \(epoch 2\) is intact"):
        checkpoint.read_config(best)
    _cut_config(run / "config.yaml")
    with pytest.raises(ConfigError, match=r"run/config.yaml: this saved config lacks .*backbone.image_size"):
        load_run_config(run / "config.yaml")
    assert "not usable either" in checkpoint._other_note(run / "checkpoints" / "last")  # best is cut


def test_a_user_config_with_few_keys_still_takes_defaults(tmp_path):
    _cut_config(tmp_path / "mine.yaml")
    assert build_config("classify", tmp_path / "mine.yaml").backbone.image_size == ClassifyConfig().backbone.image_size
    assert load_yaml(tmp_path / "mine.yaml").optim.lr == ClassifyConfig().optim.lr


def test_a_saved_config_of_an_older_version_is_complete(tmp_path):
    """Older runs wrote moved keys under their old names, and lack keys added since."""
    data = to_dict(DetectConfig())
    data["model"]["topk"] = data["inference"].pop("top_k")
    for key in ADDED_KEYS:
        section, name = key.split(".")
        data.get(section, {}).pop(name, None)
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(data))
    assert load_run_config(tmp_path / "old.yaml").inference.top_k == DetectConfig().inference.top_k
    del data["backbone"]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"backbone.model, backbone.image_size, backbone.init_seed"):
        load_run_config(tmp_path / "old.yaml")


def test_a_saved_config_without_its_task_is_refused(tmp_path):
    data = to_dict(ClassifyConfig())
    del data["task"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"c.yaml: this saved config lacks the key 'task'"):
        load_run_config(tmp_path / "c.yaml")
    assert json.loads(json.dumps(to_dict(load_yaml(tmp_path / "c.yaml"))))["task"] == "classify"
