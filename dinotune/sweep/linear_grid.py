"""``--linear-grid``: many heads on a frozen backbone, trained at once on one pass of cached features
(the DINOv2 linear evaluation's trick), the best chosen on validation.

The backbone runs once per image, into a cached row holding every input the heads read; each batch
of the one loader then trains every head in turn, on its part of the rows. What a row is and which
part a head reads is the task's (``Task.linear_probe()``, ``dinotune/tasks/linear_probe.py``; for
classification, every pooling is a slice of one row); this module is the generic loop around it.

Each head gets exactly what training it alone (``dinotune train --adapter none`` on the task's
cached features, with its settings) would give: its weights start from the random state a lone run
builds its head in, the batches come in the lone run's order (the task's loader, reseeded per epoch
as the trainer reseeds it), and it has its own optimizer, schedule and gradient clipping, built by
the engine's own functions from its own config. What would couple the heads is refused: fp16 loss scaling, EMA, early
stopping, and what the task's probe refuses (classification: dropout in the head, one random stream
drawn in another order).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file

from dinotune.backbone.channels import adapt_input_to_meta
from dinotune.config import ConfigError, save_yaml
from dinotune.engine import checkpoint
from dinotune.engine.device import autocast, resolve_precision, select_device, to_device
from dinotune.engine.logging import METRICS_FILE, progress
from dinotune.engine.memory import batch_length, peak_memory_mb, reset_peak
from dinotune.engine.monitor import Monitor
from dinotune.engine.optim import build_optimizer, build_phases, build_scheduler, logged_lrs, set_trainable
from dinotune.engine.run_folder import BEST, RunLayout
from dinotune.engine.trainer import seed_epoch
from dinotune.models.bundle import ModelBundle
from dinotune.sweep.grid import Axis, Trial, display_name
from dinotune.sweep.table import Row
from dinotune.tasks import Task, TaskData, build_backbone, get_task
from dinotune.tasks.linear_probe import HeadView, LinearProbe
from dinotune.utils import atomic_write_text, get_rng_state, info, seed_everything, set_rng_state, write_json

# What every head has its own of, whatever the task (its optimiser is built from its own config);
# the task's probe adds its keys (``LinearProbe.keys``).
OPTIMISER_KEYS = ("optim.lr", "optim.weight_decay")
# the sweep folder's run folder of the chosen head, named as the checkpoint a run keeps of its best epoch
BEST_DIR = BEST
HEADS_FILE = "heads.json"


def linear_probe(cfg: Any) -> LinearProbe:
    """The task's part of the linear grid; ConfigError for a task that has none."""
    probe = get_task(cfg).linear_probe()
    if probe is None:
        raise ConfigError(f"--linear-grid does not apply to {cfg.task} runs; sweep them with --grid")
    return probe


def check_axes(cls: type, axes: Sequence[Axis], probe: LinearProbe) -> None:
    """Refuse an axis (of the task config class ``cls``) that heads on the same cached rows cannot differ in."""
    keys = OPTIMISER_KEYS + tuple(probe.keys)
    for axis in axes:
        if axis.key not in keys:
            allowed = ", ".join(display_name(cls, k) for k in keys)
            raise ConfigError(f"--linear-grid {axis.name}: heads trained together on the same cached features can "
                              f"differ only in {allowed}; sweep {axis.name} with --grid instead")


def check_config(cfg: Any, probe: LinearProbe) -> None:
    """Refuse what the one-pass training cannot give exactly as lone runs would."""
    if cfg.adapter.kind != "none":
        raise ConfigError(f"--linear-grid trains heads on a frozen backbone's cached features: it needs --adapter none, "
                          f"not {cfg.adapter.kind} (sweep adapters with --grid)")
    probe.check(cfg)
    if cfg.train.precision == "fp16":
        raise ConfigError("--linear-grid does not take --precision fp16 (its loss scaler is one per run); use bf16 or fp32")
    if getattr(cfg.train, "compile", False):
        raise ConfigError("--linear-grid runs the backbone once per image; --compile would not pay for itself (and "
                          "compiled features may differ from a lone run's in the last bits): leave it off")
    for name, flag in (("ema", "--ema"), ("patience", "--patience")):
        if getattr(cfg.train, name, 0):
            raise ConfigError(f"--linear-grid does not take {flag}: every head trains all --epochs, and the best "
                              "epoch of each is kept")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--linear-grid runs in one process; start it without torchrun")
    if cfg.train.batch_size == "auto":
        raise ConfigError("--linear-grid needs a number for --batch-size (heads on cached features are small)")


@dataclass
class _Head:
    """One head in training, with everything a lone run would keep for it."""

    trial: Trial
    task: Task
    bundle: ModelBundle
    view: HeadView  # its part of the cached rows
    optimizer: Any = None
    scheduler: Any = None
    val_loader: Any = None
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    best_details: dict[str, Any] = field(default_factory=dict)
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds: float = 0.0
    images: int = 0
    error: str = ""
    said: list[str] = field(default_factory=list)  # lines its evaluations wrote to stderr


@dataclass
class BestHead:
    """The chosen head, written as a run folder (``run_dir``) like any ``dinotune train`` run;
    ``result`` holds its best and last epoch records for ``api._finish``."""

    run_dir: Path
    task: Task
    meta: dict[str, Any]
    result: dict[str, Any]
    parameters: dict[str, int]


def _monitor(head: _Head) -> Monitor:
    return Monitor(f"val/{head.task.monitor}", head.task.monitor_mode)


def train_heads(cfg: Any, trials: Sequence[Trial], cache_dir: Path, *, show_progress: bool = False,
                ) -> tuple[list[_Head], dict[str, Any], float | None]:
    """Train every trial's head on one pass of cached features per epoch. Returns the heads (their
    histories, best records and best weights), the data's metadata and the process's peak memory."""
    probe = linear_probe(cfg)
    check_config(cfg, probe)
    for trial in trials:
        check_config(trial.config, probe)
        trial.config.validate()
    seed_everything(cfg.train.seed)
    device = select_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    reset_peak(device)
    # what a lone run does before it builds its head, in the same order: backbone, data, bands
    backbone, fingerprint = build_backbone(cfg)
    task = get_task(cfg)
    data = task.build_data(None, backbone.patch_size)
    if data.val is None:
        raise ConfigError("--linear-grid picks the best head on validation data: give --val-data, a val/ split "
                          "or --val-fraction")
    data.meta["backbone_fingerprint"] = fingerprint
    adapt_input_to_meta(backbone, data.meta, trainable=False)
    start = get_rng_state()
    built = []
    for trial in trials:
        set_rng_state(start)  # each head starts from the random state a lone run builds it in
        head_task = get_task(trial.config)
        built.append((trial, head_task, head_task.build_model(data.meta, backbone)))
    # one pass of the backbone over the data, every head's input in one row
    t = cfg.train
    extractor = probe.feature_model(backbone, [trial.config for trial in trials]).to(device)
    heads = [_Head(trial, head_task, bundle, probe.head_view(trial.config, extractor))
             for trial, head_task, bundle in built]
    key = {"fingerprint": fingerprint, "model": cfg.backbone.model, "size": cfg.backbone.image_size,
           "input": data.meta.get("input")}
    train_set, val_set = probe.cache(extractor, data.train, data.val, cache_dir=cache_dir, key=key,
                                     batch_size=t.batch_size, workers=t.workers, device=device, precision=precision,
                                     show_progress=show_progress)
    train_loader, _ = task.loaders(TaskData(train_set, None, data.meta))
    for head in heads:
        model = head.bundle.model.to(device)
        hc = head.trial.config
        phase = build_phases(hc.train, hc.optim, hc.adapter)[0]
        set_trainable(model, hc.adapter, phase)
        head.optimizer = build_optimizer(model, hc.adapter, hc.optim, phase)
        per_epoch = math.ceil(len(train_loader) / hc.optim.accumulate)
        head.scheduler = build_scheduler(head.optimizer, hc.optim, phase.epochs * per_epoch, per_epoch)
        _, head.val_loader = head.task.loaders(TaskData(train_set, head.view.dataset(val_set), data.meta))
    for epoch in range(t.epochs):
        _epoch(heads, train_loader, epoch, cfg, device, precision)
    tell_warnings(heads)
    return heads, data.meta, peak_memory_mb(device)


def _epoch(heads: list[_Head], loader: Any, epoch: int, cfg: Any, device: torch.device, precision: str) -> None:
    """One epoch of every live head: the trainer's steps (accumulation, clipping, schedule), then
    its evaluation when due."""
    seed_epoch(loader, cfg.train.seed, epoch)  # the data order of a lone run
    live = [h for h in heads if not h.error]
    accumulate, n = cfg.optim.accumulate, len(loader)
    sums: dict[int, dict[str, float]] = {id(h): {} for h in live}
    for h in live:
        h.bundle.model.head.train()
        h.optimizer.zero_grad(set_to_none=True)
    t_epoch = {id(h): 0.0 for h in live}
    # iterated through the trainer's own progress bar: tqdm's constructor opens an iterator of the
    # loader, which takes a draw from its generator, so a lone run's batches come after that draw
    bar = progress(loader, cfg.train.progress, total=n, desc=f"epoch {epoch + 1}/{cfg.train.epochs} linear grid")
    for i, batch in enumerate(bar):
        batch = to_device(batch, device)
        group_start = i - i % accumulate
        group_size = min(accumulate, n - group_start)
        last_in_group = i + 1 - group_start == group_size
        for h in live:
            if h.error:
                continue
            t0 = time.perf_counter()
            sub = h.view.batch(batch)
            with autocast(device, precision):
                out = h.task.training_step(h.bundle, h.bundle.model, sub)
            value = float(out["loss"].item())
            if not math.isfinite(value):
                h.error = f"the loss became {value} at epoch {epoch + 1}, batch {i + 1}"
                continue
            (out["loss"] / group_size).backward()
            for k, v in out.items():
                sums[id(h)][k] = sums[id(h)].get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
            if last_in_group:
                params = [p for g in h.optimizer.param_groups for p in g["params"]]
                if cfg.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
                h.optimizer.step()
                h.optimizer.zero_grad(set_to_none=True)
                h.scheduler.step()
            h.images += batch_length(sub)
            t_epoch[id(h)] += time.perf_counter() - t0
    bar.close()
    due = (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs
    for h in live:
        if h.error:
            continue
        t0 = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch + 1, "phase": "train"}
        record.update({f"train/{k}": v / max(1, n) for k, v in sums[id(h)].items()})
        record.update(logged_lrs(h.optimizer))
        details = _quietly(h, lambda: h.task.evaluate(h.bundle, h.val_loader, device, precision)) if due else {}
        record.update({f"val/{k}": v for k, v in details.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        t_epoch[id(h)] += time.perf_counter() - t0
        record["time_s"] = round(t_epoch[id(h)], 3)
        h.seconds += t_epoch[id(h)]
        h.history.append(record)
        if _monitor(h).improved(record, h.best):  # the trainer's rule: a strict improvement
            h.best, h.best_details = dict(record), details
            h.best_state = copy.deepcopy(h.bundle.model.head.state_dict())


def _quietly(head: _Head, evaluate: Any) -> dict[str, Any]:
    """Run ``evaluate``, keeping what it says on stderr (a collapse warning, per head and epoch,
    would repeat for every head that trains alike) in ``head.said``, told once after training."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        out = evaluate()
    for line in buf.getvalue().splitlines():
        if line.strip() and line not in head.said:
            head.said.append(line)
    return out


def tell_warnings(heads: Sequence[_Head]) -> None:
    """Each distinct line the heads' evaluations said, once, with the heads that said it."""
    said: dict[str, list[str]] = {}
    for h in heads:
        for line in h.said:
            said.setdefault(line, []).append(h.trial.name)
    for line, names in said.items():
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        print(f"{line} [{shown}]", file=sys.stderr, flush=True)


def head_rows(heads: Sequence[_Head], peak_mb: float | None) -> list[Row]:
    """One table row per head; memory is the process's peak, shared by the heads trained together."""
    rows = []
    for h in heads:
        key = f"val/{h.task.monitor}"
        metric = (h.best or {}).get(key)
        row = Row(h.trial.name, dict(h.trial.settings), metric=metric,
                  trainable=sum(p.numel() for p in h.bundle.model.head.parameters()),
                  peak_memory_mb=round(peak_mb, 1) if peak_mb is not None else None,
                  images_per_s=round(h.images / h.seconds, 1) if h.seconds > 0 else None,
                  wall_s=round(h.seconds, 3), status=f"failed: {h.error}" if h.error else "done")
        rows.append(row)
    return rows


def choose(heads: Sequence[_Head]) -> _Head | None:
    """The head whose best epoch scores best on validation (the first of equals)."""
    best = None
    for h in heads:
        if h.error or h.best is None:
            continue
        if best is None or _monitor(h).improved(h.best, best.best):
            best = h
    return best


def save_heads(heads: Sequence[_Head], rows: Sequence[Row], out_dir: Path) -> None:
    """Every head's last weights (``heads/<name>.safetensors``), and its epoch records and table
    row (``heads.json``, read back when the sweep is called again)."""
    (out_dir / "heads").mkdir(parents=True, exist_ok=True)
    for h in heads:
        state = {k: v.detach().contiguous().cpu() for k, v in h.bundle.model.head.state_dict().items()}
        save_file(state, str(out_dir / "heads" / f"{h.trial.name}.safetensors"))
    write_json(out_dir / HEADS_FILE, {"heads": {h.trial.name: {"settings": h.trial.settings, "history": h.history,
                                                                "error": h.error} for h in heads},
                                       "rows": [dataclasses.asdict(r) for r in rows]})


def write_run(head: _Head, meta: dict[str, Any], run_dir: Path) -> BestHead:
    """The chosen head as a run folder (its config, metrics, best metrics and both checkpoints, where
    ``RunLayout`` puts them) that ``dinotune eval`` / ``predict`` / ``load`` read like any other."""
    cfg = copy.deepcopy(head.trial.config)
    cfg.train.out = str(run_dir)
    layout = RunLayout(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(cfg, layout.config)
    atomic_write_text(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in head.history))
    model = head.bundle.model
    last_state = copy.deepcopy(model.head.state_dict())
    last = head.history[-1]
    checkpoint.save(layout.last, model, cfg, {**meta, "epoch": last["epoch"], "metrics": last})
    model.head.load_state_dict(head.best_state)
    assert head.best is not None
    checkpoint.save(layout.best, model, cfg,
                    {**meta, "epoch": head.best["epoch"], "metrics": head.best})
    model.head.load_state_dict(last_state)
    write_json(layout.best_metrics, {"epoch": head.best["epoch"], **head.best_details})
    trainable = sum(p.numel() for p in model.head.parameters())
    total = sum(p.numel() for p in model.parameters())
    info(f"best head {head.trial.name} written as a run folder: {run_dir}")
    return BestHead(run_dir, head.task, meta, {"best": head.best, "last": last},
                    {"trainable": trainable, "total": total})
