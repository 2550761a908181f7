"""The ``dinotune`` command: parses flags into a config or API options and calls the Python API.

Its own logic is limited to the command line: flag parsing, refusing flags that do not apply to a
run's task (asked of the task, not decided by its name), and printing results."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from dinotune.config import TASK_CONFIGS, ConfigError, DetectConfig, flag_map, leaf_fields
from dinotune.config.tools import ExportConfig, PcaConfig, ServeConfig, SweepConfig

EXAMPLES = """examples:
  dinotune demo                                    # offline demo on scikit-learn's digits
  dinotune train classify --data hymenoptera/ --model facebook/dinov2-small --adapter lora --out runs/ants
  dinotune train classify --data train.csv --val-data val.csv --adapter none --cache-features
  dinotune train --resume runs/ants                # continue exactly where it stopped
  dinotune eval runs/ants --data hymenoptera/      # metrics JSON on the val split
  dinotune predict runs/ants photos/ --top-k 3 --format csv
  dinotune train detect --data coco/ --model facebook/dinov2-small --lightweight --subset 1000 --out runs/det
  dinotune predict runs/det test2017/ --out results.json --draw drawn/
  dinotune compare --data coco/ --runs runs/det --yolo yolov8n.pt --out runs/compare
  dinotune sweep classify --data hymenoptera/ --grid adapter=none,lora rank=4,16 lr=1e-4,3e-4 --out runs/sweep
"""


TASK_HELP = {
    "classify": "Train an image classifier (class folders, CSV, or Hugging Face datasets)",
    "detect": "Train an object detector (COCO or YOLO data): DETR-style, or single-object simple / improved",
    "segment": "Train a semantic segmenter (VOC, ADE20K, image/mask folders, COCO masks): linear or FPN decoder",
}
CONFIG_NOTE = ("Every option below is a key of the saved config.yaml; flags override --config FILE.yaml, "
               "which overrides the defaults shown.")


def _known_errors() -> tuple[type[BaseException], ...]:
    from dinotune.errors import DinotuneError

    return (DinotuneError, FileNotFoundError)


# ------------------------------------------------------------------------------- config flags
def _metavar(key: str, tp: Any) -> str:
    members = [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) in (Union, UnionType) else []
    if members:  # int | Literal["auto"]: N|auto
        return "|".join(_metavar(key, a) if get_origin(a) is not Literal else "|".join(get_args(a)) for a in members)
    if get_origin(tp) is list:
        return {int: "N", float: "X"}.get(get_args(tp)[0], "NAME")
    return {int: "N", float: "X"}.get(tp) or key.rsplit(".", 1)[-1].upper()


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per config field, with its help text and default; unset flags are not overrides."""
    defaults = cls()
    groups: dict[str, argparse._ArgumentGroup] = {}
    flags = {v: k for k, v in flag_map(cls).items()}
    hints = {key: (f, tp) for key, f, tp in leaf_fields(cls)}
    for key, flag in flags.items():
        f, tp = hints[key]
        section = key.split(".")[0]
        group = groups.setdefault(section, parser.add_argument_group(f"{section} options"))
        default = defaults
        for part in key.split("."):
            default = getattr(default, part)
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")
        names = [flag] + ([f.metadata["short"]] if f.metadata.get("short") else [])
        kw: dict[str, Any] = {"dest": key, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            group.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
            continue
        if get_origin(tp) is Literal:
            kw["choices"] = list(get_args(tp))
        elif get_origin(tp) is list:
            kw["nargs"] = "+"
        kw["metavar"] = None if "choices" in kw else _metavar(key, tp)
        group.add_argument(*names, **kw)


def _parse_set(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value
    return out


def _overrides(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    keys = set(flag_map(cls).values())
    out = {k: v for k, v in vars(ns).items() if k in keys}
    return {**_parse_set(getattr(ns, "set", None) or []), **out}


# ----------------------------------------------------------------------------------- commands
def cmd_train(ns: argparse.Namespace) -> int:
    from dinotune import api
    from dinotune.config import apply_overrides, apply_presets, build_config

    if ns.resume:
        options = {"device": ns.resume_device, "workers": ns.resume_workers, "progress": ns.resume_progress}
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
    try:
        result = api.sweep(ns.task, ns.config, grid=ns.grid, linear_grid=ns.linear_grid, search=ns.search,
                           trials=ns.trials, out=ns.sweep_out, retry_failed=ns.retry_failed, **overrides)
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
        shown = {k: v for k, v in best.items() if k.startswith("val/") and isinstance(v, float)}
        print(f"best epoch {best.get('epoch')}: " + "  ".join(f"{k[4:]} {v:.4f}" for k, v in shown.items()))
    table = get_task(build_config(result["task"])).summary_table(metrics) if metrics else None
    if table:
        print(table)
    for f in result.get("files", []):
        print(f"  wrote {f}")


def _refuse_inapplicable(given: dict[str, str], accepted: set[str], task: str) -> None:
    """``given``: option name -> the flag that set it. A flag the run's task has no use for is an
    error naming it, never silently ignored."""
    wrong = [flag for name, flag in given.items() if name not in accepted]
    if wrong:
        raise ConfigError(f"{', '.join(wrong)} does not apply to {task} runs")


def _data_name(data: str) -> str:
    """A short name for evaluation outputs: the dataset's folder (for a file such as a data.yaml
    or ``annotations/instances_val.json``, the folder that holds the dataset), never the file."""
    path = Path(data).expanduser()
    if path.is_file():
        path = path.parent.parent if path.parent.name == "annotations" else path.parent
    name = path.resolve().name if str(data) not in ("", ".") else Path.cwd().name
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in (name or str(data))) or "data"


def cmd_eval(ns: argparse.Namespace) -> int:
    from dinotune import api
    from dinotune.utils import write_json

    loaded = api.load(ns.run, checkpoint_name=ns.checkpoint, device=ns.device, model=ns.model)
    options: dict[str, Any] = {"batch_size": ns.batch_size, "images": ns.images}
    if ns.subset:
        options.update(subset=ns.subset, subset_seed=ns.subset_seed)
    if ns.corruptions:
        from dinotune.robustness import evaluate_corruptions

        out_dir = Path(ns.out) if ns.out else loaded.run_dir / "eval" / f"corruptions-{_data_name(ns.data)}"
        evaluate_corruptions(loaded, ns.data, split=ns.split, names=ns.corruption_names, severities=ns.severities,
                             seed=ns.corruption_seed, out_dir=out_dir, **options)
        print((out_dir / "corruptions.md").read_text())
        print(f"wrote {out_dir / 'corruptions.json'} and {out_dir / 'corruptions.png'}", file=sys.stderr)
        return 0
    metrics = loaded.evaluate(ns.data, split=ns.split, **options)
    out = Path(ns.out) if ns.out else loaded.run_dir / "eval" / f"{_data_name(ns.data)}-{ns.split}.json"
    write_json(out, metrics)
    files = loaded.task.report(out.parent, metrics, loaded.meta)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}, indent=2))
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
    options: dict[str, Any] = {"batch_size": ns.batch_size, "top_k": ns.top_k, "score_threshold": ns.score_threshold,
                               "draw_threshold": ns.draw_threshold, "draw": ns.draw, "masks": ns.masks,
                               "category_ids": ns.category_ids}
    if ns.image_info:
        info = json.loads(Path(ns.image_info).read_text())
        options["image_ids"] = {im["file_name"]: im["id"] for im in info.get("images", [])}
    flags = {"top_k": "--top-k", "score_threshold": "--score-threshold", "draw_threshold": "--draw-threshold",
             "draw": "--draw", "masks": "--masks", "image_ids": "--image-info", "category_ids": "--category-ids"}
    given = {k: flags[k] for k, v in options.items() if v is not None and k in flags}
    options = {k: v for k, v in options.items() if v is not None}
    backend = ns.backend or ("onnx" if _is_export(ns.run) else "torch")
    if backend == "onnx":  # the exported graph in onnxruntime; no torch needed for an export
        predictor = _onnx_predictor(ns)
        from dinotune.runtime.predictor import OPTIONS

        _refuse_inapplicable(given, OPTIONS[predictor.task] | {"draw"}, predictor.task)
        results, format_predictions = predictor.predict(ns.images, **options), predictor.format_predictions
    else:
        if _is_export(ns.run):
            raise ConfigError(f"{ns.run} is an exported ONNX model: predict it with --backend onnx")
        from dinotune import api

        loaded = api.load(ns.run, checkpoint_name=ns.checkpoint, device=ns.device, model=ns.model)
        _refuse_inapplicable(given, loaded.predict_option_names(), loaded.task.name)
        results, format_predictions = loaded.predict(ns.images, **options), loaded.task.format_predictions
    fmt = ns.format or (Path(ns.out).suffix.lstrip(".").lower() if ns.out else "") or "json"
    if fmt not in ("json", "csv"):
        raise ConfigError(f"--out {ns.out}: cannot tell the format from the extension '.{fmt}'; name the file "
                          "*.json or *.csv, or pass --format json|csv")
    text = format_predictions(results, fmt)
    if ns.out:
        from dinotune.utils import atomic_write_text

        atomic_write_text(Path(ns.out), text)
        print(f"wrote predictions for {len(results)} images to {ns.out} ({fmt.upper()})", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _onnx_predictor(ns: argparse.Namespace) -> Any:
    """The ONNX predictor of ``ns.run``: an exported model, or a run folder exported once into
    ``RUN/export/onnx-<checkpoint>`` (reused while the checkpoint is unchanged)."""
    from dinotune.runtime import load_predictor

    target = ns.run
    if not _is_export(target):
        from dinotune.export.onnx import onnx_for_run

        target = onnx_for_run(ns.run, checkpoint_name=ns.checkpoint, model=ns.model)
    return load_predictor(target, device=ns.device)


def cmd_export(ns: argparse.Namespace) -> int:
    from dinotune.export import export

    by_format = {"onnx": {"image_size", "half", "opset", "exporter"}, "torchscript": {"image_size", "half"},
                 "hf": {"push_to_hub", "private"}}
    flags = {"image_size": "--image-size", "half": "--half", "opset": "--opset", "exporter": "--exporter",
             "push_to_hub": "--push-to-hub", "private": "--private"}
    given = {k: getattr(ns, k) for k in flags if getattr(ns, k) not in (None, False)}
    wrong = [flags[k] for k in given if k not in by_format[ns.format]]
    if wrong:
        raise ConfigError(f"{', '.join(wrong)} does not apply to --format {ns.format}")
    out = export(ns.run, ns.out, format=ns.format, checkpoint_name=ns.checkpoint, model=ns.model, **given)
    print(out)
    return 0


def cmd_analyze(ns: argparse.Namespace) -> int:
    from dinotune import api

    files = api.analyze(ns.run, data=ns.data, split=ns.split, out=ns.out, samples=ns.samples,
                        device=ns.device, model=ns.model, draw_threshold=ns.draw_threshold)
    for f in files:
        print(f"wrote {f}")
    return 0


def cmd_pca(ns: argparse.Namespace) -> int:
    from dinotune import api

    path = api.pca(ns.model, [Path(p) for p in ns.images], Path(ns.out), image_size=ns.image_size,
                   foreground_threshold=ns.foreground_threshold, device=ns.device, max_images=ns.max_images)
    print(f"wrote {path}")
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    from dinotune import api

    table = api.compare(data=ns.data, split=ns.split, runs=ns.runs or [], yolo=ns.yolo or [], out=Path(ns.out),
                        images=ns.images, subset=ns.subset, subset_seed=ns.subset_seed, device=ns.device,
                        yolo_image_size=ns.yolo_image_size, batch_size=ns.batch_size, class_map=ns.class_map)
    print(table)
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    from importlib.util import find_spec

    missing = [name for name, modules in (("fastapi", ["fastapi"]), ("uvicorn", ["uvicorn"]),
                                          ("python-multipart", ["python_multipart", "multipart"]))
               if not any(find_spec(m) for m in modules)]
    if missing:
        raise ConfigError(f"dinotune serve needs {', '.join(missing)}: pip install 'dinotune[serve]'")
    from dinotune.serve.app import run_server

    run_server(ns.target, host=ns.host, port=ns.port, device=ns.device, max_upload_mb=ns.max_upload_mb)
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    from dinotune.demo import run_demo

    run_demo(out=ns.out, epochs=ns.epochs, model=ns.model, device=ns.device)
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

    try:
        result = download_dataset(ns.dataset, to=ns.to, splits=ns.splits or (), mirror=ns.mirror,
                                  keep_archives=ns.keep_archives, progress=not ns.quiet)
    except KeyboardInterrupt:
        print("dinotune: download interrupted; run the same command again to resume it (the partial file is kept)",
              file=sys.stderr)
        return 130
    print(result["dir"])
    return 0


def _download_epilog() -> str:
    from dinotune.data.download.catalog import CATALOG, MIRROR_ENV, human_size

    lines = ["datasets: their archives (size; checksum verified) and the layout they give"]
    for entry in CATALOG.values():
        lines.append(f"  {entry.name:12s} {entry.title}; splits {', '.join(entry.splits)}"
                     + (f" ({entry.note})" if entry.note else ""))
        seen: list = []
        for archive in (a for archives in entry.splits.values() for a in archives):
            if archive not in seen:
                seen.append(archive)
                lines.append(f"  {'':12s}   {archive.file_name} ({human_size(archive.size)}; "
                             f"{archive.checksum[0] if archive.checksum else 'no checksum published'})")
        lines.append(f"  {'':12s}   -> {entry.layout}")
    lines += ["", (f"--mirror URL (or ${MIRROR_ENV}) replaces the official base URL: each archive is fetched "
                   "from URL/<its path under the official base> (e.g. URL/zips/val2017.zip for COCO)."),
              "examples:",
              "  dinotune data download hymenoptera",
              "  dinotune data download coco --splits val --to data/coco"]
    return "\n".join(lines)


def _add_data_parser(sub: argparse._SubParsersAction) -> None:
    from dinotune.data.download.catalog import CATALOG

    p_data = sub.add_parser("data", help="get datasets: download and extract the official archives",
                            description="Dataset tools.")
    p_data.set_defaults(func=lambda ns: (p_data.print_help(), 2)[1])
    data_sub = p_data.add_subparsers(dest="data_command", metavar="COMMAND")
    p_dl = data_sub.add_parser(
        "download", help="download coco, voc, ade20k or hymenoptera into data/<name>",
        description="Download a dataset's official archives (streamed with a progress bar, resumed after an "
                    "interruption, checked against the published size and checksum) and extract them into the "
                    "layout dinotune reads. A second call finds the dataset done and does nothing.",
        epilog=_download_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p_dl.add_argument("dataset", choices=list(CATALOG), help="which dataset")
    p_dl.add_argument("--to", metavar="DIR", default=None, help="dataset folder (default: data/<dataset>)")
    p_dl.add_argument("--splits", nargs="+", choices=sorted({s for e in CATALOG.values() for s in e.splits}),
                      default=None,
                      help="splits to get (default: all; VOC, ADE20K and hymenoptera ship both in one archive)")
    p_dl.add_argument("--mirror", metavar="URL", default=None,
                      help="base URL replacing the official one (also $DINOTUNE_DOWNLOAD_MIRROR)")
    p_dl.add_argument("--keep-archives", action="store_true",
                      help="keep the downloaded archives after extraction (default: deleted)")
    p_dl.set_defaults(func=cmd_data_download)


# -------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinotune", description="Fine-tune DINOv2 / DINOv3 (LoRA, DoRA, full or frozen) for vision tasks.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors and results")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="more detail, e.g. the optimizer's parameter groups and learning rates")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_train = sub.add_parser("train", help="train a model and write a run folder",
                             description="Train a model. Flags override --config FILE.yaml, which overrides defaults.",
                             epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p_train.add_argument("--resume", metavar="RUN",
                         help="continue RUN exactly where it stopped, with its own saved settings; only "
                              "--device, --workers and --progress / --no-progress may be given with it")
    p_train.add_argument("--device", dest="resume_device", help=argparse.SUPPRESS)
    p_train.add_argument("--workers", dest="resume_workers", type=int, help=argparse.SUPPRESS)
    p_train.add_argument("--progress", dest="resume_progress", action=argparse.BooleanOptionalAction,
                         help=argparse.SUPPRESS)
    tasks = p_train.add_subparsers(dest="task", metavar="TASK")
    for name, cls in TASK_CONFIGS.items():
        p = tasks.add_parser(name, help=TASK_HELP[name][0].lower() + TASK_HELP[name][1:], description=TASK_HELP[name] + ". " + CONFIG_NOTE)
        p.add_argument("--config", metavar="FILE.yaml", help="start from this config (e.g. a run's config.yaml)")
        p.add_argument("--set", nargs="+", metavar="KEY=VALUE", default=[],
                       help="override any config key, e.g. --set optim.min_lr_ratio=0.01")
        add_config_flags(p, cls)
        p.set_defaults(func=cmd_train)
    p_train.set_defaults(func=cmd_train, task=None)

    sweep_defaults = SweepConfig()
    p_sweep = sub.add_parser("sweep", help="train a grid of settings and compare metric, memory and speed",
                             description="Train every setting of a grid (or an optuna search over it) as a run "
                                         "folder in its own process, and compare them in one table and chart.")
    sweep_tasks = p_sweep.add_subparsers(dest="task", metavar="TASK")
    for name, cls in TASK_CONFIGS.items():
        # "resolve": the sweep's own --out (the sweep folder) replaces the run folder's flag
        p = sweep_tasks.add_parser(
            name, help=f"sweep {name} settings", conflict_handler="resolve",
            description=f"Sweep {name} settings: every option below is the base setting of every trial "
                        "(flags override --config FILE.yaml); --grid names what varies. SWEEP/results.md, "
                        "results.csv and pareto.png compare the trials; calling again continues the sweep.")
        p.add_argument("--config", metavar="FILE.yaml", help="start from this config (e.g. a run's config.yaml)")
        p.add_argument("--set", nargs="+", metavar="KEY=VALUE", default=[],
                       help="override any config key, e.g. --set optim.min_lr_ratio=0.01")
        add_config_flags(p, cls)
        group = p.add_argument_group("sweep options")
        group.add_argument("--out", "-o", dest="sweep_out", default=sweep_defaults.out, metavar="SWEEP",
                           help=f"the sweep folder (default: {sweep_defaults.out}); a second call with the same "
                                "settings continues it, with other settings it is refused")
        group.add_argument("--grid", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
                           help="the settings to try: a train flag without dashes (adapter, rank, lr, backbone-lr) "
                                "or a dotted config key, with comma-separated values (list items joined by +); "
                                "every combination is a trial, settings that do not apply collapse")
        group.add_argument("--linear-grid", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
                           help="classify, frozen backbone: heads trained together on one pass of cached features "
                                "(keys lr, weight-decay, pool, label-smoothing), the best chosen on validation and "
                                "saved as SWEEP/best")
        group.add_argument("--search", choices=["grid", "optuna"], default=None,
                           help=f"grid: every combination; optuna: TPE over the same choices, --trials of them "
                                f"(pip install 'dinotune[sweep]') (default: {sweep_defaults.search})")
        group.add_argument("--trials", type=int, default=None, metavar="N",
                           help=f"--search optuna: trials in all, this call's and earlier ones' (default: "
                                f"{sweep_defaults.trials})")
        group.add_argument("--retry-failed", action="store_true",
                           help="train trials that failed in an earlier call again (by default they stay failed)")
        p.set_defaults(func=cmd_sweep)
    p_sweep.set_defaults(func=cmd_sweep, task=None)

    def add_load_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--checkpoint", choices=["best", "last"], default="best", help="which checkpoint (default: best)")
        p.add_argument("--model", help="where the base backbone weights are, if not where training found them")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default: auto)")
        p.add_argument("--batch-size", type=int, default=None,
                       help="images per batch (default: the run's inference.batch_size)")

    p_eval = sub.add_parser("eval", help="evaluate a run on a dataset (metrics JSON)",
                            description="Metrics of a run on a dataset: classification top-1/top-5/F1/... with "
                                        "a confusion matrix; detection COCO AP/AR with per-class AP and a PR curve.")
    p_eval.add_argument("run", help="run folder (or a checkpoint folder)")
    p_eval.add_argument("--data", required=True,
                        help="as for training: class folders / CSV / dataset, or COCO / YOLO detection data")
    p_eval.add_argument("--split", choices=["val", "train"], default="val",
                        help="split folder to use when --data has train/ and val/ (default: val)")
    p_eval.add_argument("--out", help="metrics JSON path (default: RUN/eval/<data>-<split>.json)")
    p_eval.add_argument("--images", default="", help="detection: COCO image folder, if not found next to the JSON")
    p_eval.add_argument("--subset", type=int, default=0,
                        help="detection / segmentation: evaluate on a reproducible random subset of N images")
    p_eval.add_argument("--subset-seed", type=int, default=0, help="seed of --subset (default: 0)")
    p_eval.add_argument("--corruptions", action="store_true",
                        help="robustness: evaluate under the 15 ImageNet-C corruptions at each severity and write "
                             "a table and a chart (mIoU, top-1 or COCO AP by task); --out is then a folder")
    p_eval.add_argument("--severities", type=int, nargs="+", default=[1, 2, 3, 4, 5],
                        help="corruption severities (default: 1 2 3 4 5)")
    p_eval.add_argument("--corruption-names", nargs="+", metavar="NAME",
                        help="only these corruptions (default: all 15)")
    p_eval.add_argument("--corruption-seed", type=int, default=0, help="seed of the random corruptions (default: 0)")
    add_load_flags(p_eval)
    p_eval.set_defaults(func=cmd_eval)

    p_pred = sub.add_parser("predict", help="predict images or folders (classes or boxes, JSON or CSV)",
                            description="Classification: top-k classes per image. Detection: COCO results "
                                        "JSON (test-dev style) or CSV, optionally drawn images. Segmentation: "
                                        "per-image class pixel shares (JSON or CSV), optionally label PNGs "
                                        "(--masks) and colour overlays (--draw).")
    p_pred.add_argument("run", metavar="RUN_OR_ONNX",
                        help="run folder (or a checkpoint folder), or an exported ONNX model (folder or .onnx file)")
    p_pred.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p_pred.add_argument("--top-k", type=int, default=None,
                        help="classes (classification) or detections (detection) per image (default: the run's "
                             "inference.top_k)")
    p_pred.add_argument("--format", choices=["json", "csv"], help="output format (default: from --out, else json)")
    p_pred.add_argument("--out", help="write to this file instead of stdout")
    p_pred.add_argument("--score-threshold", type=float, default=None,
                        help="detection: drop detections scoring below this (default: the run's "
                             "inference.score_threshold, 0 unless set at training)")
    p_pred.add_argument("--draw", metavar="DIR",
                        help="detection: write each image with its boxes, and confidence_histogram.png, into DIR; "
                             "segmentation: colour overlays into DIR")
    p_pred.add_argument("--masks", metavar="DIR",
                        help="segmentation: write each label map as a palette PNG (pixel values = class indices)")
    p_pred.add_argument("--draw-threshold", type=float, default=None,
                        help="detection: only draw boxes scoring at least this (default: the run's "
                             "inference.draw_threshold)")
    p_pred.add_argument("--category-ids", choices=["coco", "yolo"], default=None,
                        help="detection: category_id in the results: coco = the dataset's ids (YOLO data: class "
                             "index + 1), yolo = the 0-based YOLO class index (default: the run's "
                             "inference.category_ids)")
    p_pred.add_argument("--image-info", metavar="JSON",
                        help="detection: COCO image-info JSON (e.g. image_info_test-dev2017.json) giving image ids")
    p_pred.add_argument("--backend", choices=["torch", "onnx"], default=None,
                        help="torch: the run in PyTorch; onnx: the exported graph in onnxruntime, pre- and "
                             "post-processing in numpy (a run folder is exported once into RUN/export/onnx-<checkpoint>) "
                             "(default: onnx for an exported model, else torch)")
    add_load_flags(p_pred)
    p_pred.set_defaults(func=cmd_predict)

    export_defaults = ExportConfig()
    p_exp = sub.add_parser("export", help="export a run: ONNX (+ the torch-free runtime), TorchScript or transformers",
                           description="Write a run in another format into --out: onnx (one graph, backbone with "
                                       "LoRA / DoRA merged + head + the tensor part of the post-processing, fixed "
                                       "image size, dynamic batch; dinotune_export.json beside it for dinotune.runtime "
                                       "and `dinotune predict DIR`), torchscript (the same graph traced; deprecated by "
                                       "PyTorch) or hf (a classification run as a transformers folder).")
    p_exp.add_argument("run", help="run folder (or a checkpoint folder)")
    p_exp.add_argument("--format", choices=["onnx", "hf", "torchscript"], default="onnx",
                       help="output format (default: onnx)")
    p_exp.add_argument("--out", required=True, help="folder to write (new or empty)")
    p_exp.add_argument("--image-size", type=int, default=None,
                       help="onnx / torchscript: the graph's fixed input side, a multiple of the patch size "
                            "(default: the run's --image-size)")
    p_exp.add_argument("--half", action="store_true",
                       help="onnx / torchscript: fp16 weights and arithmetic inside the graph (inputs and outputs "
                            "stay float32; fastest on a GPU runtime)")
    p_exp.add_argument("--opset", type=int, default=None,
                       help=f"onnx: the ONNX opset (default: {export_defaults.opset}; 17 or later)")
    p_exp.add_argument("--exporter", choices=["dynamo", "legacy"], default=None,
                       help=f"onnx: PyTorch's exporter (default: {export_defaults.exporter}; legacy: the TorchScript "
                            "tracer, deprecated by PyTorch, several times faster to export)")
    p_exp.add_argument("--push-to-hub", metavar="REPO", default=None, help="hf: also upload the folder to this hub repo")
    p_exp.add_argument("--private", action="store_true", help="hf: create the hub repo private")
    p_exp.add_argument("--checkpoint", choices=["best", "last"], default="best", help="which checkpoint (default: best)")
    p_exp.add_argument("--model", help="where the base backbone weights are, if not where training found them")
    p_exp.set_defaults(func=cmd_export)

    p_an = sub.add_parser("analyze", help="charts and sample pictures from a run",
                          description="Training curves, and per task: confusion matrix / per-class F1, or per-class "
                                      "AP, precision-recall curve, confidence histogram and drawn samples.")
    p_an.add_argument("run", help="run folder")
    p_an.add_argument("--data", help="evaluate on this data first (default: the run's best validation metrics)")
    p_an.add_argument("--split", choices=["val", "train"], default="val", help="split of --data (default: val)")
    p_an.add_argument("--out", help="output folder (default: RUN/analysis)")
    p_an.add_argument("--samples", type=int, default=8, help="images to draw (default: 8)")
    p_an.add_argument("--draw-threshold", type=float, default=None,
                      help="detection: draw boxes scoring at least this (default: the run's inference.draw_threshold)")
    p_an.add_argument("--model", help="where the base backbone weights are, if not where training found them")
    p_an.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default: auto)")
    p_an.set_defaults(func=cmd_analyze)

    p_cmp = sub.add_parser("compare", help="compare detectors (our runs, YOLO weights) on the same images",
                           description="Evaluate several detectors on the same images with the same metric code "
                                       "(COCO AP suite, and the single-object metrics) and write one table "
                                       "(JSON + Markdown) and charts.")
    p_cmp.add_argument("--data", required=True, help="COCO folder / JSON or YOLO folder with ground truth")
    p_cmp.add_argument("--split", choices=["val", "train"], default="val", help="split of --data (default: val)")
    p_cmp.add_argument("--images", default="", help="COCO image folder, if not found next to the JSON")
    p_cmp.add_argument("--runs", nargs="+", metavar="RUN", help="dinotune detection runs")
    p_cmp.add_argument("--yolo", nargs="+", metavar="WEIGHTS",
                       help="ultralytics weights (yolov8n.pt ...) or model YAMLs (random weights: their rows are "
                            "marked so); needs pip install 'dinotune[yolo]'")
    p_cmp.add_argument("--class-map", metavar="MAP", default=None,
                       help="YOLO class -> dataset category: MODEL_CLASS=CATEGORY pairs (class index or name, e.g. "
                            "0=person,1=bicycle) or a JSON file {\"0\": \"person\"}; other classes are matched by "
                            "name. Needed when a model shares no class name with the data (a model YAML names its "
                            "classes 0..79)")
    p_cmp.add_argument("--yolo-image-size", type=int, default=None,
                       help="YOLO inference size (default: inference.compare_image_size of the first run, else "
                            f"{DetectConfig().inference.compare_image_size})")
    p_cmp.add_argument("--subset", type=int, default=0, help="evaluate on N random images (0 = all)")
    p_cmp.add_argument("--subset-seed", type=int, default=0, help="seed of --subset (default: 0)")
    p_cmp.add_argument("--out", default="runs/compare", help="output folder (default: runs/compare)")
    p_cmp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default: auto)")
    p_cmp.add_argument("--batch-size", type=int, default=None,
                       help="images per batch for our runs (default: each run's inference.batch_size)")
    p_cmp.set_defaults(func=cmd_compare)

    p_demo = sub.add_parser("demo", help="offline demo: fine-tune on scikit-learn's handwritten digits")
    p_demo.add_argument("--out", default="runs/demo", help="run folder (default: runs/demo)")
    p_demo.add_argument("--epochs", type=int, default=None, help="epochs (default: 20 random-init, 3 pretrained)")
    p_demo.add_argument("--model", default="facebook/dinov2-small",
                        help="backbone; falls back to random:tiny when the hub cannot be reached")
    p_demo.add_argument("--device", default="auto", help="auto, cpu, cuda, mps (default: auto)")
    p_demo.set_defaults(func=cmd_demo)

    p_pca = sub.add_parser("pca", help="PCA of patch features as RGB pictures (any backbone or run)",
                           description="The first three principal components of the patch features, fitted "
                                       "jointly over the given images, shown as RGB beside each image.")
    p_pca.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p_pca.add_argument("--max-images", type=int, default=PcaConfig().max_images,
                       help=f"use at most this many images, one figure row each (default: {PcaConfig().max_images})")
    p_pca.add_argument("--model", required=True, help="a backbone (--model forms) or a dinotune run folder")
    p_pca.add_argument("--out", default="pca.png", help="output PNG (default: pca.png)")
    p_pca.add_argument("--image-size", type=int, default=None,
                       help=f"short side in pixels (default: the run's size, else {PcaConfig().image_size})")
    p_pca.add_argument("--foreground-threshold", type=float, default=None,
                       help="black out patches whose first component is below this (0-1), as DINOv2's demo")
    p_pca.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default: auto)")
    p_pca.set_defaults(func=cmd_pca)

    serve = ServeConfig()
    p_serve = sub.add_parser("serve", help="serve a run or an exported ONNX model over HTTP, with an upload page",
                             description="An HTTP server for one model: the page at / (upload an image, see the "
                                         "top-k bars, boxes or mask drawn), POST /predict (multipart field 'file' "
                                         "-> the JSON record of dinotune predict; ?overlay=1 adds the drawing) and "
                                         "GET /health. Needs pip install 'dinotune[serve]'.")
    p_serve.add_argument("target", metavar="RUN_OR_ONNX",
                         help="a run folder (or checkpoint folder), or an exported .onnx file / folder")
    p_serve.add_argument("--host", default=serve.host, help=f"address to listen on (default: {serve.host})")
    p_serve.add_argument("--port", type=int, default=serve.port, help=f"TCP port (default: {serve.port})")
    p_serve.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default: auto; runs only)")
    p_serve.add_argument("--max-upload-mb", type=float, default=serve.max_upload_mb,
                         help=f"largest upload in MB; larger ones get 413 (default: {serve.max_upload_mb:g})")
    p_serve.set_defaults(func=cmd_serve)

    p_models = sub.add_parser("models", help="list the backbones --model accepts (DINOv2, DINOv3), by family")
    p_models.set_defaults(func=cmd_models)

    _add_data_parser(sub)
    return parser


_RESUME_FLAGS = ("--resume", "--device", "--workers", "--progress", "--no-progress")


def _refuse_resume_extras(argv: list[str]) -> None:
    """``train --resume RUN`` continues a run with its saved settings: anything but the few flags
    that change where it runs is refused by name (argparse would report a puzzling 'invalid
    choice' for the task)."""
    if not argv or argv[0] != "train" or not any(a == "--resume" or a.startswith("--resume=") for a in argv):
        return
    extras, skip = [], False
    for a in argv[1:]:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in _RESUME_FLAGS:
            skip = "=" not in a and name in ("--resume", "--device", "--workers")
        elif a in ("-h", "--help"):
            return
        else:
            extras.append(a)
    if extras:
        raise ConfigError(f"--resume continues a run with its own saved settings and takes only --device, "
                          f"--workers and --progress / --no-progress; got {' '.join(extras)}")


def _one_line(exc: BaseException) -> str:
    """The message of ``exc``; for an error raised in a DataLoader worker (torch re-raises it with
    "Caught X in DataLoader worker process N. Original Traceback ...") the original message, so the
    user reads the same line as with ``--workers 0``."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    prefix = f"{type(exc).__name__}: "
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if prefix in line and not line.startswith(" ")]
    if not starts:
        return text
    return "\n".join([lines[starts[-1]].split(prefix, 1)[1], *lines[starts[-1] + 1:]]).strip()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        _refuse_resume_extras(argv)
    except ConfigError as exc:
        print(f"dinotune: error: {exc}", file=sys.stderr)
        return 2
    ns = parser.parse_args(argv)
    if not getattr(ns, "func", None):
        parser.print_help()
        return 2
    from dinotune.utils import set_quiet, set_verbose

    set_quiet(ns.quiet)
    set_verbose(ns.verbose)
    try:
        return ns.func(ns)
    except _known_errors() as exc:
        print(f"dinotune: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dinotune: interrupted; resume with `dinotune train --resume RUN`", file=sys.stderr)
        return 130
    finally:
        if "torch" in sys.modules:  # nothing distributed without torch (`predict --backend onnx` needs none)
            from dinotune.engine.distributed import cleanup

            cleanup()


if __name__ == "__main__":
    sys.exit(main())
