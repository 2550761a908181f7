"""Engine training features: the EMA of the weights (its maths, exact swap in and out, ``best``
taking the EMA weights when they score higher, exact resume), early stopping (the epoch it stops
at, ``min_delta``, its counter through a resume, a stopped run staying stopped) and layer-wise
learning-rate decay (groups and rates on DINOv2 and DINOv3, full and LoRA / DoRA)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from dinotune.adapters import apply_adapter, trainable_backbone_parameters
from dinotune.backbone import DinoBackbone
from dinotune.config import AdapterConfig, build_config
from dinotune.config.base import OptimConfig
from dinotune.engine import checkpoint
from dinotune.engine.ema import ModelEma, tracked_parameters
from dinotune.engine.logging import read_metrics
from dinotune.engine.monitor import EarlyStopping, Monitor
from dinotune.engine.optim import Phase, build_optimizer, build_scheduler, logged_lrs, set_trainable
from tests.conftest import make_trainer, tiny_options

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def loud():
    """Progress messages on (the test session runs quiet), for tests that read them."""
    from dinotune import utils

    before = utils._QUIET
    utils.set_quiet(False)
    yield
    utils.set_quiet(before)


class _Scripted:
    """Delegates training to the real task; ``evaluate`` returns the next scripted value of the
    monitored metric, and keeps a copy of the tracked weights it was called with."""

    def __init__(self, task, values, model, adapter):
        self.task, self.values, self.model, self.adapter = task, list(values), model, adapter
        self.monitor, self.monitor_mode = task.monitor, task.monitor_mode
        self.seen: list[dict[str, torch.Tensor]] = []

    def training_step(self, bundle, model, batch):
        return self.task.training_step(bundle, model, batch)

    def evaluate(self, *args, **kwargs):
        self.seen.append({k: p.detach().clone() for k, p in tracked_parameters(self.model, self.adapter).items()})
        return {self.monitor: self.values.pop(0), "loss": 1.0}


def _trainer(data: Path, run: Path, **opts):
    cfg = build_config("classify", data=str(data), **tiny_options(run, **opts))
    return make_trainer(cfg, run)


def _script(trainer, values):
    trainer.task = _Scripted(trainer.task, values, trainer.model, trainer.cfg.adapter)
    return trainer.task


# ------------------------------------------------------------------------------------ EMA
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Linear(2, 1, bias=False)
        self.backbone = nn.BatchNorm1d(2)  # a trainable weight / bias and running-stat buffers


def test_ema_follows_the_hand_computed_average():
    model = _Tiny()
    with torch.no_grad():
        model.head.weight.fill_(0.0)
    ema = ModelEma(model, AdapterConfig(kind="full"), decay=0.15)
    assert set(ema.shadow) == {"head.weight", "backbone.weight", "backbone.bias"}  # parameters, not buffers
    for value in (10.0, 20.0, 40.0):  # the weight after each optimizer step
        with torch.no_grad():
            model.head.weight.fill_(value)
        ema.update()
    # d_0 = min(0.15, 1/10) = 0.1: 0.1 * 0 + 0.9 * 10 = 9
    # d_1 = min(0.15, 2/11) = 0.15: 0.15 * 9 + 0.85 * 20 = 18.35
    # d_2 = min(0.15, 3/12) = 0.15: 0.15 * 18.35 + 0.85 * 40 = 36.7525
    torch.testing.assert_close(ema.shadow["head.weight"], torch.full((1, 2), 36.7525), rtol=1e-6, atol=0)
    torch.testing.assert_close(ema.shadow["backbone.weight"], torch.ones(2))  # unchanged weights average to themselves
    assert ema.updates == 3


def test_ema_swap_restores_the_raw_weights_exactly_and_round_trips_through_the_trainer_state(tmp_path):
    torch.manual_seed(0)
    model = _Tiny()
    ema = ModelEma(model, AdapterConfig(kind="full"), decay=0.9)
    for _ in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) / 3)  # values that do not round-trip through a sum
        ema.update()
    raw = {k: p.detach().clone() for k, p in ema.params.items()}
    with ema.swapped():
        for k, p in ema.params.items():
            assert torch.equal(p, ema.shadow[k]) and not torch.equal(p, raw[k]), k
    assert all(torch.equal(p, raw[k]) for k, p in ema.params.items())
    with pytest.raises(RuntimeError), ema.swapped():
        raise RuntimeError("an evaluation failed")
    assert all(torch.equal(p, raw[k]) for k, p in ema.params.items()), "a failed evaluation must restore too"

    # through the trainer state's file (safetensors, no pickle), as --resume reads it
    state = {"epoch": 1, "phase": 0, "global_step": 3, "best": None, "optimizer": {}, "scheduler": {}, "rng": {},
             "ema": ema.state_dict()}
    checkpoint.write_trainer_state(tmp_path / "state.safetensors", state)
    other = ModelEma(_Tiny(), AdapterConfig(kind="full"), decay=0.9)
    other.load_state_dict(checkpoint.read_trainer_state(tmp_path / "state.safetensors")["ema"])
    assert other.updates == 3 and all(torch.equal(other.shadow[k], v) for k, v in ema.shadow.items())


def test_best_keeps_the_ema_weights_when_they_score_higher(tiny_folder, tmp_path, capsys, loud):
    trainer = _trainer(tiny_folder, tmp_path / "run", epochs=3, adapter="lora", ema=0.9, lr=1e-2, backbone_lr=1e-2)
    # each evaluation epoch evaluates the raw weights, then the EMA's: epoch 2's EMA scores highest
    task = _script(trainer, [0.5, 0.4, 0.6, 0.9, 0.7, 0.8])
    result = trainer.fit()
    key = f"val/{task.monitor}"
    history = read_metrics(tmp_path / "run")
    assert [(r[key], r[f"val_ema/{task.monitor}"]) for r in history] == [(0.5, 0.4), (0.6, 0.9), (0.7, 0.8)]
    best = tmp_path / "run" / "checkpoints" / "best"
    meta = checkpoint.read_meta(best)
    assert (meta["epoch"], meta["weights"]) == (2, "ema")
    assert checkpoint.read_meta(tmp_path / "run" / "checkpoints" / "last")["weights"] == "raw"
    assert result["best"]["epoch"] == 2 and result["best"]["weights"] == "ema"
    assert json.loads((tmp_path / "run" / "best_metrics.json").read_text())["weights"] == "ema"
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith("epoch 2/3") and "(best, ema weights)" in line for line in lines), lines
    assert any(line.startswith("epoch 1/3") and "(best, raw weights)" in line for line in lines), lines

    raw_2, ema_2, raw_3 = task.seen[2], task.seen[3], task.seen[4]
    assert any(not torch.equal(raw_2[k], ema_2[k]) for k in raw_2), "the average must differ from the raw weights"
    assert any("lora_" in k and not torch.equal(raw_2[k], ema_2[k]) for k in raw_2), "the adapters are averaged"
    checkpoint.load_weights(best, trainer.model, trainer.cfg.adapter)  # best holds the EMA of epoch 2
    assert all(torch.equal(p, ema_2[k]) for k, p in tracked_parameters(trainer.model, trainer.cfg.adapter).items())
    checkpoint.load_weights(tmp_path / "run" / "checkpoints" / "last", trainer.model, trainer.cfg.adapter)
    assert all(torch.equal(p, raw_3[k]) for k, p in tracked_parameters(trainer.model, trainer.cfg.adapter).items())


def test_ema_resume_reproduces_the_uninterrupted_run(tiny_folder, tmp_path):
    opts = tiny_options(tmp_path / "a", adapter="lora", epochs=3, backbone_lr=1e-2, ema=0.8)
    full = make_trainer(build_config("classify", data=str(tiny_folder), **opts), tmp_path / "a")
    full.fit()
    cfg_b = build_config("classify", data=str(tiny_folder), **{**opts, "out": str(tmp_path / "b")})
    interrupted = make_trainer(cfg_b, tmp_path / "b")
    interrupted.stop_after_epoch = 2
    interrupted.fit()
    resumed = make_trainer(cfg_b, tmp_path / "b")
    resumed.fit(resume=True)
    assert resumed.ema.updates == full.ema.updates == 3 * len(full.train_loader)
    for k, v in full.ema.shadow.items():
        torch.testing.assert_close(resumed.ema.shadow[k], v, rtol=1e-6, atol=1e-9, msg=lambda m, k=k: f"{k}: {m}")
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["epoch"] for r in b] == [1, 2, 3]
    assert b[-1]["val_ema/loss"] == pytest.approx(a[-1]["val_ema/loss"], rel=1e-6)
    assert b[-1]["val_ema/loss"] != pytest.approx(b[-1]["val/loss"], rel=1e-6)  # a different set of weights


# ------------------------------------------------------------------------------ early stopping
def test_early_stopping_stops_after_patience_evaluations_without_improvement(tiny_folder, tmp_path, capsys, loud):
    trainer = _trainer(tiny_folder, tmp_path / "run", epochs=8, adapter="none", patience=2)
    _script(trainer, [0.5, 0.6, 0.6, 0.55, 0.9, 0.9, 0.9, 0.9])  # 0.6 is not beaten at epochs 3 and 4
    result = trainer.fit()
    assert [r["epoch"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4]
    assert result["stopped_early"]["epoch"] == 4 and result["last"]["epoch"] == 4 and result["best"]["epoch"] == 2
    err = capsys.readouterr().err
    assert re.search(r"stopped early after epoch 4/8: val/\w+ has not improved for 2 evaluations .*"
                     r"the best epoch, 2 \(0\.6000\)", err), err


def test_early_stopping_counts_only_improvements_larger_than_min_delta(tiny_folder, tmp_path):
    trainer = _trainer(tiny_folder, tmp_path / "run", epochs=8, adapter="none", patience=2, min_delta=0.05)
    # every epoch beats the one before, but only epoch 3 by more than 0.05 (over 0.5)
    _script(trainer, [0.5, 0.52, 0.6, 0.61, 0.62, 0.9, 0.9, 0.9])
    result = trainer.fit()
    assert result["stopped_early"]["epoch"] == 5 and result["stopped_early"]["last_improvement_epoch"] == 3
    assert result["best"]["epoch"] == 5  # best still takes any improvement: the checkpoint is epoch 5's


def test_early_stopping_counter_survives_resume_and_a_stopped_run_stays_stopped(tiny_folder, tmp_path, capsys,
                                                                              loud):
    run = tmp_path / "run"
    trainer = _trainer(tiny_folder, run, epochs=8, adapter="none", patience=2)
    _script(trainer, [0.5, 0.6, 0.6])
    trainer.stop_after_epoch = 3  # interrupted with one evaluation without improvement counted
    trainer.fit()
    resumed = make_trainer(trainer.cfg, run)
    _script(resumed, [0.55, 0.9, 0.9, 0.9, 0.9])
    result = resumed.fit(resume=True)
    assert result["stopped_early"]["epoch"] == 4, "the count of evaluations without improvement must survive resume"
    capsys.readouterr()

    again = make_trainer(trainer.cfg, run)
    _script(again, [])
    result = again.fit(resume=True)
    assert again.step_losses == [] and result["stopped_early"]["epoch"] == 4 and result["last"]["epoch"] == 4
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert "stopped early after epoch 4/8" in capsys.readouterr().err


def test_a_run_through_the_api_says_it_stopped_early_and_plots_the_ema_curves(tiny_folder, tmp_path):
    import dinotune
    from dinotune.viz.plots import training_curve_panels

    # no score can improve by more than 1: the run stops after 1 + patience evaluations
    result = dinotune.train(task="classify", data=str(tiny_folder),
                            **tiny_options(tmp_path / "r", epochs=4, adapter="none", ema=0.5, patience=1, min_delta=1.0))
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    assert result["stopped_early"]["epoch"] == saved["stopped_early"]["epoch"] == 2
    assert saved["last"]["epoch"] == 2 and saved["best"]["weights"] in ("raw", "ema")
    panels = training_curve_panels(read_metrics(tmp_path / "r"))
    assert {"val/loss", "val_ema/loss"} <= set(panels["loss"])
    assert any(k.startswith("val_ema/") for k in panels["validation metrics"])
    assert not any(k.endswith(("/images", "/count")) for series in panels.values() for k in series)


def test_early_stopping_in_min_mode_counts_evaluated_epochs_only():
    monitor, early = Monitor("val/loss", "min"), EarlyStopping(patience=2, min_delta=0.1)
    losses = [1.0, None, 0.95, 0.85, 0.8, None, 0.84]  # None: an epoch without evaluation (eval_every)
    records = [{"epoch": e, **({"val/loss": v} if v is not None else {})} for e, v in enumerate(losses, 1)]
    stops = [early.update(monitor, r, final=False) for r in records]
    assert stops == [False] * 6 + [True] and early.stopped == 7 and early.reference_epoch == 4
    last = EarlyStopping(patience=1, min_delta=0)
    last.update(monitor, {"epoch": 1, "val/loss": 1.0}, final=False)
    assert not last.update(monitor, {"epoch": 2, "val/loss": 1.0}, final=True) and last.stopped is None, \
        "the last epoch ends the run anyway: it is not an early stop"


# -------------------------------------------------------------------------------- layer decay
class _Model(nn.Module):
    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.head = backbone, nn.Linear(backbone.embed_dim, 3)


def _expected_exponent(name: str, num_layers: int) -> int:
    block = re.search(r"\.layer\.(\d+)\.", name)
    if block:
        return num_layers - int(block.group(1))
    if ".embeddings." in name:
        return num_layers + 1
    assert name.endswith(("layernorm.weight", "layernorm.bias", ".norm.weight", ".norm.bias")), name
    return 0


@pytest.mark.parametrize("spec,kind", [("random:tiny", "full"), ("random:tiny", "lora"),
                                       ("random:dinov3-tiny", "full"), ("random:dinov3-tiny", "dora")])
def test_layer_decay_gives_each_block_its_rate(spec, kind, capsys, loud):
    from dinotune.utils import set_verbose

    backbone = DinoBackbone.from_spec(spec)
    adapter = AdapterConfig(kind=kind)
    apply_adapter(backbone, adapter)
    model = _Model(backbone)
    phase = Phase("train", 1, True, lr=1e-2, backbone_lr=1e-3)
    set_trainable(model, adapter, phase)
    decay, L = 0.5, backbone.num_layers
    set_verbose(True)
    try:
        optimizer = build_optimizer(model, adapter, OptimConfig(layer_decay=decay, weight_decay=0.05), phase)
    finally:
        set_verbose(False)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    trainable = trainable_backbone_parameters(backbone, adapter)
    assert len(group_of) == len(trainable) + 2  # every trainable weight once, plus the head's two
    for name, p in trainable:
        g = group_of[id(p)]
        assert g["lr"] == pytest.approx(1e-3 * decay ** _expected_exponent(name, L)), name
        token = "embeddings." in name and "patch_embeddings" not in name  # cls / register tokens, positions
        assert g["weight_decay"] == (0.0 if p.ndim <= 1 or token else 0.05), name
    names = {g["name"] for g in optimizer.param_groups}
    blocks = {f"backbone.block{i}" for i in range(L)}
    assert blocks <= names and ("backbone.embeddings" in names) == (kind == "full")
    assert {g["lr"] for g in optimizer.param_groups if g["name"].startswith("head")} == {1e-2}
    assert logged_lrs(optimizer) == pytest.approx({"lr/head": 1e-2, "lr/backbone": 1e-3 * decay})
    # the schedule scales every group alike: the ratios between blocks stay
    scheduler = build_scheduler(optimizer, OptimConfig(warmup_epochs=1), total_steps=6, steps_per_epoch=2)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["backbone.block0"] / lrs[f"backbone.block{L - 1}"] == pytest.approx(decay ** (L - 1))
    err = capsys.readouterr().err
    assert re.search(rf"backbone\.block{L - 1} +lr 5\.000e-04 .*params: attention\.", err), err


def test_layer_decay_off_keeps_the_plain_groups():
    backbone = DinoBackbone.from_spec("random:tiny")
    adapter = AdapterConfig(kind="full")
    apply_adapter(backbone, adapter)
    model = _Model(backbone)
    optimizer = build_optimizer(model, adapter, OptimConfig(), Phase("train", 1, True, lr=1e-2, backbone_lr=1e-3))
    assert [g["name"] for g in optimizer.param_groups] == ["head", "head_nd", "backbone", "backbone_nd"]
    assert logged_lrs(optimizer) == {"lr/head": 1e-2, "lr/backbone": 1e-3}


def test_verbose_flag_is_accepted_before_the_command():
    from dinotune.cli import build_parser

    assert build_parser().parse_args(["-v", "models"]).verbose
    assert not build_parser().parse_args(["models"]).verbose
