"""The engine's optimizer mechanics, observed through real training steps: gradients are cleared
between optimizer steps, AdamW's weight decay spares norms / biases / tokens / position and query
embeddings, the learning rate warms up linearly and then follows the cosine, ``checkpoints/best``
holds the best epoch of the monitored metric (max and min), and gradients are clipped to
``grad_clip`` before each step (and left alone with ``grad_clip=0``).

What the optimizer sees is recorded with torch's global optimizer step pre-hook, so the tests
look at the gradients and learning rates each ``optimizer.step()`` actually uses.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from dinotune.adapters import apply_adapter
from dinotune.backbone import DinoBackbone
from dinotune.config import AdapterConfig, DetectModelConfig, build_config
from dinotune.config.base import OptimConfig
from dinotune.engine import checkpoint
from dinotune.engine.logging import read_metrics
from dinotune.engine.optim import Phase, build_optimizer, set_trainable
from dinotune.tasks.detect.detr import build_detr
from tests.conftest import make_class_folders, make_trainer, tiny_options


# ---------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def record_steps(observe: Callable[[torch.optim.Optimizer], Any]):
    """Calls ``observe(optimizer)`` just before every optimizer step; yields the list of results."""
    seen: list[Any] = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append(observe(opt)))
    try:
        yield seen
    finally:
        handle.remove()


def _params(opt: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    return [p for g in opt.param_groups for p in g["params"]]


def _grad_norm(opt: torch.optim.Optimizer) -> float:
    grads = [p.grad.detach().flatten() for p in _params(opt) if p.grad is not None]
    return float(torch.cat(grads).norm())


def _plain_folder(tmp_path: Path, n_per_class: int = 2) -> Path:
    """``<class>/*`` only: no val split (and the default val_fraction 0 holds none out)."""
    return make_class_folders(tmp_path / "plain", ["red", "blue"], n_per_class, size=28, seed=5)


def _trainer(data: Path, run: Path, **opts):
    cfg = build_config("classify", data=str(data), **tiny_options(run, **opts))
    return make_trainer(cfg, run)


class _WrappedTask:
    """A task that delegates to the real one; subclasses change what a step or evaluation returns."""

    def __init__(self, task):
        self.task = task
        self.monitor, self.monitor_mode = task.monitor, task.monitor_mode

    def training_step(self, bundle, model, batch):
        return self.task.training_step(bundle, model, batch)

    def evaluate(self, *args, **kwargs):
        return self.task.evaluate(*args, **kwargs)


# --------------------------------------------------------------------- 4. gradients cleared
class _FixedGradient(_WrappedTask):
    """Every micro-batch's loss has the same known gradient ``coef`` on one head weight (and zero
    on everything else), so each optimizer step must see exactly ``coef``."""

    def __init__(self, task, param: torch.nn.Parameter):
        super().__init__(task)
        self.param = param
        self.coef = torch.linspace(-1.0, 1.0, param.numel()).view_as(param)

    def training_step(self, bundle, model, batch):
        out = self.task.training_step(bundle, model, batch)
        out["loss"] = out["loss"] * 0.0 + (self.param * self.coef).sum()
        return out


@pytest.mark.parametrize("batch_size,accumulate", [(2, 1), (1, 2)])
def test_each_optimizer_step_sees_only_its_own_gradients(tmp_path, batch_size, accumulate):
    trainer = _trainer(_plain_folder(tmp_path), tmp_path / "run", epochs=2, batch_size=batch_size,
                       accumulate=accumulate, adapter="none", grad_clip=0.0, augment=False)
    weight = next(p for p in trainer.model.head.parameters() if p.ndim == 2)
    task = trainer.task = _FixedGradient(trainer.task, weight)
    with record_steps(lambda opt: weight.grad.detach().clone()) as grads:
        trainer.fit()
    assert len(grads) == 4  # 4 images: 2 optimizer steps per epoch, 2 epochs
    for step, g in enumerate(grads):
        # not cleared after a step, the second step of an epoch would see 2 * coef
        torch.testing.assert_close(g, task.coef, msg=lambda m, s=step: f"optimizer step {s}: {m}")


# -------------------------------------------------------------------------- 5. weight decay
def test_adamw_decays_weights_but_not_norms_biases_tokens_or_embeddings():
    """One AdamW step with all-zero gradients: the Adam update is 0, so a decayed parameter is
    multiplied by exactly ``1 - lr * wd`` and an exempt one must not move at all."""
    backbone = DinoBackbone.from_spec("random:tiny-reg4")
    adapter = AdapterConfig(kind="full")
    apply_adapter(backbone, adapter)
    torch.manual_seed(0)
    model = build_detr(backbone, 3, DetectModelConfig(num_queries=5, decoder_layers=1, hidden_dim=32,
                                                       num_heads=2, ffn_dim=64, sampling_points=2,
                                                       pyramid_scales=[2.0, 1.0]))
    phase = Phase("train", 1, True, lr=0.5, backbone_lr=0.25)
    wd = 0.2
    set_trainable(model, adapter, phase)
    optimizer = build_optimizer(model, adapter, OptimConfig(weight_decay=wd), phase)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in _params(optimizer)} == {id(p) for p in trainable.values()}

    with torch.no_grad():  # no zeros (biases start at 0, where decay would not show)
        for p in trainable.values():
            p.uniform_(0.5, 1.5)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    for p in trainable.values():
        p.grad = torch.zeros_like(p)
    optimizer.step()

    tokens = ("cls_token", "mask_token", "register_tokens", "position_embeddings")
    declared_head = {"head.query_embed.weight", "head.level_embed"}

    def exempt(name: str, p: torch.Tensor) -> bool:
        return p.ndim <= 1 or name.rsplit(".", 1)[-1] in tokens or name in declared_head

    unchanged = {n for n, p in trainable.items() if exempt(n, p)}
    shrunk = set(trainable) - unchanged
    moved = sorted(n for n in unchanged if not torch.equal(trainable[n].detach(), before[n]))
    assert not moved, f"weight decay applied to parameters exempt from it: {moved}"
    lr = {n: phase.backbone_lr if n.startswith("backbone.") else phase.lr for n in shrunk}
    wrong = sorted(n for n in shrunk if not torch.allclose(trainable[n].detach(), before[n] * (1 - lr[n] * wd),
                                                           rtol=1e-6, atol=0))
    assert not wrong, f"not shrunk by exactly lr * weight_decay: {wrong}"

    def has(names: set[str], suffix: str) -> bool:
        return any(n.endswith(suffix) for n in names)

    # the cases that matter are all present in this model
    for suffix in ("embeddings.cls_token", "embeddings.position_embeddings", "embeddings.register_tokens",
                   "layer.0.norm1.weight", "layer.0.attention.q_proj.bias", "layer.0.layer_scale1.lambda1",
                   "head.query_embed.weight", "head.level_embed"):
        assert has(unchanged, suffix), suffix
    for suffix in ("layer.0.attention.q_proj.weight", "patch_embeddings.projection.weight",
                   "head.reference_points.weight"):
        assert has(shrunk, suffix), suffix


# ------------------------------------------------------------------------------ 6. warm-up
def test_lr_warms_up_linearly_then_follows_cosine_during_training(tmp_path):
    # 4 images, batch 2: 2 optimizer steps per epoch; 4 epochs = 8 steps, 1.5 epochs = 3 warm-up steps
    lr, backbone_lr, floor = 1e-2, 4e-3, 0.1
    trainer = _trainer(_plain_folder(tmp_path), tmp_path / "run", epochs=4, batch_size=2, adapter="lora", lr=lr,
                       backbone_lr=backbone_lr, warmup_epochs=1.5, schedule="cosine", min_lr_ratio=floor,
                       augment=False)
    with record_steps(lambda opt: {g["name"]: g["lr"] for g in opt.param_groups}) as seen:
        trainer.fit()
    total, warmup = 8, 3

    def factor(step: int) -> float:
        if step < warmup:  # linear: 1/4, 2/4, 3/4, then the peak at step 3
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / (total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    assert len(seen) == total
    for group, base in (("head", lr), ("backbone", backbone_lr)):
        got = [s[group] for s in seen]
        assert got == pytest.approx([base * factor(k) for k in range(total)], rel=1e-9), f"{group} lr per step"
        # warm-up: starts well below the peak and rises in equal increments up to it
        steps = [b - a for a, b in zip(got[:warmup + 1], got[1:warmup + 1])]
        assert got[0] == pytest.approx(base / (warmup + 1)) and steps == pytest.approx([steps[0]] * warmup)
        assert max(got) == pytest.approx(base) and got.index(max(got)) == warmup
    # the epoch records log the learning rate after the epoch's last scheduler step
    history = read_metrics(tmp_path / "run")
    assert [r["lr/head"] for r in history] == pytest.approx([lr * factor(2 * (e + 1)) for e in range(4)])


# ------------------------------------------------------------------------ 7. best checkpoint
class _ScriptedVal(_WrappedTask):
    """``evaluate`` returns the next value of a scripted monitored-metric sequence."""

    def __init__(self, task, values):
        super().__init__(task)
        self.values = list(values)

    def evaluate(self, *args, **kwargs):
        return {self.monitor: self.values.pop(0), "loss": 1.0}


class _ScriptedTrainLoss(_WrappedTask):
    """Every training step of epoch ``e`` reports the loss ``values[e]`` (with zero gradients)."""

    def __init__(self, task, values, steps_per_epoch):
        super().__init__(task)
        self.values, self.steps_per_epoch, self.calls = list(values), steps_per_epoch, 0

    def training_step(self, bundle, model, batch):
        out = self.task.training_step(bundle, model, batch)
        out["loss"] = out["loss"] * 0.0 + self.values[self.calls // self.steps_per_epoch]
        self.calls += 1
        return out


def test_best_checkpoint_is_the_epoch_with_the_highest_val_metric(tiny_folder, tmp_path):
    trainer = _trainer(tiny_folder, tmp_path / "run", epochs=4, adapter="none")
    assert trainer.task.monitor_mode == "max"
    trainer.task = _ScriptedVal(trainer.task, [0.3, 0.8, 0.5, 0.7])
    result = trainer.fit()
    history = read_metrics(tmp_path / "run")
    key = f"val/{trainer.task.monitor}"
    assert [r[key] for r in history] == [0.3, 0.8, 0.5, 0.7]
    best_epoch = max(history, key=lambda r: r[key])["epoch"]
    assert best_epoch == 2
    meta = checkpoint.read_meta(tmp_path / "run" / "checkpoints" / "best")
    assert (meta["epoch"], meta["metrics"][key]) == (2, 0.8), \
        f"checkpoints/best holds epoch {meta['epoch']} ({key} {meta['metrics'][key]}); the best is epoch 2 (0.8)"
    assert json.loads((tmp_path / "run" / "best_metrics.json").read_text())["epoch"] == 2
    assert result["best"]["epoch"] == 2 and result["last"]["epoch"] == 4


def test_best_checkpoint_without_val_set_is_the_lowest_train_loss(tmp_path):
    trainer = _trainer(_plain_folder(tmp_path), tmp_path / "run", epochs=4, adapter="none", batch_size=2)
    assert trainer.val_loader is None
    trainer.task = _ScriptedTrainLoss(trainer.task, [2.0, 0.5, 1.5, 1.0], len(trainer.train_loader))
    result = trainer.fit()
    history = read_metrics(tmp_path / "run")
    assert [r["train/loss"] for r in history] == pytest.approx([2.0, 0.5, 1.5, 1.0])
    assert min(history, key=lambda r: r["train/loss"])["epoch"] == 2
    meta = checkpoint.read_meta(tmp_path / "run" / "checkpoints" / "best")
    assert meta["epoch"] == 2 and meta["metrics"]["train/loss"] == pytest.approx(0.5), \
        f"checkpoints/best holds epoch {meta['epoch']} (train/loss {meta['metrics']['train/loss']}); the lowest is epoch 2"
    assert result["best"]["epoch"] == 2


# ---------------------------------------------------------------------------- 8. grad clip
class _HugeLoss(_WrappedTask):
    def training_step(self, bundle, model, batch):
        out = self.task.training_step(bundle, model, batch)
        out["loss"] = out["loss"] * 1e4
        return out


def _step_grad_norms(tmp_path: Path, name: str, grad_clip: float) -> list[float]:
    trainer = _trainer(_plain_folder(tmp_path), tmp_path / name, epochs=1, batch_size=2, grad_clip=grad_clip,
                       augment=False)
    trainer.task = _HugeLoss(trainer.task)
    with record_steps(_grad_norm) as norms:
        trainer.fit()
    assert len(norms) == 2
    return norms


def test_gradients_are_clipped_to_grad_clip_before_each_step(tmp_path):
    clip = 0.5
    raw = _step_grad_norms(tmp_path, "raw", grad_clip=0.0)
    clipped = _step_grad_norms(tmp_path, "clipped", grad_clip=clip)
    assert all(n > 10 * clip for n in raw), raw  # with grad_clip 0 the optimizer sees the raw gradient
    for n in clipped:
        assert n <= clip + 1e-6, f"the optimizer stepped with gradient norm {n} > grad_clip {clip}"
    # same seed, same first batch: the first step's gradient is the raw one scaled down to the clip
    assert clipped[0] == pytest.approx(clip, rel=1e-4)
