"""Command-line flags made from typed configs: one flag per config field (help, default, choices,
ranges from the field), and the typed config back from the parsed flags (``command_config``).

``predict``'s task flags are the fields of every registered task config's ``inference`` section and
its ``predict_options``; a flag two tasks share is one flag whose help joins theirs."""

from __future__ import annotations

import argparse
import typing
from dataclasses import dataclass, field
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
    PredictConfig,
)


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
    helps: list[tuple[str, str]] = field(default_factory=list)  # (task, help) per task that has it

    @property
    def help(self) -> str:
        """``detect, instance: ...; segment: ...``: tasks saying the same thing share one entry."""
        by_text: dict[str, list[str]] = {}
        for task, text in self.helps:
            by_text.setdefault(text, []).append(task)
        return "; ".join(f"{', '.join(tasks)}: {text}" for text, tasks in by_text.items())
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
            option.helps.append((task, f.metadata.get("help", "")))
            option.defaults.append((task, default_text))
    return out


def _add_predict_task_flags(parser: argparse.ArgumentParser) -> None:
    """The task options of ``predict`` (see ``predict_task_options``), in a group of their own."""
    group = parser.add_argument_group("task options (refused for runs of a task that has no use for them)")
    for name, option in predict_task_options().items():
        texts = {text for _, text in option.defaults}
        default = texts.pop() if len(texts) == 1 else "; ".join(f"{task}: {text}" for task, text in option.defaults)
        _add_argument(group, name, option.meta, option.type, _help_text({"help": option.help}, default))


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
