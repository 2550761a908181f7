"""The Python API: ``train``, ``load``, ``evaluate``, ``predict``. The CLI is a thin layer on it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from dinotune.adapters import count_parameters, format_parameter_count, merge_adapter
from dinotune.config import ConfigError, build_config, load_yaml, save_yaml
from dinotune.engine import checkpoint, distributed
from dinotune.engine.device import resolve_precision, select_device
from dinotune.engine.logging import read_metrics
from dinotune.engine.trainer import Trainer
from dinotune.tasks import Task, get_task
from dinotune.utils import info, seed_everything, set_quiet, warn, write_json


def _fresh_run_dir(out: str) -> Path:
    """``out``, or ``out-2``, ``out-3``... when ``out`` already holds something (nothing is lost)."""
    base = Path(out).expanduser()
    path, n = base, 1
    while path.exists() and any(path.iterdir()):
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    if path != base:
        info(f"{base} is not empty; this run goes to {path}")
    path.mkdir(parents=True, exist_ok=True)
    return path


def train(config: Any = None, *, task: str = "classify", resume: str | Path | None = None,
          **options: Any) -> dict[str, Any]:
    """Train a model and write a run folder.

    Args:
        config: a task config object, a dict, or a YAML path (defaults when None).
        task: task name when ``config`` is not a config object (``classify``).
        resume: a run folder to continue exactly where its ``checkpoints/last`` stopped.
        **options: overrides named like the CLI flags (``data=..., adapter="lora", epochs=5``).

    Returns:
        ``{"run_dir", "best", "last", "metrics", "files"}``.
    """
    if resume is not None:
        run_dir = Path(resume).expanduser()
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"{run_dir}: not a run folder (no config.yaml) to resume")
        cfg = build_config(load_yaml(run_dir / "config.yaml").task, run_dir / "config.yaml", **options)
        checkpoint.resolve(run_dir / "checkpoints" / "last")
    else:
        if config is None:
            task_name = task
        elif isinstance(config, (str, Path)):
            task_name = load_yaml(config).task
        elif isinstance(config, dict):
            task_name = config.get("task", task)
        else:
            task_name = config.task
        cfg = build_config(task_name, config, **options)
    cfg.validate()
    ctx = distributed.setup(cfg.train.device)  # a no-op unless launched by torchrun
    if ctx.enabled:
        _check_distributed(cfg, ctx)
    if resume is None:
        # process 0 picks the folder (it may add a suffix); the others use the same one
        run_dir = distributed.broadcast_object(_fresh_run_dir(cfg.train.out) if ctx.is_main else None)
        cfg.train.out = str(run_dir)
    if ctx.is_main:
        save_yaml(cfg, run_dir / "config.yaml")

    seed_everything(cfg.train.seed)
    device = distributed.device_for(ctx, select_device(cfg.train.device))
    precision = resolve_precision(cfg.train.precision, device)
    the_task = get_task(cfg)
    data = the_task.build_data(run_dir)
    if resume is not None:
        checkpoint.check_compatible(run_dir / "checkpoints" / "last", data.meta)
    model = the_task.build_model(data.meta)
    info(f"backbone {cfg.backbone.model} ({model.backbone.num_layers} blocks, width "
         f"{model.backbone.embed_dim}), adapter {cfg.adapter.kind}; device {device}, precision {precision}")
    info(format_parameter_count(count_parameters(model)))
    data = the_task.prepare(model, data, run_dir, device, precision)
    train_loader, val_loader = the_task.loaders(data)
    trainer = Trainer(model=model, task=the_task, train_loader=train_loader, val_loader=val_loader,
                      cfg=cfg, run_dir=run_dir, meta=data.meta, device=device, precision=precision)
    result = trainer.fit(resume=resume is not None)
    if not ctx.is_main:
        return {"run_dir": str(run_dir), "best": None, "last": None, "metrics": {}, "files": []}
    return _finish(run_dir, the_task, data.meta, result)


def _check_distributed(cfg: Any, ctx: distributed.DistContext) -> None:
    """What does not combine with several processes, refused before any work; quiet followers."""
    if getattr(getattr(cfg, "head", None), "cache_features", False):
        raise ConfigError("--cache-features extracts features in one process; run it without torchrun "
                          "(a linear probe on cached features is fast on one GPU)")
    if not ctx.is_main:
        set_quiet(True)


def _finish(run_dir: Path, task: Task, meta: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """Plots and the results file after training."""
    from dinotune.viz.plots import plot_training_curves

    history = read_metrics(run_dir)
    files = [plot_training_curves(history, run_dir / "training_curves.png")] if history else []
    best_path = run_dir / "best_metrics.json"
    best_metrics = {}
    if best_path.is_file():
        best_metrics = json.loads(best_path.read_text())
        files += task.report(run_dir, best_metrics, meta)
    summary = {"run_dir": str(run_dir), "best": result["best"], "last": result["last"],
               "metrics": best_metrics, "files": [str(f) for f in files]}
    write_json(run_dir / "results.json", summary)
    return summary


# --------------------------------------------------------------------------------- loading runs
@dataclass
class LoadedRun:
    """A trained model ready for inference: ``model`` on ``device``, plus its config and task."""

    run_dir: Path
    cfg: Any
    meta: dict[str, Any]
    task: Task
    model: nn.Module
    device: torch.device
    precision: str

    def predict(self, images: str | Path | Sequence[str | Path], **options: Any) -> list[dict[str, Any]]:
        """Task outputs per image (classification: top-k classes; detection: boxes). Options:
        ``top_k``, ``batch_size``, and for detection ``score_threshold``, ``image_ids``."""
        return self.task.predict_images(self, images, **options)

    def evaluate(self, data: str, split: str = "val", **options: Any) -> dict[str, Any]:
        """Metrics on ``data`` (classification: folder / CSV / dataset; detection: COCO / YOLO)."""
        return self.task.evaluate_data(self, data, split=split, **options)


def _checkpoint_dir(run: Path, which: str) -> Path:
    run = Path(run).expanduser()
    if (run / checkpoint.META).is_file():  # a checkpoint folder itself
        return run
    folder = run / "checkpoints" / which
    try:
        return checkpoint.resolve(folder)
    except checkpoint.CheckpointError:
        other = "last" if which == "best" else "best"
        try:
            found = checkpoint.resolve(run / "checkpoints" / other)
        except checkpoint.CheckpointError:
            raise checkpoint.CheckpointError(f"{run}: no checkpoints (expected {folder})") from None
        warn(f"{folder} is missing; using {found}")
        return found


def load(run: str | Path, *, checkpoint_name: str = "best", device: str = "auto", merge: bool = True,
         model: str | None = None, precision: str = "auto") -> LoadedRun:
    """Rebuild a run's model: base backbone + saved adapter + head, optionally merged.

    Args:
        run: a run folder, or one of its checkpoint folders.
        checkpoint_name: ``best`` or ``last``.
        merge: fold LoRA / DoRA into the backbone weights (same outputs, faster inference).
        model: a different location of the base weights (e.g. a local copy of the hub model).
    """
    folder = _checkpoint_dir(Path(run), checkpoint_name)
    cfg = load_yaml(folder / "config.yaml")
    meta = checkpoint.read_meta(folder)
    task = get_task(cfg)
    built = dict(meta)
    net = task.build_model(built, model_override=model)
    if meta.get("backbone_fingerprint") and built["loaded_fingerprint"] != meta["backbone_fingerprint"]:
        warn(f"the base backbone weights ({model or cfg.backbone.model}) differ from the ones this run "
             "was trained on; predictions will not match the training results")
    checkpoint.load_weights(folder, net, cfg.adapter)
    if merge:
        merge_adapter(net.backbone)
    dev = select_device(device)
    net.to(dev).eval()
    return LoadedRun(folder.parent.parent if folder.parent.name == "checkpoints" else folder, cfg, meta,
                     task, net, dev, resolve_precision(precision, dev))


def evaluate(run: str | Path | LoadedRun, data: str, *, split: str = "val", **load_options: Any) -> dict[str, Any]:
    """Metrics of a trained run on ``data`` (for classification, a folder / CSV / dataset)."""
    loaded = run if isinstance(run, LoadedRun) else load(run, **load_options)
    return loaded.evaluate(data, split=split)


def predict(run: str | Path | LoadedRun, images: str | Path | Sequence[str | Path], *,
            top_k: int | None = None, **load_options: Any) -> list[dict[str, Any]]:
    """Predictions per image for a file, a folder (searched recursively) or a list of files."""
    loaded = run if isinstance(run, LoadedRun) else load(run, **load_options)
    return loaded.predict(images, **({"top_k": top_k} if top_k else {}))


def analyze(run: str | Path, *, data: str | None = None, split: str = "val", out: str | Path | None = None,
            samples: int = 8, **load_options: Any) -> list[Path]:
    """Charts of a run into ``out`` (default ``RUN/analysis``): training curves, the task's metric
    charts (from evaluating ``data``, else the best validation epoch) and drawn sample predictions."""
    from dinotune.viz.plots import plot_training_curves

    run_dir = Path(run).expanduser()
    out_dir = Path(out) if out else run_dir / "analysis"
    files: list[Path] = []
    history = read_metrics(run_dir)
    if history:
        files.append(plot_training_curves(history, out_dir / "training_curves.png"))
    loaded = load(run_dir, **load_options)
    if data:
        metrics = loaded.evaluate(data, split=split)
    elif (run_dir / "best_metrics.json").is_file():
        metrics = json.loads((run_dir / "best_metrics.json").read_text())
    else:
        metrics = {}
    if metrics:
        write_json(out_dir / "metrics.json", metrics)
        files += loaded.task.report(out_dir, metrics, loaded.meta)
    sample_data = data or loaded.cfg.data.val_data or loaded.cfg.data.data
    if samples and sample_data:
        files += loaded.task.sample_charts(loaded, sample_data, split, out_dir, samples)
    return files
