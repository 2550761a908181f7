"""The settings a sweep tries: ``--grid KEY=V1,V2 ...`` parsed against a task config, expanded into
trials, with the combinations that differ only in settings that do not apply collapsed into one.

A key is a train flag without its dashes (``adapter``, ``rank``, ``lr``, ``backbone-lr`` or
``backbone_lr``) or a dotted config key (``optim.backbone_lr``); values are separated by commas,
and the items of a list setting by ``+`` (``targets=attention,q_proj+v_proj``). Every value is
coerced by the config's own types, so a bad key or value is refused, by name, before anything runs.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, get_origin

from dinotune.adapters import adapter_for
from dinotune.config import ConfigError, build_config, coerce, flag_map, leaf_fields, to_dict

# The most combinations a grid may make: each is a trial trained in its own process (minutes to hours,
# so a thousand is already days), and expanding the grid to check them takes ~1.5 ms each (a million
# took 25 minutes before the first trial). Counted as a product of the axes, never by expanding.
MAX_COMBINATIONS = 1000

# Keys a sweep owns (each trial's folder) or that name the config's kind: never a grid axis.
RESERVED = {"train.out": "the sweep names each trial's run folder itself (give the sweep folder with --out)"}

# Settings that do nothing under other settings: trials differing only in them are one trial.
# (keys, applies(cfg), why not: said as "<key> does not apply when <why>"); a rule is asked only
# about keys the task's config has. These are the sections every task config shares; a task config
# adds the rules of its own keys with a ``sweep_rules()`` classmethod (see ``rules``).
SweepRule = tuple[tuple[str, ...], Callable[[Any], bool], Callable[[Any], str]]
APPLICABILITY: tuple[SweepRule, ...] = (
    (("adapter.rank", "adapter.alpha", "adapter.dropout", "adapter.targets", "adapter.last_n_blocks"),
     lambda c: adapter_for(c.adapter.kind).uses_peft,
     lambda c: f"adapter={c.adapter.kind} (only LoRA and DoRA use it)"),
    (("optim.backbone_lr", "optim.layer_decay"),
     lambda c: adapter_for(c.adapter.kind).trains_backbone,
     lambda c: f"adapter={c.adapter.kind} (the backbone is frozen)"),
    (("train.stage1_epochs", "train.stage1_lr", "train.stage2_epochs", "train.stage2_lr"),
     lambda c: c.train.two_stage, lambda c: "two-stage training is off"),
    (("train.epochs",), lambda c: not c.train.two_stage, lambda c: "two-stage training is on (its stages set the epochs)"),
    (("train.min_delta",), lambda c: c.train.patience > 0, lambda c: "early stopping is off (patience 0)"),
)


@dataclass(frozen=True)
class Axis:
    """One grid key: ``name`` as shown (the flag without dashes), ``key`` the dotted config key,
    ``labels`` the values as written and ``values`` the same coerced to the field's type."""

    name: str
    key: str
    labels: tuple[str, ...]
    values: tuple[Any, ...]


@dataclass
class Trial:
    """One setting to train: ``name`` (its folder name), ``settings`` (axis name -> label, only
    the axes that apply), ``overrides`` (dotted key -> value), the resolved task ``config`` and
    its task's ``monitor``."""

    name: str
    settings: dict[str, str]
    overrides: dict[str, Any]
    config: Any = field(repr=False)
    monitor: str = ""  # the metric its run picks its best epoch by (set when the sweep places it)


@dataclass
class Expansion:
    """The trials of a grid and what was collapsed on the way (``notes``, one line each)."""

    trials: list[Trial]
    combinations: int
    notes: list[str]


def key_names(cls: type) -> dict[str, str]:
    """Every name a grid key may take for the task config ``cls`` -> its dotted key: the flag
    without dashes, the same with underscores, and the dotted key itself."""
    names: dict[str, str] = {}
    for flag, key in flag_map(cls).items():
        bare = flag.lstrip("-")
        names[bare] = key
        names[bare.replace("-", "_")] = key
        names[key] = key
    return names


def display_name(cls: type, key: str) -> str:
    """``optim.backbone_lr`` -> ``backbone-lr`` (its flag without dashes)."""
    flags = {k: f for f, k in flag_map(cls).items()}
    return flags.get(key, "--" + key).lstrip("-")


def resolve_key(cls: type, name: str, option: str = "--grid") -> str:
    """The dotted config key for a grid key, or a ConfigError naming it (with the closest names)."""
    names = key_names(cls)
    clean = name.strip().lstrip("-")
    key = names.get(clean)
    if key is None:
        close = difflib.get_close_matches(clean, list(names), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else " (use a train flag without dashes, e.g. lr, or a dotted config key)"
        raise ConfigError(f"{option} {name}: not a setting of {cls().task} runs{hint}")
    if key in RESERVED:
        raise ConfigError(f"{option} {name}: {RESERVED[key]}")
    return key


def _types(cls: type) -> dict[str, Any]:
    return {key: tp for key, _, tp in leaf_fields(cls)}


def parse_axes(cls: type, items: Iterable[str], option: str = "--grid") -> tuple[list[Axis], list[str]]:
    """``["adapter=none,lora", "lr=1e-4,3e-4"]`` -> axes in the given order, and notes on values
    repeated under another spelling (``1e-4,0.0001``: one value)."""
    types = _types(cls)
    axes: list[Axis] = []
    notes: list[str] = []
    seen: dict[str, str] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"{option} expects KEY=V1,V2,..., got {item!r}")
        key = resolve_key(cls, name, option)
        shown = display_name(cls, key)
        if key in seen:
            raise ConfigError(f"{option}: {shown} is given twice ({seen[key]} and {name.strip()}); list its values once")
        seen[key] = name.strip()
        parts = text.split(",")
        if len(parts) > MAX_COMBINATIONS:
            raise ConfigError(f"{option} {shown}: {len(parts):,} values; a sweep tries at most "
                              f"{MAX_COMBINATIONS:,} combinations")
        labels, values = [], []
        for label in (v.strip() for v in parts):
            if not label:
                raise ConfigError(f"{option} {item}: an empty value for {shown}")
            is_list = get_origin(types[key]) is list
            value = coerce(label.replace("+", " ") if is_list else label, types[key], key)
            if value in values:
                first = labels[values.index(value)]
                notes.append(f"{shown}: {label} is {first} again; tried once")
                continue
            labels.append(label)
            values.append(value)
        axes.append(Axis(shown, key, tuple(labels), tuple(values)))
    return axes, notes


def combinations(axes: Iterable[Axis]) -> int:
    """How many combinations the axes make: the product of their value counts."""
    return math.prod(len(a.labels) for a in axes)


def check_size(axes: list[Axis], option: str = "--grid") -> int:
    """The number of combinations, or a ConfigError saying it when over ``MAX_COMBINATIONS``."""
    count = combinations(axes)
    if count > MAX_COMBINATIONS:
        sizes = " x ".join(f"{len(a.labels)} {a.name}" for a in axes)
        raise ConfigError(f"{option} makes {count:,} combinations ({sizes}); a sweep tries at most "
                          f"{MAX_COMBINATIONS:,}, each trained in turn. List fewer values"
                          + (", or let --search optuna --trials N pick among them" if option == "--grid" else ""))
    return count


def rules(cfg: Any) -> tuple[SweepRule, ...]:
    """The applicability rules of a task config: the shared ones and its class's own
    (``sweep_rules()``, e.g. classification's ``head.mlp_hidden`` only with the mlp head)."""
    own = getattr(type(cfg), "sweep_rules", None)
    return APPLICABILITY + (tuple(own()) if callable(own) else ())


def _not_applying(cfg: Any, keys: Iterable[str]) -> dict[str, str]:
    """Of ``keys``, those that do nothing under ``cfg`` -> why."""
    keys = set(keys)
    return {key: why(cfg) for rule_keys, applies, why in rules(cfg) for key in rule_keys
            if key in keys and not applies(cfg)}


_UNSAFE = re.compile(r"[^A-Za-z0-9.+_-]+")


def trial_name(settings: dict[str, str]) -> str:
    """A readable folder name: ``adapter-lora_rank-4_lr-1e-4`` (``base`` with no settings); long
    names are cut and keep a hash of the whole, so two trials never share a folder."""
    if not settings:
        return "base"
    name = "_".join(f"{k}-{_UNSAFE.sub('-', v)}" for k, v in settings.items())
    if len(name) > 120:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[:110]}-{digest}"
    return name


def make_trial(task: str, base: dict[str, Any], axes: list[Axis], labels: dict[str, str]) -> tuple[Trial, dict[str, str]]:
    """The trial for one choice per axis (``labels``: axis name -> label), with the settings that
    do not apply dropped; returns it and the dropped axis names -> why."""
    by_name = {a.name: a for a in axes}
    overrides = {by_name[n].key: by_name[n].values[by_name[n].labels.index(v)] for n, v in labels.items()}
    cfg = build_config(task, base, **overrides)
    dropped = _not_applying(cfg, overrides)
    if dropped:
        overrides = {k: v for k, v in overrides.items() if k not in dropped}
        cfg = build_config(task, base, **overrides)
    settings = {n: v for n, v in labels.items() if by_name[n].key in overrides}
    return Trial(trial_name(settings), settings, overrides, cfg), {a.name: dropped[a.key] for a in axes if a.key in dropped}


def expand(task: str, base: dict[str, Any], axes: list[Axis], option: str = "--grid") -> Expansion:
    """Every combination of the axes as a trial, in order; combinations that differ only in
    settings that do not apply become one trial, and each such collapse is told in ``notes``.
    More than ``MAX_COMBINATIONS`` are refused before any is made."""
    check_size(axes, option)
    trials: dict[str, Trial] = {}
    collapsed: dict[tuple[str, str], int] = {}
    combos = list(itertools.product(*[a.labels for a in axes]))
    for combo in combos:
        trial, dropped = make_trial(task, base, axes, dict(zip([a.name for a in axes], combo)))
        for name, why in dropped.items():
            collapsed[(name, why)] = collapsed.get((name, why), 0) + 1
        same = trials.get(trial.name)
        if same is not None and to_dict(same.config) != to_dict(trial.config):
            raise AssertionError(f"two different trials named {trial.name}")  # names are built from settings
        trials.setdefault(trial.name, trial)
    notes = [f"{name} does not apply when {why}: ignored in {n} combination{'s' if n > 1 else ''}"
             for (name, why), n in collapsed.items()]
    if len(trials) < len(combos):
        notes.append(f"{len(combos)} combinations, {len(trials)} distinct trials")
    return Expansion(list(trials.values()), len(combos), notes)
