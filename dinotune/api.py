"""The Python API: ``train``, ``load``, ``evaluate``, ``predict``, ``analyze``, ``compare``, ``sweep``, ``pca``,
``export``, and the embedding commands of ``dinotune.embed.api`` (``embed``, ``knn``, ``build_index``,
``search``, ``duplicates``, ``dataset_map``).
The CLI is a thin layer on it; everything below it (tasks, runs, engine, models, data) never imports it.
It names no task: what differs between tasks is asked of the run's task or the task registry."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from dinotune.adapters import count_parameters, format_parameter_count
from dinotune.backbone.channels import adapt_input_to_meta
from dinotune.config import ConfigError, build_config, load_yaml, save_yaml
from dinotune.config.commands import AnalyzeConfig, CompareConfig, EvalConfig, PredictConfig
from dinotune.config.io import load_run_config
from dinotune.config.tools import PcaConfig
from dinotune.engine import checkpoint, distributed
from dinotune.engine.batch_size import resolve_auto_batch_size
from dinotune.engine.device import resolve_precision, select_device
from dinotune.engine.logging import read_metrics
from dinotune.engine.run_folder import RunFolder, RunLayout
from dinotune.engine.speed import check_compile, prepare_for_training
from dinotune.engine.trackers import check_trackers
from dinotune.engine.trainer import Trainer
from dinotune.runs import LoadedRun, load
from dinotune.tasks import Task, build_backbone, get_task, registry
from dinotune.threads import apply_threads
from dinotune.utils import info, seed_everything, set_quiet, warn, write_json

# What may change when a run resumes: where and how it runs, never what it trains.
RESUME_OPTIONS = ("device", "workers", "threads", "progress")


def _train_config(config: Any, task: str, resume: str | Path | None, options: dict[str, Any]) -> Any:
    if resume is not None:
        refused = sorted(set(options) - set(RESUME_OPTIONS))
        if refused:
            raise ConfigError(f"resume continues {resume} with its own saved settings; it takes only "
                              f"{', '.join(RESUME_OPTIONS)}, not {', '.join(refused)}")
        layout = RunLayout(Path(resume).expanduser())
        if not layout.config.is_file():
            raise FileNotFoundError(f"{layout.root}: not a run folder (no {layout.config.name}) to resume")
        checkpoint.resolve(layout.last)
        saved = load_run_config(layout.config)  # a run's own config must be complete
        return build_config(saved.task, saved, **options)
    if config is None:
        task_name = task
    elif isinstance(config, (str, Path)):
        task_name = load_yaml(config).task
    elif isinstance(config, dict):
        task_name = config.get("task", task)
    else:
        task_name = config.task
    return build_config(task_name, config, **options)


def train(config: Any = None, *, task: str | None = None, resume: str | Path | None = None,
          **options: Any) -> Run:
    """Train a model and write a run folder.

    Args:
        config: a task config object, a dict, or a YAML path (defaults when None).
        task: task name when ``config`` is not a config object (default: the first registered,
            image classification).
        resume: a run folder to continue exactly where its last checkpoint stopped.
        **options: overrides named like the CLI flags (``data=..., adapter="lora", epochs=5``).

    Returns:
        the trained ``Run``: ``run.evaluate(data)``, ``run.predict(images)``, ``run.export(out)``, and
        the summary by key (``run["run_dir"]``, ``"best"``, ``"last"``, ``"metrics"``, ``"files"``).
    """
    cfg = _train_config(config, task or registry.default_name(), resume, options)
    cfg.validate()
    apply_threads(cfg.train.threads)  # before any tensor work: 0 = what does not oversubscribe the machine
    if resume is None:
        RunFolder.check(cfg.train.out)
    ctx = distributed.setup(cfg.train.device)  # a no-op unless launched by torchrun
    the_task = get_task(cfg)
    if ctx.enabled:
        the_task.check_distributed()  # what does not combine with several processes, before any work
        if not ctx.is_main:
            set_quiet(True)
    seed_everything(cfg.train.seed)
    device = distributed.device_for(ctx, select_device(cfg.train.device))
    precision = resolve_precision(cfg.train.precision, device)
    if cfg.train.batch_size == "auto" and device.type != "cuda":
        raise ConfigError(f"--batch-size auto finds the largest batch that fits in GPU memory by trial; on {device.type} "
                          "memory is not a hard limit to probe: give a number (e.g. --batch-size 32)")
    check_trackers(cfg.train.report_to)  # a missing wandb / mlflow package is told before any folder exists
    if cfg.train.compile:
        check_compile(device)  # a missing compiler is told now, not after the data is scanned
    # the backbone first, before any folder is made: it refuses a bad --model or an image size
    # that is not a multiple of its patch size, and the patch size shapes the data
    backbone, fingerprint = build_backbone(cfg)
    folder = None
    if ctx.is_main:  # process 0 claims (or locks) the folder; the others use the same one
        folder = RunFolder.reopen(resume) if resume is not None else RunFolder.claim(cfg.train.out)
    try:
        run_dir = distributed.broadcast_object(folder.path if folder is not None else None)
        trainer, meta = _start(cfg, the_task, backbone, fingerprint, run_dir, resume is not None, device, precision)
        if folder is not None:
            folder.started = True
        result = trainer.fit(resume=resume is not None)
        if ctx.is_main:
            result["files"] = [*result.get("files", []), *map(str, the_task.finished(run_dir, trainer.bundle))]
    except BaseException:
        if folder is not None:
            folder.abandon()  # removes the folder of a run that never got to train
        raise
    finally:
        if folder is not None:
            folder.release()
    if not ctx.is_main:
        return Run({"run_dir": str(run_dir), "task": cfg.task, "best": None, "last": None, "metrics": {},
                    "files": []})
    return Run(_finish(run_dir, the_task, meta, result, _parameters(trainer.model)))


def _start(cfg: Any, task: Task, backbone: Any, fingerprint: str, run_dir: Path, resume: bool,
           device: torch.device, precision: str) -> tuple[Trainer, dict[str, Any]]:
    """Everything between a claimed folder and the first epoch: config file, data, model."""
    if not resume:
        cfg.train.out = str(run_dir)
    if distributed.current().is_main:
        save_yaml(cfg, RunLayout(run_dir).config)
    data = task.build_data(run_dir, backbone.patch_size)
    data.meta["backbone_fingerprint"] = fingerprint
    if resume:
        last = RunLayout(run_dir).last
        checkpoint.check_compatible(last, data.meta)
        saved = checkpoint.read_meta(last).get("data_fingerprint")
        if saved and saved != data.meta.get("data_fingerprint"):
            warn(f"the training data changed since {run_dir} started (files added, removed or modified under "
                 f"{cfg.data.data}); the run resumes on the data as it is now")
    # N-band data: the patch embedding is widened to the data's bands before the model is built
    adapt_input_to_meta(backbone, data.meta, trainable=cfg.adapter.kind != "none")
    bundle = task.build_model(data.meta, backbone)
    info(f"backbone {cfg.backbone.model} ({backbone.num_layers} blocks, width {backbone.embed_dim}, "
         f"patch {backbone.patch_size}), adapter {cfg.adapter.kind}; device {device}, precision {precision}")
    info(format_parameter_count(count_parameters(bundle.model)))
    prepare_for_training(bundle, cfg.train, device)  # checkpointing now; --compile at the first forward
    if cfg.train.batch_size == "auto":  # before anything is sized by it (feature caching, the loaders)
        cfg.train.batch_size = 1  # the loaders only lend their dataset and collate function here
        probe, _ = task.loaders(data)
        resolve_auto_batch_size(cfg, task, bundle, probe.dataset, probe.collate_fn, run_dir, device, precision)
    data = task.prepare(bundle, data, run_dir, device, precision)
    train_loader, val_loader = task.loaders(data)
    trainer = Trainer(bundle=bundle, task=task, train_loader=train_loader, val_loader=val_loader,
                      cfg=cfg, run_dir=run_dir, meta=data.meta, device=device, precision=precision)
    return trainer, data.meta


def _parameters(model: nn.Module) -> dict[str, int]:
    """``{"trainable", "total"}`` parameter counts of a trained model (what a sweep's table shows)."""
    counts = count_parameters(model)
    return {"trainable": counts["backbone_trainable"] + counts["head_trainable"], "total": counts["total"]}


def _finish(run_dir: Path, task: Task, meta: dict[str, Any], result: dict[str, Any],
            parameters: dict[str, int] | None = None) -> dict[str, Any]:
    """Plots and the results file after training (``parameters``: trainable / total counts)."""
    from dinotune.viz.plots import plot_training_curves

    history = read_metrics(run_dir)
    files = [plot_training_curves(history, run_dir / "training_curves.png")] if history else []
    files += [Path(f) for f in result.get("files", [])]  # what the task left (Task.finished)
    best_path = RunLayout(run_dir).best_metrics
    best_metrics = {}
    if best_path.is_file():
        best_metrics = json.loads(best_path.read_text())
        files += task.report(run_dir, best_metrics, meta)
    summary = {"run_dir": str(run_dir), "task": task.name, "best": result["best"], "last": result["last"],
               "stopped_early": result.get("stopped_early"),  # None, or the epoch it stopped after and why
               "monitor": result.get("monitor"),  # the metric that picked "best", its direction, and why
               "metrics": best_metrics, "files": [str(f) for f in files]}
    if parameters is not None:
        summary["parameters"] = parameters
    write_json(RunLayout(run_dir).results, summary)
    return summary


# ------------------------------------------------------------------------------- a trained run
class Run(Mapping[str, Any]):
    """A trained run folder, as ``train`` returns it: its summary by key (``run_dir``, ``task``,
    ``best``, ``last``, ``metrics``, ``files``, ``stopped_early``, ``parameters``: the contents of
    ``results.json``), and the model to use at once: ``evaluate``, ``predict`` and ``export`` load the
    best checkpoint (once, merged, on ``device``) unless told otherwise.

        run = dinotune.train(task="classify", data="data/", epochs=5, out="runs/ants")
        run.evaluate("data/")["top1"]; run.predict("photos/"); run.export("exported/")
    """

    def __init__(self, summary: dict[str, Any], device: str = PredictConfig.device):
        self._summary = dict(summary)
        self.device = device
        self._loaded: LoadedRun | None = None

    @property
    def path(self) -> Path:
        return Path(self._summary["run_dir"])

    def __getitem__(self, key: str) -> Any:
        return self._summary[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._summary)

    def __len__(self) -> int:
        return len(self._summary)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, task={self._summary.get('task')!r})"

    def load(self, **options: Any) -> LoadedRun:
        """The run's model (``dinotune.load`` options); without options, loaded once and kept."""
        if options:
            return load(self.path, **options)
        if self._loaded is None:
            self._loaded = load(self.path, device=self.device)
        return self._loaded

    def evaluate(self, data: str, **options: Any) -> dict[str, Any]:
        """Metrics on ``data`` (``LoadedRun.evaluate``'s options)."""
        return self.load().evaluate(data, **options)

    def predict(self, images: str | Path | Sequence[str | Path], **options: Any) -> list[dict[str, Any]]:
        """Predictions per image (``LoadedRun.predict``'s options)."""
        return self.load().predict(images, **options)

    def export(self, out: str | Path, *, format: str = "onnx", **options: Any) -> Path:
        """The run exported into ``out`` (``dinotune.export``'s formats and options)."""
        return export(self.path, out, format=format, **options)


# What ``load`` takes; every other keyword of ``evaluate`` / ``predict`` is the run's own option.
_LOAD_OPTIONS = ("checkpoint_name", "device", "merge", "model", "precision")


def _split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    load_options = {k: v for k, v in options.items() if k in _LOAD_OPTIONS}
    return load_options, {k: v for k, v in options.items() if k not in _LOAD_OPTIONS}


def evaluate(run: str | Path | LoadedRun, data: str, *, split: str = EvalConfig.split,
             **options: Any) -> dict[str, Any]:
    """Metrics of a trained run on ``data`` (any layout its task reads). Options: ``load``'s
    (``device``, ``checkpoint_name``, ...) and ``LoadedRun.evaluate``'s (``batch_size``, ``subset``, ...)."""
    load_options, eval_options = _split_options(options)
    loaded = run if isinstance(run, LoadedRun) else load(run, **load_options)
    return loaded.evaluate(data, split=split, **eval_options)


def predict(run: str | Path | LoadedRun, images: str | Path | Sequence[str | Path], **options: Any
            ) -> list[dict[str, Any]]:
    """Predictions per image for a file, a folder (searched recursively) or a list of files. Options:
    ``load``'s (``device``, ``checkpoint_name``, ...) and the run's predict options (its task's
    inference settings such as ``top_k``, and its extras such as ``draw``)."""
    load_options, predict_options = _split_options(options)
    loaded = run if isinstance(run, LoadedRun) else load(run, **load_options)
    return loaded.predict(images, **predict_options)


def analyze(run: str | Path, *, data: str | None = None, split: str = AnalyzeConfig.split,
            out: str | Path | None = None, samples: int = AnalyzeConfig.samples, draw_threshold: float | None = None,
            **load_options: Any) -> list[Path]:
    """Charts of a run into ``out`` (default ``RUN/analysis``): training curves, the task's metric
    charts (from evaluating ``data``, else the best validation epoch) and drawn sample predictions
    (``draw_threshold``: detection boxes to draw, default the run's ``inference.draw_threshold``)."""
    from dinotune.viz.plots import plot_training_curves

    run_dir = Path(run).expanduser()
    out_dir = Path(out) if out else RunLayout(run_dir).analysis_dir
    files: list[Path] = []
    history = read_metrics(run_dir)
    if history:
        files.append(plot_training_curves(history, out_dir / "training_curves.png"))
    loaded = load(run_dir, **load_options)
    if draw_threshold is not None and "draw_threshold" not in loaded.predict_option_names():
        raise ConfigError(f"--draw-threshold does not apply to {loaded.task.name} runs")
    settings, _ = loaded.settings(draw_threshold=draw_threshold)
    if data:
        metrics = loaded.evaluate(data, split=split)
    elif RunLayout(run_dir).best_metrics.is_file():
        metrics = json.loads(RunLayout(run_dir).best_metrics.read_text())
    else:
        metrics = {}
    if metrics:
        write_json(out_dir / "metrics.json", metrics)
        files += loaded.task.report(out_dir, metrics, loaded.meta)
    sample_data = data or loaded.cfg.data.val_data or loaded.cfg.data.data
    if samples and sample_data:
        files += loaded.task.sample_charts(loaded, sample_data, split, out_dir, samples, settings)
    return files


def compare(*, data: str, runs: Sequence[str | Path] = (), yolo: Sequence[str] = (),
            out: str | Path = CompareConfig.out, split: str = CompareConfig.split, images: str = CompareConfig.images,
            subset: int = CompareConfig.subset, subset_seed: int = CompareConfig.subset_seed,
            device: str = CompareConfig.device, batch_size: int | None = None, yolo_image_size: int | None = None,
            class_map: str | Path | dict[Any, Any] | None = None) -> str:
    """Trained runs and third-party baselines (ultralytics YOLO weights) scored on the same images by
    the same metric code, by the runs' task (``Task.compare``; the task that offers a comparison when
    only baselines are given); writes ``compare.json``, ``compare.md`` and charts into ``out``,
    returns the Markdown table. ``batch_size`` / ``yolo_image_size`` default to the inference
    section of the (first) run's config, else the task config's defaults. ``class_map``: YOLO class
    (index or name) -> dataset category name, as ``"0=person,1=bicycle"``, a JSON file or a dict."""
    loaded = [load(r, device=device) for r in runs]
    task_class = type(loaded[0].task) if loaded else _comparing_task()
    defaults = loaded[0].cfg if loaded else registry.entry(task_class.name).config_class()()
    return task_class.compare(data=data, split=split, runs=loaded, run_names=[Path(r).name for r in runs],
                              yolo=yolo, out=Path(out), images=images, subset=subset, subset_seed=subset_seed,
                              device=device, batch_size=batch_size, yolo_image_size=yolo_image_size,
                              class_map=class_map, defaults=defaults)


def _comparing_task() -> type[Task]:
    """The registered task whose runs ``compare`` scores against baselines (it overrides ``compare``)."""
    owners = [e.task_class() for e in map(registry.entry, registry.names())]
    owners = [c for c in owners if c.compare.__func__ is not Task.compare.__func__]  # classmethods: bound anew
    if not owners:
        raise ConfigError("no registered task compares runs against baselines")
    return owners[0]


def _grid_items(grid: Sequence[str] | dict[str, Sequence[Any]]) -> list[str]:
    """``{"lr": [1e-4, 3e-4], "targets": [["q_proj", "v_proj"]]}`` -> ``["lr=0.0001,0.0003",
    "targets=q_proj+v_proj"]``; a list of ``KEY=V1,V2`` strings is taken as it is."""
    if not isinstance(grid, dict):
        return list(grid)

    def text(value: Any) -> str:
        return "+".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    return [f"{key}={','.join(text(v) for v in values)}" for key, values in grid.items()]


def sweep(task: str | None = None, config: Any = None, *, grid: Sequence[str] | dict[str, Sequence[Any]] = (),
          linear_grid: Sequence[str] | dict[str, Sequence[Any]] = (), search: str | None = None,  # noqa: F811
          trials: int | None = None, out: str | Path | None = None, retry_failed: bool = False,
          **options: Any) -> dict[str, Any]:
    """Train a grid of settings (each trial a run folder, in its own process) and compare them.

    Args:
        task: a registered task name (``config``'s own task when it names one; default: the first
            registered, image classification).
        config: the base config every trial starts from: a config object, a dict or a YAML path.
        grid: ``{"adapter": ["none", "lora"], "rank": [4, 16], "lr": [1e-4, 3e-4]}`` or
            ``["adapter=none,lora", "rank=4,16", ...]``: keys are train options (``backbone_lr``)
            or dotted config keys; settings that do not apply (a rank without LoRA) collapse.
        linear_grid: instead of ``grid``, heads trained together on one pass of cached features
            of a frozen backbone: ``lr``, ``weight_decay``, ``pool``, ``label_smoothing``.
        search: ``grid`` (every combination, the default) or ``optuna`` (TPE, ``trials`` of them).
        out: the sweep folder (default ``SweepConfig.out``); calling again continues the sweep,
            and is refused when the settings differ.
        retry_failed: run trials that failed in an earlier call again.
        **options: the base settings, named like the train options (``data=..., epochs=5``).

    Returns:
        ``{"sweep_dir", "metric", "rows", "best", "best_run", "table", "files"}``: ``rows`` one
        dict per trial (``name``, ``settings``, ``metric``, ``trainable``, ``peak_memory_mb``,
        ``images_per_s``, ``wall_s``, ``status``, ``run_dir``); ``best_run`` the chosen head's run
        folder of a linear grid.
    """
    from dinotune.config import TASK_CONFIGS, flag_map
    from dinotune.config.tools import SweepConfig
    from dinotune.sweep import run_sweep
    from dinotune.sweep.table import markdown

    defaults = SweepConfig()
    cfg = _train_config(config, task or registry.default_name(), None, options)
    names = {flag.lstrip("-").replace("-", "_"): key for flag, key in flag_map(TASK_CONFIGS[cfg.task]).items()}
    explicit = {name if "." in name else names.get(name, name) for name in options}
    result = run_sweep(cfg.task, cfg, grid=_grid_items(grid), linear_grid=_grid_items(linear_grid),
                       search=search or defaults.search, trials=defaults.trials if trials is None else trials,
                       out=out or defaults.out, explicit=explicit, retry_failed=retry_failed,
                       finish=lambda best: _finish(best.run_dir, best.task, best.meta, best.result, best.parameters))
    return {"sweep_dir": str(result.sweep_dir), "metric": result.metric_name,
            "rows": [dataclasses.asdict(r) for r in result.rows],
            "best": dataclasses.asdict(result.best) if result.best else None,
            "best_run": str(result.best_run) if result.best_run else None,
            "table": markdown(result.rows, result.metric_name, result.notes), "files": [str(f) for f in result.files]}


def pca(model: str | Path, images: str | Path | Sequence[str | Path], out: str | Path, *,
        image_size: int | None = None, foreground_threshold: float | None = None, device: str = PcaConfig.device,
        max_images: int | None = None) -> Path:
    """The PCA picture of patch features (``dinotune pca``) for ``images`` under a backbone: a
    ``--model`` spec (``random:tiny``, a hub id, a ``.pth``, a local folder) or a dinotune run
    folder (its backbone with the adapter merged). Files and / or folders (searched recursively);
    unreadable files are reported and skipped, and only the first ``max_images`` are used.
    ``image_size`` defaults to the run's ``backbone.image_size``, else ``PcaConfig.image_size``.
    ``out`` is the PNG path; an existing folder or a suffix-less path gets ``pca.png`` inside."""
    from dinotune.data.bands import read_input, stretch_to_rgb
    from dinotune.data.images import readable_images
    from dinotune.embed.model import backbone_for
    from dinotune.viz.pca import pca_features, pca_figure

    defaults = PcaConfig()
    max_images = defaults.max_images if max_images is None else max_images
    if max_images < 1:
        raise ConfigError(f"--max-images must be at least 1, got {max_images}")
    paths = readable_images(images)
    if len(paths) > max_images:
        warn(f"pca: using the first {max_images} of {len(paths)} images (raise --max-images for more)")
        paths = paths[:max_images]
    backbone, run_size, bands = backbone_for(model, paths, device)
    image_size = image_size or run_size or defaults.image_size
    inputs = [read_input(p, layout=bands.layout) for p in paths]
    maps = pca_features(backbone, inputs, image_size, foreground_threshold=foreground_threshold, spec=bands)
    pictures = [stretch_to_rgb(x, bands.rgb_bands) for x in inputs]  # band arrays: RGB bands, 2-98 % stretch
    out = Path(out).expanduser()
    if out.is_dir() or not out.suffix:
        out = out / "pca.png"
    return pca_figure(pictures, maps, out, titles=[Path(p).name for p in paths])


def export(run: str | Path | LoadedRun, out: str | Path, *, format: str = "onnx", **options: Any) -> Path:
    """Write ``run`` into the folder ``out`` as ``onnx`` (graph + ``dinotune_export.json`` for
    ``dinotune.runtime``), ``torchscript`` or ``hf`` (a transformers folder); returns ``out``.
    Options: ``image_size``, ``half``, ``opset``, ``exporter`` (onnx), ``push_to_hub`` (hf),
    ``checkpoint_name``, ``model`` (see ``dinotune.export.export``)."""
    from dinotune.export import export as export_run

    return export_run(run, out, format=format, **options)


# The embedding commands live with the embeddings (dinotune.embed.api); they are this API's all the same.
from dinotune.embed.api import build_index, dataset_map, duplicates, embed, knn, search  # noqa: E402,F401
