"""The commands: each turns its parsed flags into a typed config or API options, calls the Python
API and prints the result. A flag the run's task has no use for is refused by name (asked of the
task, never decided by its name)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from dinotune.cli.flags import (
    _overrides,
    command_config,
    predict_task_options,
)
from dinotune.config import (
    TASK_CONFIGS,
    ConfigError,
    coerce,
    flag_name,
    leaf_fields,
)
from dinotune.config.commands import (
    AnalyzeConfig,
    CompareConfig,
    DemoConfig,
    DownloadConfig,
    EvalConfig,
    PredictConfig,
)
from dinotune.config.tools import (
    EXPORT_FORMAT_OPTIONS,
    ExportConfig,
    PcaConfig,
    ServeConfig,
    SweepConfig,
)
from dinotune.tasks import registry


def cmd_train(ns: argparse.Namespace) -> int:
    from dinotune import api
    from dinotune.config import apply_overrides, apply_presets, build_config

    if ns.resume:
        options = {"device": ns.resume_device, "workers": ns.resume_workers, "threads": ns.resume_threads,
                   "progress": ns.resume_progress}
        result = api.train(resume=ns.resume, **{k: v for k, v in options.items() if v is not None})
    else:
        if not ns.task:
            raise ConfigError("name a task (dinotune train classify ...) or pass --resume RUN")
        cfg = build_config(ns.task, ns.config)
        overrides = _overrides(ns, TASK_CONFIGS[ns.task])
        apply_presets(apply_overrides(cfg, overrides), overrides)
        result = api.train(cfg)
    from dinotune.engine.distributed import current

    if current().is_main:  # under torchrun, process 0 reports for all
        _print_result(result)
    return 0


def cmd_sweep(ns: argparse.Namespace) -> int:
    from dinotune import api

    if not ns.task:
        raise ConfigError("name a task: dinotune sweep classify|detect|segment --data D --grid KEY=V1,V2 ...")
    overrides = _overrides(ns, TASK_CONFIGS[ns.task])
    sweep, _ = command_config(ns, SweepConfig)
    try:
        result = api.sweep(ns.task, ns.config, grid=sweep.grid, linear_grid=sweep.linear_grid, search=sweep.search,
                           trials=sweep.trials, out=sweep.out, retry_failed=sweep.retry_failed, **overrides)
    except KeyboardInterrupt:
        print("dinotune: sweep interrupted; run the same command again to continue it (finished trials are kept, "
              "the interrupted one resumes)", file=sys.stderr)
        return 130
    print(result["table"])
    for f in result["files"]:
        print(f"wrote {f}")
    if result["best_run"]:
        print(f"best head as a run folder: {result['best_run']} (dinotune eval / predict read it)")
    return 0


def _print_result(result: dict[str, Any]) -> None:
    from dinotune.config import build_config
    from dinotune.tasks import get_task

    best = result.get("best") or {}
    metrics = result.get("metrics") or {}
    print(f"\nrun folder: {result['run_dir']}")
    if best:
        key = (result.get("monitor") or {}).get("key", "")
        shown = {k: v for k, v in best.items() if k.startswith("val/") and isinstance(v, float)}
        shown = {**({key: shown.pop(key)} if key in shown else {}), **shown}  # the monitored metric first
        by = f" (by {key.removeprefix('val/')})" if key in best else ""
        print(f"best epoch {best.get('epoch')}{by}: " + "  ".join(f"{k[4:]} {v:.4f}" for k, v in shown.items()))
    table = get_task(build_config(result["task"])).summary_table(metrics) if metrics else None
    if table:
        print(table)
    for f in result.get("files", []):
        print(f"  wrote {f}")


def _refuse_inapplicable(given: dict[str, str], accepted: set[str], what: str) -> None:
    """``given``: option name -> the flag that set it. A flag the run's task has no use for is an
    error naming it (and ``what``: the runs it does not apply to), never silently ignored."""
    wrong = [flag for name, flag in given.items() if name not in accepted]
    if wrong:
        raise ConfigError(f"{', '.join(wrong)} does not apply to {what}")


# File names that say nothing of the data they hold: the folder around them names it instead.
_GENERIC_STEMS = ("data", "_annotations.coco", "annotations", "labels", "train", "val", "valid", "test")


def _data_name(data: str) -> str:
    """A short name for an evaluation's outputs: the data file's stem (``a.csv`` and ``b.csv`` in one
    folder stay apart), the folder's name for a folder, and the dataset's folder for a file whose
    name says nothing (``data.yaml``, ``annotations/instances_val.json``, ``_annotations.coco.json``)."""
    path = Path(data).expanduser()
    if path.is_file() and path.stem not in _GENERIC_STEMS and not path.stem.startswith("instances_"):
        name = path.stem
    else:
        if path.is_file():
            path = path.parent.parent if path.parent.name == "annotations" else path.parent
        name = path.resolve().name if str(data) not in ("", ".") else Path.cwd().name
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in (name or str(data))) or "data"


def _unused(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... (before a file's suffix): the first that does not
    exist, so an evaluation never overwrites another."""
    if not path.exists():
        return path
    n = 2
    while (candidate := path.with_name(f"{path.stem}-{n}{path.suffix}")).exists():
        n += 1
    return candidate


def cmd_eval(ns: argparse.Namespace) -> int:
    from dinotune import api
    from dinotune.utils import write_json

    cfg, _ = command_config(ns, EvalConfig)
    loaded = api.load(cfg.run, checkpoint_name=cfg.checkpoint, device=cfg.device, model=cfg.model or None)
    options: dict[str, Any] = {"batch_size": cfg.batch_size, "images": cfg.images}
    if cfg.labels:
        options["labels"] = cfg.labels
    if cfg.subset:
        options.update(subset=cfg.subset, subset_seed=cfg.subset_seed)
    name = f"{_data_name(cfg.data)}-{cfg.split}"
    if cfg.corruptions:
        from dinotune.robustness import evaluate_corruptions

        out_dir = _unused(Path(cfg.out) if cfg.out else loaded.layout.eval_dir / f"corruptions-{name}")
        evaluate_corruptions(loaded, cfg.data, split=cfg.split, names=cfg.corruption_names or None,
                             severities=cfg.severities, seed=cfg.corruption_seed, out_dir=out_dir, **options)
        print((out_dir / "corruptions.md").read_text())
        print(f"wrote {out_dir / 'corruptions.json'} and {out_dir / 'corruptions.png'}", file=sys.stderr)
        return 0
    metrics = loaded.evaluate(cfg.data, split=cfg.split, **options)
    # each evaluation its own files: RUN/eval/<data>-<split>/metrics.json and its charts (or --out and
    # the charts beside it), numbered rather than written over an earlier one
    given = Path(cfg.out) if cfg.out else None
    out = _unused(given) if given else _unused(loaded.layout.eval_dir / name) / "metrics.json"
    if given and out != given:
        print(f"{given} exists; this evaluation goes to {out}", file=sys.stderr)
    write_json(out, metrics)
    files = loaded.task.report(out.parent if not given else out.parent / out.stem, metrics, loaded.meta)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}, indent=2))
    table = loaded.task.summary_table(metrics)  # per-class numbers for the reader (stdout stays JSON)
    if table:
        print(table, file=sys.stderr)
    print(f"full metrics: {out}", file=sys.stderr)
    for f in files:
        print(f"wrote {f}", file=sys.stderr)
    return 0


def _is_export(path: str | Path) -> bool:
    """An exported model (``dinotune export --format onnx``): a ``.onnx`` file, or a folder with
    ``dinotune_export.json``."""
    from dinotune.runtime.metadata import EXPORT_META

    path = Path(path).expanduser()
    return path.suffix.lower() == ".onnx" or (path.is_dir() and (path / EXPORT_META).is_file())


def cmd_predict(ns: argparse.Namespace) -> int:
    cfg, _ = command_config(ns, PredictConfig)
    # the task options given, typed; which of them the run's task takes is asked of the run
    task_options = predict_task_options()
    given = {name: coerce(getattr(ns, name), option.type, option.meta["flag"])
             for name, option in task_options.items() if hasattr(ns, name)}
    flags = {name: task_options[name].meta["flag"] for name in given}
    options = {**given, **({"batch_size": cfg.batch_size} if cfg.batch_size is not None else {})}
    backend = cfg.backend or ("onnx" if _is_export(cfg.run) else "torch")
    fmt = cfg.format or (Path(cfg.out).suffix.lstrip(".").lower() if cfg.out else "") or "json"
    if backend == "onnx":  # the exported graph in onnxruntime; no torch needed for an export
        if not _is_export(cfg.run):  # refused before the run is exported (a minute for a large model)
            _check_onnx_options(cfg.run, flags, fmt)
        predictor = _onnx_predictor(cfg)
        _refuse_inapplicable(flags, set(predictor.options), f"{predictor.task} runs with --backend onnx")
        _check_format(fmt, predictor.runtime.formats, cfg.out)
        results = predictor.predict(cfg.images, **options)
        text = predictor.format_predictions(results, fmt, predictor.settings(**options))
    else:
        if _is_export(cfg.run):
            raise ConfigError(f"{cfg.run} is an exported ONNX model: predict it with --backend onnx")
        from dinotune import api
        from dinotune.engine import distributed

        # under torchrun the tiles of each scene are shared out (predict --tile); process 0 writes
        ctx = distributed.setup(cfg.device)
        loaded = api.load(cfg.run, checkpoint_name=cfg.checkpoint, device=_process_device(cfg.device, ctx),
                          model=cfg.model or None)
        _refuse_inapplicable(flags, loaded.predict_option_names(), f"{loaded.task.name} runs")
        runtime = loaded.task.runtime()
        _check_format(fmt, runtime.formats + runtime.written_formats, cfg.out)
        if fmt in runtime.written_formats:  # the task streams this file itself (a label GeoTIFF)
            if not cfg.out:
                raise ConfigError(f"--format {fmt} is written to a file: name it with --out FILE.{fmt}")
            loaded.predict(cfg.images, out=cfg.out, **options)  # which says what it wrote
            return 0
        results = loaded.predict(cfg.images, **options)
        if not ctx.is_main:
            return 0
        settings, extra = loaded.settings(**options)
        text = loaded.task.format_predictions(results, fmt, {**dataclasses.asdict(settings), **extra})
    if cfg.out:
        from dinotune.utils import atomic_write_text

        atomic_write_text(Path(cfg.out), text)
        print(f"wrote predictions for {len(results)} images to {cfg.out} ({fmt.upper()})", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _process_device(device: str, ctx: Any) -> str:
    """The device of this process: under torchrun on CUDA, its own GPU (``cuda:LOCAL_RANK``)."""
    import torch

    if ctx.enabled and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{ctx.local_rank}"
    return device


def _check_format(fmt: str, formats: Sequence[str], out: str) -> None:
    """Refuse an output format the run's task does not write, naming where it came from."""
    if fmt in formats:
        return
    source = (f"--out {out}: the extension '.{fmt}'" if out and Path(out).suffix.lstrip(".").lower() == fmt
              else f"--format {fmt}")
    raise ConfigError(f"{source} is not an output format of this run; name the file *.{' or *.'.join(formats)}, or "
                      f"pass --format {'|'.join(formats)}")


def _check_onnx_options(run: str, flags: dict[str, str], fmt: str) -> None:
    """The options and format of ``predict RUN --backend onnx`` checked against the run's task from
    its saved config, before the run is exported."""
    from dinotune.config.io import load_run_config
    from dinotune.engine.run_folder import RunLayout

    layout = RunLayout(Path(run).expanduser())
    if not layout.config.is_file():
        return  # the export says what is wrong with the folder
    cfg = load_run_config(layout.config)
    runtime = registry.entry(cfg.task).runtime_class()
    accepted = {f.name for f in dataclasses.fields(cfg.inference)} | runtime.extra_options
    _refuse_inapplicable(flags, accepted, f"{cfg.task} runs with --backend onnx")
    _check_format(fmt, runtime.formats, "")


def _onnx_predictor(cfg: PredictConfig) -> Any:
    """The ONNX predictor of ``cfg.run``: an exported model, or a run folder exported once into
    ``RUN/export/onnx-<checkpoint>`` (reused while the checkpoint is unchanged)."""
    from dinotune.runtime import load_predictor

    target = cfg.run
    if not _is_export(target):
        from dinotune.export.onnx import onnx_for_run

        target = onnx_for_run(cfg.run, checkpoint_name=cfg.checkpoint, model=cfg.model or None)
    return load_predictor(target, device=cfg.device)


def cmd_export(ns: argparse.Namespace) -> int:
    from dinotune.export import export

    cfg, given = command_config(ns, ExportConfig)
    flags = {key: flag_name(key, f) for key, f, _ in leaf_fields(ExportConfig)}
    takes = EXPORT_FORMAT_OPTIONS[cfg.format]
    others = frozenset().union(*EXPORT_FORMAT_OPTIONS.values()) - takes
    wrong = [flag for key, flag in flags.items() if key in given and key in others]
    if wrong:
        raise ConfigError(f"{', '.join(wrong)} does not apply to --format {cfg.format}")
    out = export(cfg.run, cfg.out, format=cfg.format, checkpoint_name=cfg.checkpoint, model=cfg.model or None,
                 **{k: getattr(cfg, k) for k in given & takes})
    print(out)
    return 0


def cmd_analyze(ns: argparse.Namespace) -> int:
    from dinotune import api

    cfg, _ = command_config(ns, AnalyzeConfig)
    files = api.analyze(cfg.run, data=cfg.data or None, split=cfg.split, out=cfg.out or None, samples=cfg.samples,
                        device=cfg.device, model=cfg.model or None, draw_threshold=cfg.draw_threshold)
    for f in files:
        print(f"wrote {f}")
    return 0


def cmd_pca(ns: argparse.Namespace) -> int:
    from dinotune import api

    cfg, given = command_config(ns, PcaConfig)
    # --image-size is the size for a backbone spec: a run folder keeps its own unless it is given
    path = api.pca(cfg.model, [Path(p) for p in cfg.images], Path(cfg.out),
                   image_size=cfg.image_size if "image_size" in given else None,
                   foreground_threshold=cfg.foreground_threshold, device=cfg.device, max_images=cfg.max_images)
    print(f"wrote {path}")
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    from dinotune import api

    cfg, _ = command_config(ns, CompareConfig)
    table = api.compare(data=cfg.data, split=cfg.split, runs=cfg.runs, yolo=cfg.yolo, out=Path(cfg.out),
                        images=cfg.images, subset=cfg.subset, subset_seed=cfg.subset_seed, device=cfg.device,
                        yolo_image_size=cfg.yolo_image_size, batch_size=cfg.batch_size,
                        class_map=cfg.class_map or None)
    print(table)
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    from importlib.util import find_spec

    cfg, _ = command_config(ns, ServeConfig)
    missing = [name for name, modules in (("fastapi", ["fastapi"]), ("uvicorn", ["uvicorn"]),
                                          ("python-multipart", ["python_multipart", "multipart"]))
               if not any(find_spec(m) for m in modules)]
    if missing:
        raise ConfigError(f"dinotune serve needs {', '.join(missing)}: pip install 'dinotune[serve]'")
    from dinotune.serve.app import run_server

    run_server(cfg.target, host=cfg.host, port=cfg.port, device=cfg.device, max_upload_mb=cfg.max_upload_mb,
               index=cfg.index or None)
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from dinotune.demo import run_demo

    cfg, _ = command_config(ns, DemoConfig)
    run_demo(out=cfg.out, epochs=cfg.epochs, model=cfg.model, device=cfg.device)
    return 0

def cmd_models(ns: argparse.Namespace) -> int:
    from dinotune.backbone.registry import HUB_ARCH, HUB_FAMILIES, RANDOM_FAMILIES, arch_summary

    print("Hugging Face hub ids (downloaded once, then read from the local cache):")
    for family, ids in HUB_FAMILIES.items():
        print(f"  {family}")
        for h in ids:
            print(f"    {h:45s} {arch_summary(HUB_ARCH[h])}")
    print("random-weight architectures (tests, demos; --init-seed picks the weights):")
    for family, specs in RANDOM_FAMILIES.items():
        print(f"  {family}")
        for s in specs:
            print(f"    {s:26s} {arch_summary(s.split(':', 1)[1])}")
    print("also: a local Hugging Face folder of either family, or an official .pth checkpoint "
          "(dinov2_vits14_pretrain.pth, dinov3_vits16_pretrain_lvd1689m-*.pth ...)")
    return 0


# ------------------------------------------------------------------------------ data download
def cmd_data_download(ns: argparse.Namespace) -> int:
    from dinotune.data.download import download_dataset

    cfg, _ = command_config(ns, DownloadConfig)
    try:
        result = download_dataset(cfg.dataset, to=cfg.to or None, splits=cfg.splits, mirror=cfg.mirror or None,
                                  keep_archives=cfg.keep_archives, progress=not ns.quiet)
    except KeyboardInterrupt:
        print("dinotune: download interrupted; run the same command again to resume it (the partial file is kept)",
              file=sys.stderr)
        return 130
    print(result["dir"])
    return 0
