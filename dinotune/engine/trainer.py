"""The training engine shared by every task.

The engine never asks which task it runs: a task gives it ``training_step(model, batch) -> dict``
(with ``"loss"``) and ``evaluate(model, loader, ...) -> dict``; the model exposes ``.backbone``
and ``.head``. Everything else (phases, AMP, accumulation, clipping, schedules, checkpoints,
resume, logs) lives here. Under ``torchrun`` it trains with DistributedDataParallel (see
``distributed.py``); process 0 alone evaluates and writes the run folder.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader

from dinotune.engine import checkpoint, distributed
from dinotune.engine.device import autocast, to_device
from dinotune.engine.logging import RunLogger, progress
from dinotune.engine.optim import (
    Phase,
    build_optimizer,
    build_phases,
    build_scheduler,
    phase_at,
    set_trainable,
)
from dinotune.utils import get_rng_state, info, set_rng_state, write_json


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without overwriting good checkpoints."""


class TrainableTask(Protocol):
    monitor: str
    monitor_mode: str

    def training_step(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]: ...

    def evaluate(
        self, model: nn.Module, loader: DataLoader, device: torch.device, precision: str,
        show_progress: bool = False,
    ) -> dict[str, Any]: ...


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Trainer:
    """Fits ``model`` for the epochs of ``cfg.train`` and writes the run folder.

    Args:
        model: module with ``.backbone`` (adapted already) and ``.head``.
        task: supplies ``training_step`` / ``evaluate`` and the metric to monitor.
        cfg: the task config; ``cfg.adapter``, ``cfg.optim`` and ``cfg.train`` drive the engine,
            the whole config is saved with every checkpoint.
        meta: task metadata saved with checkpoints (class names, ...).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        task: TrainableTask,
        train_loader: DataLoader,
        val_loader: DataLoader | None,
        cfg: Any,
        run_dir: Path,
        meta: dict[str, Any],
        device: torch.device,
        precision: str,
    ):
        self.model = model.to(device)
        self.train_model = self.model  # the DDP wrapper when distributed
        self.task = task
        self.dist = distributed.current()
        self.train_loader = distributed.shard_loader(train_loader, cfg.train.seed) if self.dist.enabled else train_loader
        self.val_loader = val_loader
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.meta = meta
        self.device = device
        self.precision = precision
        self.phases: list[Phase] = build_phases(cfg.train, cfg.optim, cfg.adapter)
        self.total_epochs = sum(p.epochs for p in self.phases)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.step_losses: list[float] = []  # every optimizer-step loss of this process, for tests
        self.stop_after_epoch: int | None = None  # test hook: simulate an interruption

    # ------------------------------------------------------------------------------------ setup
    def _start_phase(self, index: int, phase: Phase, state: dict[str, Any] | None):
        set_trainable(self.model, self.cfg.adapter, phase)
        optimizer = build_optimizer(self.model, self.cfg.adapter, self.cfg.optim, phase)
        per_epoch = math.ceil(len(self.train_loader) / self.cfg.optim.accumulate)
        scheduler = build_scheduler(optimizer, self.cfg.optim, phase.epochs * per_epoch, per_epoch)
        if state is not None and state["phase"] == index:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if self.scaler is not None and state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        return optimizer, scheduler

    def _seed_epoch(self, epoch: int) -> None:
        # Data order and worker seeds come from a generator reseeded per epoch, so a resumed run
        # sees the same batches as an uninterrupted one.
        gen = getattr(self.train_loader, "generator", None)
        if gen is not None:
            gen.manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):  # DistributedSampler: the same shuffle on every process
            sampler.set_epoch(epoch)

    # -------------------------------------------------------------------------------- main loop
    def fit(self, resume: bool = False) -> dict[str, Any]:
        ckpt_dir = self.run_dir / "checkpoints"
        start_epoch, global_step, best, state = 0, 0, None, None
        last_record: dict[str, Any] = {}
        if resume:
            state = checkpoint.load_trainer_state(ckpt_dir / "last")
            checkpoint.load_weights(ckpt_dir / "last", self.model, self.cfg.adapter)
            start_epoch, global_step, best = state["epoch"], state["global_step"], state["best"]
            last_record = checkpoint.read_meta(ckpt_dir / "last").get("metrics", {})
            if start_epoch >= self.total_epochs:
                info(f"{self.run_dir}: all {self.total_epochs} epochs are done already")
            else:
                info(f"resuming {self.run_dir} after epoch {start_epoch}/{self.total_epochs}")
        main = self.dist.is_main
        self.logger = logger = (RunLogger(self.run_dir, resume_epoch=start_epoch, resume_step=global_step) if main
                                else _NullLogger())
        if state is not None:
            set_rng_state(state["rng"])
        self.model.to(self.device)
        current, optimizer, scheduler = None, None, None
        t_start = time.time()
        try:
            for epoch in range(start_epoch, self.total_epochs):
                index, phase = phase_at(self.phases, epoch)
                if index != current:
                    optimizer, scheduler = self._start_phase(index, phase, state)
                    current, state = index, None
                    if self.dist.enabled:  # DDP fixes its parameter set at wrap time: re-wrap per phase
                        self.train_model = distributed.wrap(self.model, self.device)
                self._seed_epoch(epoch)
                t0 = time.time()
                record, global_step = self._train_epoch(epoch, phase, optimizer, scheduler, global_step)
                evaluated = main and self.val_loader is not None and (
                    (epoch + 1) % self.cfg.train.eval_every == 0 or epoch + 1 == self.total_epochs
                )
                details: dict[str, Any] = {}
                if evaluated:
                    details = self.task.evaluate(self.model, self.val_loader, self.device, self.precision,
                                                 show_progress=self.cfg.train.progress)
                    record.update({f"val/{k}": v for k, v in details.items() if _is_scalar(v)})
                    # per-class tables (e.g. AP per category) go to TensorBoard only
                    tables = {k: t for k, t in details.items() if isinstance(t, dict)
                              and all(v is None or _is_scalar(v) for v in t.values())}
                    logger.scalars({f"val_{k}/{name}": v for k, t in tables.items() for name, v in t.items()
                                    if v is not None}, global_step)
                record["time_s"] = round(time.time() - t0, 3)
                if main:  # process 0 alone saves, logs and prints; the others wait below
                    improved = self._improved(record, best)
                    if improved:
                        best = {k: v for k, v in record.items()}
                    last_record = record
                    meta = {**self.meta, "epoch": epoch + 1, "metrics": record}
                    checkpoint.save(ckpt_dir / "last", self.model, self.cfg, meta, self._state(
                        epoch + 1, index, global_step, best, optimizer, scheduler))
                    if improved:
                        checkpoint.copy(ckpt_dir / "last", ckpt_dir / "best")
                        if details:
                            write_json(self.run_dir / "best_metrics.json", {"epoch": epoch + 1, **details})
                    logger.epoch(record, global_step)
                    done = epoch + 1 - start_epoch
                    eta = (time.time() - t_start) / done * (self.total_epochs - epoch - 1)
                    info(self._summary(record, improved, eta))
                distributed.barrier()  # every process leaves the epoch together
                if self.stop_after_epoch is not None and epoch + 1 >= self.stop_after_epoch:
                    break
        finally:
            logger.close()
        return {"best": best, "last": last_record, "run_dir": str(self.run_dir)}

    def _train_epoch(self, epoch, phase, optimizer, scheduler, global_step):
        model, accumulate = self.model, self.cfg.optim.accumulate
        model.train()
        if not phase.train_backbone:
            model.backbone.eval()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        n = len(self.train_loader)
        sums: dict[str, float] = {}
        optimizer.zero_grad(set_to_none=True)
        bar = progress(self.train_loader, self.cfg.train.progress and self.dist.is_main, total=n,
                       desc=f"epoch {epoch + 1}/{self.total_epochs} {phase.name}")
        group_loss = 0.0
        for i, batch in enumerate(bar):
            batch = to_device(batch, self.device)
            group_start = i - i % accumulate
            group_size = min(accumulate, n - group_start)
            last_in_group = i + 1 - group_start == group_size
            # DDP: gradients are averaged over processes once per optimizer step, not per micro-batch
            sync = contextlib.nullcontext() if last_in_group or not self.dist.enabled else self.train_model.no_sync()
            with sync:
                with autocast(self.device, self.precision):
                    out = self.task.training_step(self.train_model, batch)
                loss = out["loss"]
                # the mean over processes: every process sees the same value, so all stop together
                value = distributed.mean_over_processes(loss.item(), self.device)
                if not math.isfinite(value):
                    raise NonFiniteLossError(
                        f"the loss became {value} at epoch {epoch + 1}, batch {i + 1}; the run stopped. "
                        f"{self.run_dir / 'checkpoints' / 'last'} holds the last good epoch. Try a lower "
                        "--lr / --backbone-lr, --precision fp32, or a smaller --grad-clip."
                    )
                scaled = loss / group_size
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            group_loss += value / group_size
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
            if last_in_group:
                self._step(optimizer, params)
                scheduler.step()
                global_step += 1
                self.step_losses.append(group_loss)
                group_loss = 0.0
                if global_step % 10 == 0:  # per-step scalars go to TensorBoard only
                    self.logger.scalars({"step/loss": value, "step/lr": optimizer.param_groups[0]["lr"]},
                                        global_step)
            bar.set_postfix(loss=f"{sums['loss'] / (i + 1):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        bar.close()
        sums = distributed.sum_over_processes(sums, self.device)
        record: dict[str, Any] = {"epoch": epoch + 1, "phase": phase.name}
        record.update({f"train/{k}": v / max(1, n * self.dist.world_size) for k, v in sums.items()})
        for g in optimizer.param_groups:
            if not g["name"].endswith("_nd"):
                record[f"lr/{g['name']}"] = g["lr"]
        return record, global_step

    def _step(self, optimizer, params) -> None:
        clip = self.cfg.optim.grad_clip
        if self.scaler is not None:
            if clip:
                self.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip)
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)


    # -------------------------------------------------------------------------------- helpers
    def _state(self, epoch, phase_index, global_step, best, optimizer, scheduler) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "phase": phase_index,
            "global_step": global_step,
            "best": best,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": get_rng_state(),
        }

    def _monitor(self) -> tuple[str, str]:
        if self.val_loader is None:
            return "train/loss", "min"
        return f"val/{self.task.monitor}", self.task.monitor_mode

    def _improved(self, record: dict[str, Any], best: dict[str, Any] | None) -> bool:
        key, mode = self._monitor()
        if not _is_scalar(record.get(key)) or not math.isfinite(record[key]):
            return False  # not evaluated this epoch
        if best is None or key not in best:
            return True
        return record[key] > best[key] if mode == "max" else record[key] < best[key]

    def _summary(self, record: dict[str, Any], improved: bool, eta: float) -> str:
        monitor = f"val/{self.task.monitor}"
        keys = ["train/loss", "val/loss", monitor] + [k for k in record if k.startswith("val/")]
        keys = list(dict.fromkeys(k for k in keys if k in record))[:5]
        parts = [f"{k} {record[k]:.4f}" for k in keys if _is_scalar(record[k])]
        mark = " (best)" if improved else ""
        return (f"epoch {record['epoch']}/{self.total_epochs} [{record['phase']}] " + "  ".join(parts)
                + f"{mark}  {record['time_s']:.1f}s" + (f", ~{_fmt_time(eta)} left" if eta >= 1 else ""))


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _NullLogger:
    """What processes other than 0 log: nothing."""

    def scalars(self, values: dict[str, Any], step: int) -> None:
        pass

    def epoch(self, record: dict[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        pass
