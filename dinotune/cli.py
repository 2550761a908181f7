"""The ``dinotune`` command: parses flags into a config or API options and calls the Python API.

Its own logic is limited to the command line: flag parsing, refusing flags that do not apply to a
run's task (asked of the task, not decided by its name), and printing results.

Every command's flags and operands are made from a typed config (``add_config_flags``): the task
configs for ``train`` / ``sweep``, ``config/commands.py`` and ``config/tools.py`` for the others, and
for ``predict`` also the task configs' ``inference`` sections and ``predict_options``. Written by hand
are only the options that are no config field: ``-q`` / ``-v``, ``train --resume`` (with the three
settings a resumed run may change, passed to the API as they are), ``--config`` and ``--set``."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Mapping, Sequence, Union, get_args, get_origin

from dinotune.config import (
    TASK_CONFIGS,
    ConfigError,
    check_ranges,
    coerce,
    flag_map,
    flag_name,
    leaf_fields,
    set_dotted,
)
from dinotune.config.commands import (
    AnalyzeConfig,
    CompareConfig,
    DemoConfig,
    DownloadConfig,
    EvalConfig,
    PredictConfig,
)
from dinotune.config.tools import EXPORT_FORMAT_OPTIONS, ExportConfig, PcaConfig, ServeConfig, SweepConfig
from dinotune.tasks import registry

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


def _literal_choices(tp: Any) -> list[Any] | None:
    """The values of a ``Literal`` (or of an optional one, ``Literal["json", "csv"] | None``)."""
    if get_origin(tp) in (Union, UnionType):
        members = [a for a in get_args(tp) if a is not type(None)]
        tp = members[0] if len(members) == 1 else tp
    return list(get_args(tp)) if get_origin(tp) is Literal else None


def _help_text(meta: Mapping[str, Any], default_text: str | None) -> str:
    """A field's help with ``(default: X)``; an operand or a required flag has no default to show."""
    text = meta.get("help", "")
    if default_text is not None and not (meta.get("positional") or meta.get("required")):
        text += f" (default: {default_text})"
    return text.replace("%", "%%")


def _add_argument(target: Any, key: str, meta: Mapping[str, Any], tp: Any, help_text: str,
                  choices: Sequence[Any] | None = None) -> None:
    """One flag (or operand) for the config field ``key`` of type ``tp``. A flag's default is left out
    of the namespace (``argparse.SUPPRESS``): what is there was given, and ``command_config`` /
    ``_overrides`` fill in the rest from the config, so no default is repeated here."""
    choices = list(choices) if choices else _literal_choices(tp)
    kw: dict[str, Any] = {"help": help_text}
    if choices:
        kw["choices"] = choices
    if get_origin(tp) is list:
        kw["nargs"] = "+"
        if meta.get("repeatable") and not meta.get("positional"):
            kw["action"] = "extend"
    if meta.get("positional"):
        target.add_argument(key, metavar=meta.get("metavar"), **kw)
        return
    names = [meta.get("flag") or "--" + key.rsplit(".", 1)[-1].replace("_", "-")]
    names += [meta["short"]] if meta.get("short") else []
    kw.update(dest=key, default=argparse.SUPPRESS)
    if meta.get("required"):
        kw["required"] = True
    if tp is bool:
        action = argparse.BooleanOptionalAction if meta.get("negatable", True) else "store_true"
        target.add_argument(*names, action=action, **kw)
        return
    kw["metavar"] = meta.get("metavar") or (None if choices else _metavar(key, tp))
    target.add_argument(*names, **kw)


def add_config_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                     choices: Mapping[str, Sequence[Any]] | None = None) -> None:
    """One flag per config field (an operand per ``positional`` field), with its help text and
    default; unset flags are not overrides. Fields of a section (``adapter.rank``) are grouped under
    it. ``choices``: the valid values of fields only known at run time (key -> values), e.g. the
    datasets of the download catalog."""
    defaults = cls()
    flag_map(cls)  # refuses two fields with one flag
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, f, tp in leaf_fields(cls):
        if key == "task":
            continue
        default = defaults
        for part in key.split("."):
            default = getattr(default, part)
        target: Any = parser
        if "." in key:
            section = key.split(".")[0]
            if section not in groups:
                groups[section] = parser.add_argument_group(f"{section} options")
            target = groups[section]
        shown = f.metadata.get("default_text") or repr(default)
        _add_argument(target, key, f.metadata, tp, _help_text(f.metadata, shown), (choices or {}).get(key))


def add_task_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """``train`` / ``sweep``'s flags of the task config ``cls``, after the two that are not a field:
    the config file to start from and ``--set`` for any key (a key without a flag included)."""
    parser.add_argument("--config", metavar="FILE.yaml", help="start from this config (e.g. a run's config.yaml)")
    parser.add_argument("--set", nargs="+", metavar="KEY=VALUE", default=[],
                        help="override any config key, e.g. --set optim.min_lr_ratio=0.01")
    add_config_flags(parser, cls)


def command_config(ns: argparse.Namespace, cls: type) -> tuple[Any, set[str]]:
    """The config of a command (``EvalConfig``, ...) from its parsed flags: the config's defaults with
    the given values coerced to the fields' types and range-checked (ConfigError naming the flag),
    and the keys that were given."""
    cfg = cls()
    given = set()
    for key, f, tp in leaf_fields(cls):
        if hasattr(ns, key):
            set_dotted(cfg, key, coerce(getattr(ns, key), tp, flag_name(key, f)))  # errors name the flag
            given.add(key)
    check_ranges(cfg)
    return cfg, given


@dataclass
class _TaskOption:
    """A ``predict`` flag made from the task configs: the type and texts of one option name."""

    meta: dict[str, Any]
    type: Any
    helps: list[str] = field(default_factory=list)  # "task: help" per task that has it
    defaults: list[tuple[str, str]] = field(default_factory=list)  # (task, what its default is)


def _merged_type(a: Any, b: Any, flag: str) -> Any:
    if a == b:
        return a
    ca, cb = _literal_choices(a), _literal_choices(b)
    if ca is None or cb is None:
        raise AssertionError(f"predict {flag}: task configs declare it with different types ({a} and {b})")
    return Literal[tuple(dict.fromkeys(ca + cb))]  # type: ignore[misc]


def predict_task_options() -> dict[str, _TaskOption]:
    """``predict``'s task options by name: the fields of every registered task config's ``inference``
    section (default: the run's own) and of its ``predict_options`` dataclass. An option several
    tasks have is one flag whose help joins theirs (``detect: ...; segment: ...``); ``PredictConfig``'s
    own fields (``batch_size``) are its flags, not these."""
    own = {key for key, _, _ in leaf_fields(PredictConfig)}
    out: dict[str, _TaskOption] = {}
    for task, cls in TASK_CONFIGS.items():
        inference = typing.get_type_hints(cls).get("inference")
        fields = [(f, tp, f"the run's inference.{f.name}")
                  for _, f, tp in (leaf_fields(inference) if inference else [])]
        extra = getattr(cls, "predict_options", None)
        fields += [(f, tp, f.metadata.get("default_text") or repr(f.default)) for _, f, tp in
                   (leaf_fields(extra) if extra else [])]
        for f, tp, default_text in fields:
            if f.name in own:
                continue
            flag = flag_name(f.name, f)
            option = out.setdefault(f.name, _TaskOption({"flag": flag}, tp))
            option.type = _merged_type(option.type, tp, flag)
            for name in ("metavar", "negatable"):
                if option.meta.get(name) is None and f.metadata.get(name) is not None:
                    option.meta[name] = f.metadata[name]
            option.helps.append(f"{task}: {f.metadata.get('help', '')}")
            option.defaults.append((task, default_text))
    return out


def _add_predict_task_flags(parser: argparse.ArgumentParser) -> None:
    """The task options of ``predict`` (see ``predict_task_options``), in a group of their own."""
    group = parser.add_argument_group("task options (refused for runs of a task that has no use for them)")
    for name, option in predict_task_options().items():
        texts = {text for _, text in option.defaults}
        default = texts.pop() if len(texts) == 1 else "; ".join(f"{task}: {text}" for task, text in option.defaults)
        _add_argument(group, name, option.meta, option.type, _help_text({"help": "; ".join(option.helps)}, default))


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
        shown = {k: v for k, v in best.items() if k.startswith("val/") and isinstance(v, float)}
        print(f"best epoch {best.get('epoch')}: " + "  ".join(f"{k[4:]} {v:.4f}" for k, v in shown.items()))
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

    cfg, _ = command_config(ns, EvalConfig)
    loaded = api.load(cfg.run, checkpoint_name=cfg.checkpoint, device=cfg.device, model=cfg.model or None)
    options: dict[str, Any] = {"batch_size": cfg.batch_size, "images": cfg.images}
    if cfg.subset:
        options.update(subset=cfg.subset, subset_seed=cfg.subset_seed)
    if cfg.corruptions:
        from dinotune.robustness import evaluate_corruptions

        out_dir = Path(cfg.out) if cfg.out else loaded.layout.eval_dir / f"corruptions-{_data_name(cfg.data)}"
        evaluate_corruptions(loaded, cfg.data, split=cfg.split, names=cfg.corruption_names or None,
                             severities=cfg.severities, seed=cfg.corruption_seed, out_dir=out_dir, **options)
        print((out_dir / "corruptions.md").read_text())
        print(f"wrote {out_dir / 'corruptions.json'} and {out_dir / 'corruptions.png'}", file=sys.stderr)
        return 0
    metrics = loaded.evaluate(cfg.data, split=cfg.split, **options)
    out = Path(cfg.out) if cfg.out else loaded.layout.eval_dir / f"{_data_name(cfg.data)}-{cfg.split}.json"
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
    cfg, _ = command_config(ns, PredictConfig)
    # the task options given, typed; which of them the run's task takes is asked of the run
    task_options = predict_task_options()
    given = {name: coerce(getattr(ns, name), option.type, option.meta["flag"])
             for name, option in task_options.items() if hasattr(ns, name)}
    flags = {name: task_options[name].meta["flag"] for name in given}
    options = {**given, **({"batch_size": cfg.batch_size} if cfg.batch_size is not None else {})}
    backend = cfg.backend or ("onnx" if _is_export(cfg.run) else "torch")
    if backend == "onnx":  # the exported graph in onnxruntime; no torch needed for an export
        predictor = _onnx_predictor(cfg)
        _refuse_inapplicable(flags, set(predictor.options), f"{predictor.task} runs with --backend onnx")
        results, format_predictions = predictor.predict(cfg.images, **options), predictor.format_predictions
    else:
        if _is_export(cfg.run):
            raise ConfigError(f"{cfg.run} is an exported ONNX model: predict it with --backend onnx")
        from dinotune import api

        loaded = api.load(cfg.run, checkpoint_name=cfg.checkpoint, device=cfg.device, model=cfg.model or None)
        _refuse_inapplicable(flags, loaded.predict_option_names(), f"{loaded.task.name} runs")
        results, format_predictions = loaded.predict(cfg.images, **options), loaded.task.format_predictions
    fmt = cfg.format or (Path(cfg.out).suffix.lstrip(".").lower() if cfg.out else "") or "json"
    if fmt not in ("json", "csv"):
        raise ConfigError(f"--out {cfg.out}: cannot tell the format from the extension '.{fmt}'; name the file "
                          "*.json or *.csv, or pass --format json|csv")
    text = format_predictions(results, fmt)
    if cfg.out:
        from dinotune.utils import atomic_write_text

        atomic_write_text(Path(cfg.out), text)
        print(f"wrote predictions for {len(results)} images to {cfg.out} ({fmt.upper()})", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


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

    run_server(cfg.target, host=cfg.host, port=cfg.port, device=cfg.device, max_upload_mb=cfg.max_upload_mb)
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
    splits = sorted({s for e in CATALOG.values() for s in e.splits})
    add_config_flags(p_dl, DownloadConfig, choices={"dataset": list(CATALOG), "splits": splits})
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
        text = registry.entry(name).help
        p = tasks.add_parser(name, help=text[0].lower() + text[1:], description=text + ". " + CONFIG_NOTE)
        add_task_config_flags(p, cls)
        p.set_defaults(func=cmd_train)
    p_train.set_defaults(func=cmd_train, task=None)

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
        add_task_config_flags(p, cls)
        add_config_flags(p.add_argument_group("sweep options"), SweepConfig)
        p.set_defaults(func=cmd_sweep)
    p_sweep.set_defaults(func=cmd_sweep, task=None)

    p_eval = sub.add_parser("eval", help="evaluate a run on a dataset (metrics JSON)",
                            description="Metrics of a run on a dataset: classification top-1/top-5/F1/... with "
                                        "a confusion matrix; detection COCO AP/AR with per-class AP and a PR curve.")
    add_config_flags(p_eval, EvalConfig)
    p_eval.set_defaults(func=cmd_eval)

    p_pred = sub.add_parser("predict", help="predict images or folders (classes or boxes, JSON or CSV)",
                            description="Classification: top-k classes per image. Detection: COCO results "
                                        "JSON (test-dev style) or CSV, optionally drawn images. Segmentation: "
                                        "per-image class pixel shares (JSON or CSV), optionally label PNGs "
                                        "(--masks) and colour overlays (--draw).")
    add_config_flags(p_pred, PredictConfig)
    _add_predict_task_flags(p_pred)
    p_pred.set_defaults(func=cmd_predict)

    p_exp = sub.add_parser("export", help="export a run: ONNX (+ the torch-free runtime), TorchScript or transformers",
                           description="Write a run in another format into --out: onnx (one graph, backbone with "
                                       "LoRA / DoRA merged + head + the tensor part of the post-processing, fixed "
                                       "image size, dynamic batch; dinotune_export.json beside it for dinotune.runtime "
                                       "and `dinotune predict DIR`), torchscript (the same graph traced; deprecated by "
                                       "PyTorch) or hf (a classification run as a transformers folder).")
    add_config_flags(p_exp, ExportConfig)
    p_exp.set_defaults(func=cmd_export)

    p_an = sub.add_parser("analyze", help="charts and sample pictures from a run",
                          description="Training curves, and per task: confusion matrix / per-class F1, or per-class "
                                      "AP, precision-recall curve, confidence histogram and drawn samples.")
    add_config_flags(p_an, AnalyzeConfig)
    p_an.set_defaults(func=cmd_analyze)

    p_cmp = sub.add_parser("compare", help="compare detectors (our runs, YOLO weights) on the same images",
                           description="Evaluate several detectors on the same images with the same metric code "
                                       "(COCO AP suite, and the single-object metrics) and write one table "
                                       "(JSON + Markdown) and charts.")
    add_config_flags(p_cmp, CompareConfig)
    p_cmp.set_defaults(func=cmd_compare)

    p_demo = sub.add_parser("demo", help="offline demo: fine-tune on scikit-learn's handwritten digits")
    add_config_flags(p_demo, DemoConfig)
    p_demo.set_defaults(func=cmd_demo)

    p_pca = sub.add_parser("pca", help="PCA of patch features as RGB pictures (any backbone or run)",
                           description="The first three principal components of the patch features, fitted "
                                       "jointly over the given images, shown as RGB beside each image.")
    add_config_flags(p_pca, PcaConfig)
    p_pca.set_defaults(func=cmd_pca)

    p_serve = sub.add_parser("serve", help="serve a run or an exported ONNX model over HTTP, with an upload page",
                             description="An HTTP server for one model: the page at / (upload an image, see the "
                                         "top-k bars, boxes or mask drawn), POST /predict (multipart field 'file' "
                                         "-> the JSON record of dinotune predict; ?overlay=1 adds the drawing) and "
                                         "GET /health. Needs pip install 'dinotune[serve]'.")
    add_config_flags(p_serve, ServeConfig)
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
