"""The training engine shared by every task.

The engine never asks which task it runs: it gets a model bundle (``.model`` with ``.backbone``
and ``.head``), loaders, and a task that supplies ``training_step(bundle, model, batch) -> dict``
(with ``"loss"``), ``evaluate(bundle, loader, ...) -> dict`` and the metric to monitor
(``monitor_for``: its default for the run's data, which ``--monitor`` may replace).
Everything else (phases, AMP, accumulation, clipping, schedules, checkpoints, resume, logs) lives
here. Under ``torchrun`` it trains with DistributedDataParallel (see ``distributed.py``): every
process evaluates its shard of the validation set, process 0 alone writes the run folder.

``fit`` is a loop over small steps: ``_start`` (fresh or resumed state), ``_enter_phase``
(optimizer and schedule of a training phase), ``train_epoch``, ``_evaluate`` (the raw weights,
and with ``--ema`` their average, see ``ema.py``), early stopping and ``_record`` (best-so-far,
checkpoints, logs, the epoch line); ``monitor.py`` decides what is best and when to stop.
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

from dinotune.engine import checkpoint, distributed, fit_state
from dinotune.engine.checkpoint import writing as _writing
from dinotune.engine.device import autocast, to_device
from dinotune.engine.ema import ModelEma
from dinotune.engine.fit_state import FitState as _FitState
from dinotune.engine.logging import METRICS_FILE, RunLogger, progress
from dinotune.engine.memory import batch_length, peak_memory_mb, reset_peak
from dinotune.engine.monitor import (
    COUNT_KEYS,
    EMA_PREFIX,
    EarlyStopping,
    Monitor,
    MonitorChoice,
    check_metric,
    choose_monitor,
    epoch_line,
    is_scalar,
)
from dinotune.engine.optim import (
    Phase,
    build_optimizer,
    build_phases,
    build_scheduler,
    few_steps_warning,
    logged_lrs,
    phase_at,
    set_trainable,
)
from dinotune.engine.run_folder import RunLayout
from dinotune.errors import NonFiniteLossError
from dinotune.models.bundle import ModelBundle
from dinotune.utils import info, warn, write_json


class TrainableTask(Protocol):
    """What the engine calls of a task. ``monitor_for(meta, val) -> MonitorChoice`` (``tasks/base.py``)
    is read when the task has it; a task without it is judged by ``monitor`` / ``monitor_mode``."""

    monitor: str
    monitor_mode: str

    def training_step(self, bundle: ModelBundle, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]: ...

    def evaluate(self, bundle: ModelBundle, loader: DataLoader, device: torch.device, precision: str,
                 show_progress: bool = False) -> dict[str, Any]: ...


def seed_epoch(loader: Any, seed: int, epoch: int) -> None:
    """Reseed ``loader`` for ``epoch``: data order and worker seeds come from a generator reseeded
    per epoch, so a resumed run (and the sweep's linear grid) sees the batches of an uninterrupted one."""
    gen = getattr(loader, "generator", None)
    if gen is not None:
        gen.manual_seed(seed * 1_000_003 + epoch)
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):  # DistributedSampler: the same shuffle on every process
        sampler.set_epoch(epoch)


class Trainer:
    """Fits ``bundle.model`` for the epochs of ``cfg.train`` and writes the run folder.

    Args:
        bundle: the task's model bundle; ``bundle.model`` has ``.backbone`` (adapted already)
            and ``.head``.
        task: supplies ``training_step`` / ``evaluate`` and the metric to monitor.
        cfg: the task config; ``cfg.adapter``, ``cfg.optim`` and ``cfg.train`` drive the engine,
            the whole config is saved with every checkpoint.
        meta: task metadata saved with checkpoints (class names, ...).
    """

    def __init__(
        self,
        *,
        bundle: ModelBundle,
        task: TrainableTask,
        train_loader: DataLoader,
        val_loader: DataLoader | None,
        cfg: Any,
        run_dir: Path,
        meta: dict[str, Any],
        device: torch.device,
        precision: str,
    ):
        self.bundle = bundle
        self.model = bundle.model.to(device)
        self.train_model = self.model  # the DDP wrapper when distributed
        self.task = task
        self.dist = distributed.current()
        self.train_loader = distributed.shard_loader(train_loader, cfg.train.seed) if self.dist.enabled else train_loader
        self.val_loader = distributed.shard_eval_loader(val_loader) if val_loader is not None else None
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.meta = meta
        self.device = device
        self.precision = precision
        self.phases: list[Phase] = build_phases(cfg.train, cfg.optim, cfg.adapter)
        self.total_epochs = sum(p.epochs for p in self.phases)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.logger: Any = _NullLogger()
        self.ema: ModelEma | None = None  # with --ema: the average of the trained weights (made in _start)
        self.step_losses: list[float] = []  # every optimizer-step loss of this process, for tests
        self.stop_after_epoch: int | None = None  # test hook: simulate an interruption
        # before any epoch: an unknown --monitor is refused now, not after the first one
        self._monitor = self._choose_monitor(task, meta, val_loader)
        self._monitor_checked = False  # against the keys of the first evaluation's result

    # -------------------------------------------------------------------------------- the loop
    def fit(self, resume: bool = False) -> dict[str, Any]:
        state = self._start(resume)
        first = state.epoch
        self.logger = self._open_logger(state) if self.dist.is_main else _NullLogger()
        t_start = time.time()
        optimizer = scheduler = None
        end = self.total_epochs if state.early.stopped is None else first  # a run stopped early stays stopped
        if self.dist.is_main and first < end:
            info(self.monitor.describe())
        try:
            for epoch in range(first, end):
                index, phase = phase_at(self.phases, epoch)
                if index != state.phase:
                    optimizer, scheduler = self._enter_phase(index, phase, state)
                t0 = time.time()
                record, state.global_step = self.train_epoch(epoch, phase, optimizer, scheduler, state.global_step)
                details, ema_details = self._evaluate(epoch)
                self._check_monitored(details)
                record.update({f"val/{k}": v for k, v in details.items() if is_scalar(v)})
                record.update({f"{EMA_PREFIX}{k}": v for k, v in ema_details.items()
                               if is_scalar(v) and k not in COUNT_KEYS})
                record["time_s"] = round(time.time() - t0, 3)
                # every process counts (the records agree); process 0's verdict is the one obeyed
                stop = distributed.broadcast_object(
                    state.early.update(self.monitor, record, final=epoch + 1 == self.total_epochs))
                if self.dist.is_main:  # process 0 alone saves, logs and prints
                    eta = (time.time() - t_start) / (epoch + 1 - first) * (self.total_epochs - epoch - 1)
                    self._record(record, (details, ema_details), state, optimizer, scheduler, 0.0 if stop else eta)
                distributed.barrier()  # every process leaves the epoch together
                if stop or (self.stop_after_epoch is not None and epoch + 1 >= self.stop_after_epoch):
                    break
        finally:
            self.logger.close()
        return {"best": state.best, "last": state.last, "run_dir": str(self.run_dir),
                "stopped_early": state.early.summary(self.monitor), "monitor": self.monitor.summary()}

    # ------------------------------------------------------------------------------ the steps
    def _start(self, resume: bool) -> _FitState:
        """A fresh state, or the one ``checkpoints/last`` saved (weights, RNG, EMA and the early
        stopping counters restored)."""
        if self.cfg.train.ema and self.val_loader is None and self.dist.is_main:
            warn(f"--ema {self.cfg.train.ema}: without validation data the average is never evaluated, so "
                 "checkpoints/best holds the raw weights; give --val-data (or --val-fraction) to compare them")
        early = EarlyStopping(self.cfg.train.patience, self.cfg.train.min_delta)
        state, self.ema = fit_state.start(self.run_dir, self.model, self.cfg.adapter, resume, self.cfg.train.ema, early)
        if not resume:
            return state
        if early.stopped is not None:
            info(f"{self.run_dir}: {early.message(self.monitor, state.best, self.total_epochs)}. Nothing is left "
                 "to train; to train longer, start a new run with a larger --patience")
        elif state.epoch >= self.total_epochs:
            info(f"{self.run_dir}: all {self.total_epochs} epochs are done already")
        else:
            info(f"resuming {self.run_dir} after epoch {state.epoch}/{self.total_epochs}")
        return state

    def _open_logger(self, state: _FitState) -> RunLogger:
        """The run's logs, continued from ``state``: the records the checkpoint keeps restore an
        epoch line that a kill lost (see ``RunLogger``)."""
        from dinotune.config.io import to_dict

        restore = [r for r in (state.best, state.last) if r]
        with _writing(f"updating {self.run_dir / METRICS_FILE}", "it is unchanged"):
            return RunLogger(self.run_dir, resume_epoch=state.epoch, resume_step=state.global_step, restore=restore,
                             report_to=self.cfg.train.report_to, config=to_dict(self.cfg))

    def _enter_phase(self, index: int, phase: Phase, state: _FitState):
        """Optimizer and schedule of phase ``index`` (restored when a resumed run stopped inside it)."""
        optimizer, scheduler = self.start_phase(index, phase, state.saved)
        state.phase, state.saved = index, None
        if self.dist.enabled:  # DDP fixes its parameter set at wrap time: re-wrap per phase
            self.train_model = distributed.wrap(self.model, self.device, self.bundle.find_unused_parameters)
        return optimizer, scheduler

    def start_phase(self, index: int, phase: Phase, saved: dict[str, Any] | None):
        """Set which weights train in ``phase`` and build its optimizer and per-step schedule;
        ``saved``: a trainer state to restore them from (when it was saved in this phase)."""
        set_trainable(self.model, self.cfg.adapter, phase)
        optimizer = build_optimizer(self.model, self.cfg.adapter, self.cfg.optim, phase)
        per_epoch = math.ceil(len(self.train_loader) / self.cfg.optim.accumulate)
        scheduler = build_scheduler(optimizer, self.cfg.optim, phase.epochs * per_epoch, per_epoch)
        few = few_steps_warning(phase.epochs * per_epoch, per_epoch, self.cfg.optim.warmup_epochs,
                                self.cfg.train.batch_size * self.cfg.optim.accumulate)
        if few and saved is None and self.dist.is_main:
            warn(few)
        if saved is not None and saved["phase"] == index:
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            if self.scaler is not None and saved.get("scaler"):
                self.scaler.load_state_dict(saved["scaler"])
        return optimizer, scheduler

    def train_epoch(self, epoch: int, phase: Phase, optimizer, scheduler, global_step: int):
        """One pass over the training data; returns the epoch's record (mean losses over every
        process, learning rates) and the new optimizer-step count."""
        seed_epoch(self.train_loader, self.cfg.train.seed, epoch)
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
        images, t0 = 0, time.perf_counter()
        reset_peak(self.device)
        for i, batch in enumerate(bar):
            images += batch_length(batch)
            group_start = i - i % accumulate
            group_size = min(accumulate, n - group_start)
            last_in_group = i + 1 - group_start == group_size
            if i == group_start:  # a new optimizer step: schedules that follow training progress
                self._hook("scheduled", global_step, self.total_steps)
            out, value = self._backward(to_device(batch, self.device), group_size, last_in_group, epoch, i)
            group_loss += value / group_size
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
            if last_in_group:
                self._step(optimizer, params)
                self._hook("stepped", self.bundle, global_step, self.total_steps)  # e.g. an EMA teacher
                if self.ema is not None:
                    self.ema.update()
                scheduler.step()
                global_step += 1
                self.step_losses.append(group_loss)
                if global_step % 10 == 0:  # per-step scalars go to TensorBoard only
                    self.logger.scalars({"step/loss": group_loss, "step/lr": optimizer.param_groups[0]["lr"]},
                                        global_step)
                group_loss = 0.0
            bar.set_postfix(loss=f"{sums['loss'] / (i + 1):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        bar.close()
        seconds = time.perf_counter() - t0
        sums = distributed.sum_over_processes(sums, self.device)
        record: dict[str, Any] = {"epoch": epoch + 1, "phase": phase.name}
        record.update({f"train/{k}": v / max(1, n * self.dist.world_size) for k, v in sums.items()})
        record.update(logged_lrs(optimizer))
        # throughput of the whole job (every process trains as fast as the slowest), and this process's
        # peak memory: what benchmarks and sweeps compare
        record["sys/images_per_s"] = round(images * self.dist.world_size / max(seconds, 1e-9), 3)
        peak = peak_memory_mb(self.device)
        if peak is not None:
            record["sys/peak_memory_mb"] = round(peak, 1)
        return record, global_step

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (every phase)."""
        return self.total_epochs * math.ceil(len(self.train_loader) / self.cfg.optim.accumulate)

    def _hook(self, name: str, *args: Any) -> None:
        """The task's ``scheduled`` / ``stepped`` (``dinotune.tasks.base.Task``), when it has them."""
        hook = getattr(self.task, name, None)
        if hook is not None:
            hook(*args)

    def _backward(self, batch: Any, group_size: int, last_in_group: bool, epoch: int, i: int):
        """The losses of one micro-batch, back-propagated (scaled to its share of the optimizer
        step), and their value averaged over processes (the same on every process, so a
        non-finite loss stops all of them together)."""
        # DDP: gradients are averaged over processes once per optimizer step, not per micro-batch
        sync = contextlib.nullcontext() if last_in_group or not self.dist.enabled else self.train_model.no_sync()
        with sync:
            with autocast(self.device, self.precision):
                out = self.task.training_step(self.bundle, self.train_model, batch)
            loss = out["loss"]
            value = distributed.mean_over_processes(loss.item(), self.device)
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"the loss became {value} at epoch {epoch + 1}, batch {i + 1}; the run stopped. "
                    f"{RunLayout(self.run_dir).last} holds the last good epoch. Try a lower "
                    "--lr / --backbone-lr, --precision fp32, or a smaller --grad-clip."
                )
            scaled = loss / group_size
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        return out, value

    def _step(self, optimizer, params) -> None:
        """Clip, step, and clear the gradients for the next optimizer step."""
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

    def _evaluate(self, epoch: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Validation metrics of the raw weights and, with ``--ema``, of their average (swapped in,
        evaluated, swapped out: the raw weights come back exactly), when due (every
        ``eval_every`` epochs and after the last), else ``({}, {})``. Every process evaluates its
        shard with process 0's buffers; all get the whole set's metrics."""
        due = (epoch + 1) % self.cfg.train.eval_every == 0 or epoch + 1 == self.total_epochs
        if self.val_loader is None or not due:
            return {}, {}
        distributed.broadcast_buffers(self.model)
        show = self.cfg.train.progress and self.dist.is_main
        details = self.task.evaluate(self.bundle, self.val_loader, self.device, self.precision, show_progress=show)
        if self.ema is None:
            return details, {}
        with self.ema.swapped():
            return details, self.task.evaluate(self.bundle, self.val_loader, self.device, self.precision,
                                               show_progress=show)

    def _record(self, record: dict[str, Any], details: tuple[dict[str, Any], dict[str, Any]], state: _FitState,
                optimizer, scheduler, eta: float) -> None:
        """Best-so-far (raw or EMA weights, whichever scores higher), the logs, ``checkpoints/last``
        (and ``best`` when improved: with the EMA weights when they won), the epoch line.
        ``details``: the raw and the EMA weights' full metrics.

        The epoch's record is logged before the checkpoint is saved: a run killed in between then
        repeats the epoch on resume (its line is dropped and written again) instead of resuming
        after an epoch whose line was never written."""
        epoch = record["epoch"]
        which = self.monitor.improved(record, state.best)  # "raw" / "ema" / None
        if which:
            state.best = {**record, "weights": which} if self.ema is not None else dict(record)
        state.last, state.epoch = record, epoch
        self._log_epoch(record, details[0], state.global_step)  # before the checkpoint: see the docstring
        checkpoint.save_epoch(RunLayout(self.run_dir).checkpoints, self.model, self.cfg,
                              {**self.meta, "epoch": epoch, "metrics": record},
                              fit_state.trainer_state(state, optimizer, scheduler, self.scaler, self.ema), which,
                              self.ema)
        best_details = details[1] if which == "ema" else details[0]
        if which and best_details:
            with _writing(f"writing {RunLayout(self.run_dir).best_metrics}",
                          f"the checkpoints of epoch {epoch} are saved, this file may describe an earlier one"):
                weights = {"weights": which} if self.ema is not None else {}
                write_json(RunLayout(self.run_dir).best_metrics,
                           {"epoch": epoch, **weights, "monitor": self.monitor.summary(), **best_details})
        info(epoch_line(record, self.monitor, self.total_epochs, which, self.ema is not None, eta))
        if state.early.stopped == epoch:
            info(state.early.message(self.monitor, state.best, self.total_epochs))

    def _log_epoch(self, record: dict[str, Any], details: dict[str, Any], step: int) -> None:
        """The epoch's line in ``metrics.jsonl`` and its scalars in TensorBoard (per-class tables,
        e.g. AP per category, go to TensorBoard only). A full disk shows here first, before the
        checkpoint: it is told as clearly as a failed checkpoint save."""
        tables = {k: t for k, t in details.items() if isinstance(t, dict)
                  and all(v is None or is_scalar(v) for v in t.values())}
        with _writing(f"logging epoch {record['epoch']} in {self.run_dir}",
                      "the run stopped before saving this epoch's checkpoint (any earlier one is intact)"):
            self.logger.scalars({f"val_{k}/{name}": v for k, t in tables.items() for name, v in t.items()
                                 if v is not None}, step)
            self.logger.epoch(record, step)

    # -------------------------------------------------------------------------------- helpers
    @property
    def monitor(self) -> Monitor:
        """The validation metric that picks the best epoch (``--monitor``, or the task's default for
        this data), or the training loss when there is no validation data."""
        return self._monitor

    def _choose_monitor(self, task: TrainableTask, meta: dict[str, Any], val_loader: DataLoader | None) -> Monitor:
        offer = getattr(task, "monitor_for", None)
        val = val_loader.dataset if val_loader is not None else None
        choice = offer(meta, val) if offer is not None else MonitorChoice(task.monitor, task.monitor_mode)
        t = self.cfg.train
        monitor = choose_monitor(t.monitor, t.monitor_mode, choice, validating=val_loader is not None)
        if val_loader is None and t.monitor != "auto" and self.dist.is_main:
            warn(f"--monitor {t.monitor} needs validation data, and this run has none: checkpoints/best is "
                 "picked by the training loss")
        return monitor

    def _check_monitored(self, details: dict[str, Any]) -> None:
        """Refuse, at the first evaluation, a monitored metric the evaluation does not give (a key
        the task could not declare up front), naming those it gives."""
        if self._monitor_checked or not details or not self.monitor.key.startswith("val/"):
            return
        check_metric(self.monitor.metric, [k for k, v in details.items() if v is None or is_scalar(v)])
        self._monitor_checked = True


class _NullLogger:
    """What processes other than 0 log: nothing."""

    def scalars(self, values: dict[str, Any], step: int) -> None:
        pass

    def epoch(self, record: dict[str, Any], step: int) -> None:
        pass

    def close(self) -> None:
        pass
