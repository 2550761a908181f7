"""Bad arguments and failed starts: every numeric option has a range, checked in one place (the
config), so the CLI, the API and config files refuse an out-of-range value with one line naming the
flag and the range before any work; ``--out`` that cannot hold a run, ``--resume`` with options
it cannot honour, a start that fails before training, two processes on one run folder, and
training data that changed under a resumed run."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import dinotune
from dinotune.cli import main
from dinotune.cli.entry import _one_line
from dinotune.config import TASK_CONFIGS, ConfigError, build_config, flag_map, leaf_fields, save_yaml
from dinotune.engine.run_folder import RunFolder
from dinotune.errors import CheckpointError, DataError
from tests.conftest import make_class_folders, make_trainer, tiny_options

# numeric fields that take any finite value (block indices count from the end when negative; a band's
# mean is in the data's own units, negative for some float data)
UNBOUNDED = {"model.fpn_layers", "bands.mean"}


def _numeric_fields(cls):
    for key, f, tp in leaf_fields(cls):
        inner = getattr(tp, "__args__", (tp,))[0] if getattr(tp, "__origin__", None) is list else tp
        if inner in (int, float) and key not in UNBOUNDED:
            yield key, f, inner


def _outside(meta, tp):
    """Values just outside each declared bound (and NaN for floats)."""
    step = 1 if tp is int else 0.5
    out = []
    if meta.get("ge") is not None:
        out.append(meta["ge"] - step)
    if meta.get("gt") is not None:
        out.append(meta["gt"] if tp is float else int(meta["gt"]))
    if meta.get("le") is not None:
        out.append(meta["le"] + step)
    if meta.get("lt") is not None:
        out.append(meta["lt"])
    if tp is float:
        out.append(math.nan)
    return [tp(v) if not (isinstance(v, float) and math.isnan(v)) else v for v in out]


@pytest.mark.parametrize("task", list(TASK_CONFIGS))
def test_every_numeric_option_has_a_range_and_refuses_values_outside_it(task):
    cls = TASK_CONFIGS[task]
    flags = {k: f for f, k in flag_map(cls).items()}
    for key, f, tp in _numeric_fields(cls):
        assert any(f.metadata.get(b) is not None for b in ("ge", "gt", "le", "lt")), f"{key} declares no range"
        for value in _outside(f.metadata, tp):
            cfg = build_config(task)
            section, name = key.split(".")
            current = getattr(getattr(cfg, section), name)
            setattr(getattr(cfg, section), name, [value] if isinstance(current, list) else value)
            with pytest.raises(ConfigError) as e:
                cfg.validate()
            assert str(e.value).startswith(f"{flags[key]} ") and f"({key})" in str(e.value), (key, value, e.value)


@pytest.mark.parametrize("argv,expect", [
    (["--lr", "-1"], "--lr -1.0: must be > 0"), (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
    (["--lora-dropout", "2"], "--lora-dropout 2.0: must be in [0, 1)"),
    (["--label-smoothing", "2"], "--label-smoothing 2.0: must be in [0, 1)"),
    (["--workers", "-1"], "--workers -1: must be >= 0"), (["--backbone-lr", "-1"], "--backbone-lr -1.0: must be >= 0"),
    (["--weight-decay", "-1"], "--weight-decay -1.0: must be >= 0"), (["--grad-clip", "-1"], "--grad-clip -1.0"),
    (["--alpha", "-5"], "--alpha -5.0: must be > 0"), (["--warmup-epochs", "-1"], "--warmup-epochs -1.0"),
])
def test_cli_refuses_bad_numbers_in_one_line_before_any_work(argv, expect, tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "classify", "--data", str(tiny_folder), "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"dinotune: error: {err.strip().split('error: ', 1)[1]}"] and expect in err
    assert not out.exists()


def test_out_that_is_a_file_or_not_writable(tiny_folder, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "taken.txt"
    a_file.write_text("x")
    assert main(["train", "classify", "--data", str(tiny_folder), "--out", str(a_file)]) == 2
    assert f"--out {a_file} is a file, not a folder" in capsys.readouterr().err
    import dinotune.engine.run_folder as rf

    monkeypatch.setattr(rf.os, "access", lambda path, mode: False)  # tests run as root: pretend
    out = tmp_path / "locked" / "run"
    assert main(["train", "classify", "--data", str(tiny_folder), "--out", str(out)]) == 2
    assert "is not writable (permission denied)" in capsys.readouterr().err and not out.exists()


def test_resume_takes_only_where_it_runs(tiny_folder, tmp_path, capsys):
    run = dinotune.train(task="classify", data=str(tiny_folder), **tiny_options(tmp_path / "run", epochs=1))["run_dir"]
    assert main(["train", "--resume", run, "--data", "X", "--lr", "1"]) == 2
    err = capsys.readouterr().err
    assert "--resume continues a run with its own saved settings" in err and "--data X --lr 1" in err
    with pytest.raises(ConfigError, match="takes only device, workers, threads, progress, not lr"):
        dinotune.train(resume=run, lr=1.0)
    assert main(["train", "--resume", run, "--device", "cpu", "--workers", "0", "--no-progress"]) == 0
    assert "all 1 epochs are done already" in capsys.readouterr().err


def test_a_failed_start_leaves_no_folder_behind(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("path,label\n")  # no rows: refused while reading the data, after the folder was claimed
    make_class_folders(tmp_path / "val", ["red", "blue"], 1)
    opts = tiny_options(tmp_path / "out", epochs=1)
    with pytest.raises(DataError):
        dinotune.train(task="classify", data=str(csv), val_data=str(tmp_path / "val"), **opts)
    assert not (tmp_path / "out").exists()
    make_class_folders(tmp_path / "ok", ["red", "blue"], 2)
    result = dinotune.train(task="classify", data=str(tmp_path / "ok"), val_data=str(tmp_path / "val"), **opts)
    assert Path(result["run_dir"]) == tmp_path / "out"  # not out-2


def _interrupted_run(data: Path, run: Path, epochs: int) -> Path:
    """A run folder as a process killed after its first epoch leaves it."""
    cfg = build_config("classify", data=str(data), **tiny_options(run, epochs=epochs))
    trainer = make_trainer(cfg, run)
    save_yaml(cfg, run / "config.yaml")
    trainer.stop_after_epoch = 1
    trainer.fit()
    return run


def test_one_process_at_a_time_in_a_run_folder(tiny_folder, tmp_path):
    run = _interrupted_run(tiny_folder, tmp_path / "run", epochs=2)
    holder = RunFolder.reopen(run)  # another process training in it, as far as the lock can tell
    try:
        with pytest.raises(CheckpointError, match=r"is in use by process \d+ on .* wait for it to finish"):
            dinotune.train(resume=str(run))
    finally:
        holder.release()
    result = dinotune.train(resume=str(run))  # a released lock (or a dead holder) is no obstacle
    assert result["last"]["epoch"] == 2


def test_resume_warns_when_the_training_data_changed(tiny_folder, tmp_path, capsys):
    for name, touch in (("same", False), ("changed", True)):
        run = _interrupted_run(tiny_folder, tmp_path / name, epochs=2)
        if touch:  # one training image rewritten: other bytes or another time is another file
            image = next((tiny_folder / "train" / "red").iterdir())
            os.utime(image, (1, 1))
        capsys.readouterr()
        dinotune.train(resume=str(run))
        assert ("the training data changed since" in capsys.readouterr().err) is touch


class _FailsInAWorker(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        if i == 2:
            raise DataError("masks/b.png: label values 77 are outside 0..2")
        return torch.zeros(1)


def test_errors_from_dataloader_workers_read_as_one_line():
    with pytest.raises(DataError) as e:
        list(DataLoader(_FailsInAWorker(), batch_size=1, num_workers=1))
    assert "Original Traceback" in str(e.value)  # what torch hands over
    assert _one_line(e.value) == "masks/b.png: label values 77 are outside 0..2"
    assert _one_line(DataError("plain message")) == "plain message"
