"""What a training run carries from epoch to epoch, and through ``checkpoints/last`` to a resumed
run: counters, best and last records, the early-stopping counters, and (packed by
``trainer_state``) the optimizer, schedule, scaler, RNG and EMA states."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from dinotune.config import AdapterConfig
from dinotune.engine import checkpoint
from dinotune.engine.ema import ModelEma
from dinotune.engine.monitor import EarlyStopping
from dinotune.engine.run_folder import RunLayout
from dinotune.utils import get_rng_state, set_rng_state


@dataclass
class FitState:
    """What carries from epoch to epoch (and through a checkpoint to a resumed run)."""

    epoch: int = 0  # epochs done
    global_step: int = 0  # optimizer steps done
    best: dict[str, Any] | None = None  # the record of the best epoch so far
    last: dict[str, Any] = field(default_factory=dict)  # the record of the last epoch
    saved: dict[str, Any] | None = None  # trainer state of a resumed checkpoint, until its phase starts
    phase: int | None = None  # index of the phase whose optimizer is live
    early: EarlyStopping = field(default_factory=lambda: EarlyStopping(0, 0.0))


def trainer_state(state: FitState, optimizer: Any, scheduler: Any, scaler: Any, ema: ModelEma | None) -> dict[str, Any]:
    """What ``checkpoints/last`` keeps besides the weights (``checkpoint.write_trainer_state``)."""
    return {
        "epoch": state.epoch,
        "phase": state.phase,
        "global_step": state.global_step,
        "best": state.best,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler else None,
        "rng": get_rng_state(),
        "ema": ema.state_dict() if ema is not None else None,
        "early_stop": state.early.state_dict(),
    }


def start(run_dir: Path, model: nn.Module, adapter: AdapterConfig, resume: bool, ema_decay: float,
          early: EarlyStopping) -> tuple[FitState, ModelEma | None]:
    """A fresh state, or the one ``run_dir/checkpoints/last`` saved (weights and RNG restored into
    the process, the early-stopping counters into ``early``); and the EMA of ``model``'s weights
    when ``ema_decay`` > 0 (restored too; older checkpoints without these states start them anew)."""
    state, saved = FitState(early=early), {}
    if resume:
        last = RunLayout(run_dir).last
        saved = checkpoint.load_trainer_state(last)
        checkpoint.load_weights(last, model, adapter)
        set_rng_state(saved["rng"])
        state = FitState(saved["epoch"], saved["global_step"], saved["best"],
                         checkpoint.read_meta(last).get("metrics", {}), saved, early=early)
        if saved.get("early_stop") is not None:
            early.load_state_dict(saved["early_stop"])
    # the average starts from the (loaded) weights; a resumed run's is then restored
    ema = ModelEma(model, adapter, ema_decay) if ema_decay else None
    if ema is not None and saved.get("ema") is not None:
        ema.load_state_dict(saved["ema"])
    return state, ema
