"""The engine: a tiny set is overfit, resume is exact, two-stage freezes then unfreezes,
accumulation equals a large batch, a non-finite loss stops cleanly, checkpoints are atomic."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import dinotune
from dinotune.config import build_config
from dinotune.data.loader import make_loader
from dinotune.engine import NonFiniteLossError, checkpoint
from dinotune.engine.logging import read_metrics
from dinotune.engine.optim import build_phases
from tests.conftest import make_class_folders, make_trainer, tiny_options


_setup = make_trainer


def test_overfits_tiny_set(tmp_path):
    data = make_class_folders(tmp_path / "d", ["red", "green", "blue", "yellow"], 3, size=28, seed=3)
    result = dinotune.train(task="classify", data=str(data), val_data=str(data),
                            **tiny_options(tmp_path / "run", adapter="full", epochs=25, lr=3e-3,
                                           backbone_lr=1e-3, augment=False, batch_size=4,
                                           warmup_epochs=0, weight_decay=0.0))
    history = read_metrics(Path(result["run_dir"]))
    losses = [r["train/loss"] for r in history]
    assert losses[-1] < 0.25 * losses[0], losses
    assert history[-1]["val/top1"] == 1.0  # val_data is the training set itself: 100% train accuracy


def test_resume_reproduces_uninterrupted_run(tiny_folder, tmp_path):
    opts = tiny_options(tmp_path / "a", adapter="lora", epochs=3, backbone_lr=1e-2, workers=0,
                        lora_dropout=0.1, head_dropout=0.2)  # dropout: RNG state must be restored too
    cfg_a = build_config("classify", data=str(tiny_folder), **opts)
    full = _setup(cfg_a, tmp_path / "a")
    full.fit()

    cfg_b = build_config("classify", data=str(tiny_folder), **{**opts, "out": str(tmp_path / "b")})
    interrupted = _setup(cfg_b, tmp_path / "b")
    interrupted.stop_after_epoch = 2
    interrupted.fit()
    steps_per_epoch = len(interrupted.train_loader)
    assert len(interrupted.step_losses) == 2 * steps_per_epoch

    resumed = _setup(cfg_b, tmp_path / "b")
    resumed.fit(resume=True)
    # the first step after resuming, and every one after it, equals the uninterrupted run's
    assert resumed.step_losses[0] == pytest.approx(full.step_losses[2 * steps_per_epoch], rel=1e-6)
    assert resumed.step_losses == pytest.approx(full.step_losses[2 * steps_per_epoch:], rel=1e-6)
    a_hist, b_hist = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["epoch"] for r in b_hist] == [1, 2, 3]
    assert b_hist[-1]["val/loss"] == pytest.approx(a_hist[-1]["val/loss"], rel=1e-6)


def test_resume_through_the_api_after_an_interruption(tiny_folder, tmp_path):
    cfg = build_config("classify", data=str(tiny_folder), **tiny_options(tmp_path / "r", epochs=2))
    t = _setup(cfg, tmp_path / "r")
    t.stop_after_epoch = 1
    t.fit()
    from dinotune.config import save_yaml

    save_yaml(cfg, tmp_path / "r" / "config.yaml")
    result = dinotune.train(resume=tmp_path / "r")
    assert result["last"]["epoch"] == 2
    assert [r["epoch"] for r in read_metrics(tmp_path / "r")] == [1, 2]


def test_two_stage_freezes_then_unfreezes(tiny_folder, tmp_path):
    cfg = build_config("classify", data=str(tiny_folder),
                       **tiny_options(tmp_path / "r", adapter="lora", two_stage=True, stage1_epochs=2,
                                      stage2_epochs=1, stage1_lr=1e-3, stage2_lr=1e-5))
    phases = build_phases(cfg.train, cfg.optim, cfg.adapter)
    assert [(p.name, p.epochs, p.train_backbone, p.lr) for p in phases] == [
        ("stage1", 2, False, 1e-3), ("stage2", 1, True, 1e-5)]
    trainer = _setup(cfg, tmp_path / "r")

    def lora_b():
        return {n: p.detach().clone() for n, p in trainer.model.backbone.named_parameters() if "lora_B" in n}

    start = lora_b()
    trainer.stop_after_epoch = 2
    trainer.fit()
    after_stage1 = lora_b()
    assert all(torch.equal(start[n], after_stage1[n]) for n in start), "stage 1 must not touch adapters"
    trainer2 = _setup(cfg, tmp_path / "r")
    trainer2.fit(resume=True)
    after_stage2 = {n: p for n, p in trainer2.model.backbone.named_parameters() if "lora_B" in n}
    assert any(not torch.equal(start[n], after_stage2[n]) for n in start), "stage 2 must train adapters"
    history = read_metrics(tmp_path / "r")
    assert [r["phase"] for r in history] == ["stage1", "stage1", "stage2"]
    assert "lr/backbone" not in history[0] and history[2]["lr/backbone"] <= 1e-5
    assert history[0]["lr/head"] <= 1e-3


def test_accumulation_equals_large_batch(tiny_folder, tmp_path):
    def one_epoch(batch_size: int, accumulate: int, out: str):
        cfg = build_config("classify", data=str(tiny_folder),
                           **tiny_options(tmp_path / out, adapter="lora", epochs=1, batch_size=batch_size,
                                          accumulate=accumulate, augment=False, backbone_lr=1e-2,
                                          warmup_epochs=0, schedule="constant", grad_clip=0.0))
        t = _setup(cfg, tmp_path / out)
        # identical data order for both: one fixed permutation
        t.train_loader = make_loader(t.train_loader.dataset, batch_size, shuffle=False, workers=0)
        t.fit()
        return {n: p.detach() for n, p in t.model.named_parameters() if p.requires_grad}

    big = one_epoch(4, 1, "big")
    small = one_epoch(2, 2, "small")
    for n in big:
        torch.testing.assert_close(big[n], small[n], atol=2e-5, rtol=1e-4, msg=f"{n} differs")


class _NanAfter:
    """Wraps a task so that the loss turns NaN from the given epoch on."""

    def __init__(self, task, trainer_ref, epoch):
        self.task, self.ref, self.epoch = task, trainer_ref, epoch
        self.monitor, self.monitor_mode = task.monitor, task.monitor_mode
        self.calls = 0

    def training_step(self, bundle, model, batch):
        out = self.task.training_step(bundle, model, batch)
        self.calls += 1
        if self.calls > self.epoch * len(self.ref[0].train_loader):
            out["loss"] = out["loss"] * float("nan")
        return out

    def evaluate(self, *args, **kwargs):
        return self.task.evaluate(*args, **kwargs)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_folder, tmp_path):
    cfg = build_config("classify", data=str(tiny_folder), **tiny_options(tmp_path / "r", epochs=3))
    trainer = _setup(cfg, tmp_path / "r")
    trainer.task = _NanAfter(trainer.task, [trainer], epoch=1)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2.*checkpoints/last"):
        trainer.fit()
    meta = checkpoint.read_meta(tmp_path / "r" / "checkpoints" / "last")
    assert meta["epoch"] == 1
    assert math.isfinite(meta["metrics"]["train/loss"])


def test_checkpoint_swap_is_atomic(tiny_folder, tmp_path):
    cfg = build_config("classify", data=str(tiny_folder), **tiny_options(tmp_path / "r", epochs=1))
    trainer = _setup(cfg, tmp_path / "r")
    trainer.fit()
    last = tmp_path / "r" / "checkpoints" / "last"
    meta = checkpoint.read_meta(last)
    # a crash between "old folder moved aside" and "new folder moved in" leaves only .last.old
    last.rename(last.with_name(".last.old"))
    assert checkpoint.resolve(last) == last.with_name(".last.old")
    assert checkpoint.read_meta(last) == meta
    # and a later save replaces both cleanly
    checkpoint.save(last, trainer.model, cfg, {**meta, "epoch": 9})
    assert checkpoint.read_meta(last)["epoch"] == 9
    assert not any(p.name.startswith(".last") for p in last.parent.iterdir())


def test_run_folder_contents(tiny_folder, tmp_path):
    result = dinotune.train(task="classify", data=str(tiny_folder), **tiny_options(tmp_path / "r", epochs=2))
    run = Path(result["run_dir"])
    cfg = dinotune.build_config("classify", run / "config.yaml")
    assert cfg.train.epochs == 2 and cfg.backbone.model == "random:tiny"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and {"train/loss", "val/top1", "val/loss"} <= json.loads(lines[0]).keys()
    assert any((run / "tb").iterdir())
    assert (run / "checkpoints" / "last" / "trainer_state.safetensors").is_file()
    assert not (run / "checkpoints" / "best" / "trainer_state.safetensors").exists()
    # a second run with the same --out goes next to it instead of overwriting it
    again = dinotune.train(task="classify", data=str(tiny_folder), **tiny_options(tmp_path / "r", epochs=1))
    assert Path(again["run_dir"]) == tmp_path / "r-2"
