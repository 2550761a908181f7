"""Config trees to and from dicts, YAML files, dotted keys and command-line flags."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from dinotune.config.base import ConfigError
from dinotune.config.yaml_files import read_yaml, yaml_text


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a command line string) to the annotated type ``tp``."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if type(None) in get_args(tp) and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        for arg in args:  # the first member that takes the value (int | Literal["auto"]: 32, or auto)
            try:
                return coerce(value, arg, key)
            except ConfigError:
                pass
        kinds = [", ".join(map(str, get_args(a))) if get_origin(a) is Literal else _type_name(a) for a in args]
        raise ConfigError(f"{key} must be {' or '.join(kinds)}, got {value!r}")
    if origin is list:
        (inner,) = get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        elif isinstance(value, (list, tuple)) and inner in (int, float):  # --rgb-bands 3,2,1 as well as 3 2 1
            value = [part for v in value for part in (v.replace(",", " ").split() if isinstance(v, str) else [v])]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [coerce(v, inner, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}") from None
    return value


# Keys that moved, ``old -> new``: run folders written before the move still load.
MOVED_KEYS = {"model.topk": "inference.top_k", "model.score_threshold": "inference.score_threshold"}


# Keys added to the configs after run folders were already being written (the inference sections and
# a few model / data keys, all in one change): a saved config may lack them and gets their defaults,
# the behaviour those runs were trained with. A key added later belongs here too.
ADDED_KEYS = frozenset({
    "inference.batch_size", "inference.top_k", "inference.score_threshold", "inference.draw_threshold",
    "inference.compare_image_size", "inference.window_batch", "model.single_dropout", "model.single_hidden",
    "data.scale_range", "data.max_image_pixels",
    # the training options (checkpointing, compile, EMA, early stopping, trackers, layer decay, sampler) and
    # N-band input: runs without them trained plainly on RGB pictures, which these defaults keep
    "train.grad_checkpointing", "train.compile", "train.ema", "train.patience", "train.min_delta",
    "train.report_to", "train.threads", "data.class_names", "data.subset", "data.val_subset", "data.subset_seed", "optim.layer_decay", "data.sampler",
    # the monitored metric: runs without it picked their best epoch by the task's metric, which auto picks
    "train.monitor", "train.monitor_mode",
    "bands.in_channels", "bands.rgb_bands", "bands.layout", "bands.stats", "bands.mean", "bands.std",
    # the Faster R-CNN head and baselines: runs without them had another head, which ignores these
    "model.rcnn_anchor_scales", "model.rcnn_aspect_ratios", "model.rcnn_rpn_batch", "model.rcnn_roi_batch",
    "model.rcnn_score_threshold", "model.baseline", "model.baseline_weights",
    # segmentation colour tables: runs without one read masks as class indices, which "" keeps
    "data.mask_colors",
    # training from a scene: runs without these trained on a dataset, which their defaults keep
    "data.labels", "data.tile", "data.class_field", "data.min_visible", "data.empty_rate", "data.block",
    "data.tiles_per_epoch", "data.tile_sampling", "data.val_fraction",
})

_INCOMPLETE_HINT = ("a config.yaml dinotune saves holds every key, so this one was cut or edited. Restore "
                    "it (the run folder's config.yaml and each checkpoint's hold the same settings) or write "
                    "the missing keys back with the values the run was trained with")

_ABSENT = object()


def _moved(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the values of moved keys under their new names (new names win)."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for old, new in MOVED_KEYS.items():
        (osec, okey), (nsec, nkey) = old.split("."), new.split(".")
        if isinstance(data.get(osec), dict) and okey in data[osec]:
            value = data[osec].pop(okey)
            section = data.setdefault(nsec, {})
            if isinstance(section, dict):
                section.setdefault(nkey, value)
    return data


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build the dataclass ``cls`` from a nested dict, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    if not prefix:
        data = _moved(data)
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown config key {full!r}; valid keys: {', '.join(known)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value or {}, prefix=f"{full}.")
        else:
            kwargs[key] = coerce(value, tp, full)
    return cls(**kwargs)


def save_yaml(cfg: Any, path: str | Path) -> None:
    from dinotune.utils import atomic_write_text

    atomic_write_text(Path(path), yaml_text(to_dict(cfg)))


def load_yaml(path: str | Path, cls: type | None = None, complete: bool = False) -> Any:
    """A config from a YAML file. Keys the file leaves out take their defaults, unless
    ``complete``: a file dinotune saved (a run's or a checkpoint's ``config.yaml``) holds every key,
    so a missing one means the file was cut or edited, and silently filling in a default would
    rebuild a different model (e.g. evaluate at 224 px a model trained at 56)."""
    path = Path(path)
    data = read_yaml(path) or {}  # bounded: size, alias expansion, depth; duplicate keys refused
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(data).__name__}")
    if complete and "task" not in data:
        raise ConfigError(f"{path}: this saved config lacks the key 'task'; {_INCOMPLETE_HINT}")
    if cls is None:
        from dinotune.config import TASK_CONFIGS  # the package imports this module first

        task = data.get("task", "classify")
        if task not in TASK_CONFIGS:
            raise ConfigError(f"{path}: unknown task {task!r}; valid: {', '.join(TASK_CONFIGS)}")
        cls = TASK_CONFIGS[task]
    try:
        cfg = from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if complete:
        _require_complete(path, cls, data)
    return cfg


def load_run_config(path: str | Path) -> Any:
    """The config a run saved (``RUN/config.yaml`` or ``RUN/checkpoints/NAME/config.yaml``): every
    key must be there (keys that moved or were added since older runs excepted)."""
    return load_yaml(path, complete=True)


def missing_keys(cls: type, data: dict[str, Any]) -> list[str]:
    """Dotted keys of the config class ``cls`` that ``data`` (as read from YAML) does not set,
    after moved keys are renamed, and not counting ``ADDED_KEYS``."""
    data = _moved(data)
    missing = []
    for key, _, _ in leaf_fields(cls):
        node: Any = data
        for part in key.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is _ABSENT and key not in ADDED_KEYS:
            missing.append(key)
    return missing


def _require_complete(path: Path, cls: type, data: dict[str, Any]) -> None:
    missing = missing_keys(cls, data)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ConfigError(f"{path}: this saved config lacks {shown}; {_INCOMPLETE_HINT}")


def leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """All leaf fields of a config tree as ``(dotted.key, field, annotated type)``."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(leaf_fields(tp, f"{prefix}{f.name}."))
        else:
            out.append((f"{prefix}{f.name}", f, tp))
    return out


def set_dotted(cfg: Any, key: str, value: Any) -> None:
    """Set ``a.b.c`` on a config tree, coercing ``value`` to the field's type."""
    *parents, last = key.split(".")
    obj = cfg
    for p in parents:
        if not hasattr(obj, p) or not dataclasses.is_dataclass(getattr(obj, p)):
            raise ConfigError(f"unknown config key {key!r}")
        obj = getattr(obj, p)
    hints = typing.get_type_hints(type(obj))
    if last not in hints or dataclasses.is_dataclass(hints[last]):
        raise ConfigError(f"unknown config key {key!r}")
    setattr(obj, last, coerce(value, hints[last], key))


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    for key, value in overrides.items():
        set_dotted(cfg, key, value)
    return cfg


def flag_name(key: str, f: dataclasses.Field) -> str:
    """The command-line flag of a leaf field: its ``metadata['flag']`` or ``--<field-name>``."""
    return f.metadata.get("flag") or "--" + key.rsplit(".", 1)[-1].replace("_", "-")


def flag_map(cls: type) -> dict[str, str]:
    """``{"--adapter": "adapter.kind", "--rank": "adapter.rank", ...}`` for a task config class."""
    out: dict[str, str] = {}
    for key, f, _ in leaf_fields(cls):
        if key == "task":
            continue
        flag = flag_name(key, f)
        if flag in out:
            raise AssertionError(f"two config fields share the flag {flag}: {out[flag]} and {key}")
        out[flag] = key
    return out
