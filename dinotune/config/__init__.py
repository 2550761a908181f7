"""Typed run configuration: the one place where defaults live.

Every task config is a tree of dataclasses. Each leaf field carries its help text (and, optionally,
its command-line flag) in ``metadata``, so the CLI, the YAML file saved in every run folder and the
Python API all read the same defaults.

Precedence when a run is configured: dataclass defaults < ``--config FILE.yaml`` < ``--set a.b=v``
< explicit flags.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

from dinotune.config.bands import BandLayout, BandsConfig
from dinotune.config.base import (
    PYRAMID_SCALES,
    AdapterConfig,
    AdapterKind,
    BackboneConfig,
    ConfigError,
    OptimConfig,
    Precision,
    TrainConfig,
    check_ranges,
    opt,
    range_text,
    validate_common,
)
from dinotune.config.classify import (
    ClassifyConfig,
    ClassifyDataConfig,
    ClassifyHeadConfig,
    ClassifyInferenceConfig,
)
from dinotune.config.detect import (
    LIGHTWEIGHT_PRESET,
    DetectConfig,
    DetectDataConfig,
    DetectInferenceConfig,
    DetectLossConfig,
    DetectModelConfig,
)
from dinotune.config.io import (
    apply_overrides,
    coerce,
    flag_map,
    flag_name,
    from_dict,
    leaf_fields,
    load_yaml,
    save_yaml,
    set_dotted,
    to_dict,
)
from dinotune.config.segment import (
    SegmentConfig,
    SegmentDataConfig,
    SegmentInferenceConfig,
    SegmentLossConfig,
    SegmentModelConfig,
)
from dinotune.tasks import registry  # torch-free: names and lazy class references only

__all__ = [
    "PYRAMID_SCALES", "AdapterKind", "Precision", "ConfigError", "opt", "validate_common", "check_ranges", "range_text",
    "BackboneConfig", "AdapterConfig", "OptimConfig", "TrainConfig", "BandsConfig", "BandLayout",
    "ClassifyConfig", "ClassifyDataConfig", "ClassifyHeadConfig", "ClassifyInferenceConfig",
    "DetectConfig", "DetectDataConfig", "DetectModelConfig", "DetectLossConfig", "DetectInferenceConfig",
    "LIGHTWEIGHT_PRESET",
    "SegmentConfig", "SegmentDataConfig", "SegmentModelConfig", "SegmentLossConfig", "SegmentInferenceConfig",
    "TASK_CONFIGS", "apply_presets", "build_config",
    "to_dict", "from_dict", "coerce", "save_yaml", "load_yaml", "leaf_fields", "set_dotted", "apply_overrides",
    "flag_name", "flag_map",
]

class _TaskConfigs(Mapping[str, type]):
    """Task name -> config class, read from the task registry (``dinotune.tasks.registry``), so a
    task registered later (a plug-in) is known here too."""

    def __getitem__(self, name: str) -> type:
        if name not in registry.names():
            raise KeyError(name)
        return registry.entry(name).config_class()

    def __iter__(self) -> Iterator[str]:
        return iter(registry.names())

    def __len__(self) -> int:
        return len(registry.names())


TASK_CONFIGS: Mapping[str, type] = _TaskConfigs()


def apply_presets(cfg: Any, explicit: dict[str, Any]) -> Any:
    """Expand the presets a task config defines (its ``apply_presets(explicit)``, e.g. detection's
    ``--lightweight``) from the explicit overrides, without touching the keys the user set. (A
    saved config.yaml already holds the expanded values.)"""
    presets = getattr(cfg, "apply_presets", None)
    if callable(presets):
        presets(explicit)
    return cfg


def build_config(task: str, base: Any = None, **kwargs: Any) -> Any:
    """A task config from defaults (or ``base``: a config, a dict, or a YAML path) plus keyword
    overrides named like the CLI flags (``adapter="lora", rank=16, image_size=448``) or dotted
    keys passed as a dict (``**{"optim.lr": 1e-3}``)."""
    cls = registry.entry(task).config_class()
    if base is None:
        cfg = cls()
    elif isinstance(base, cls):
        cfg = from_dict(cls, to_dict(base))
    elif isinstance(base, dict):
        cfg = from_dict(cls, base)
    else:
        cfg = load_yaml(base, cls)
    names = {flag.lstrip("-").replace("-", "_"): key for flag, key in flag_map(cls).items()}
    explicit = {}
    for name, value in kwargs.items():
        key = name if "." in name else names.get(name)
        if key is None:
            raise ConfigError(f"unknown option {name!r}; valid: {', '.join(sorted(names))}")
        explicit[key] = value
    apply_overrides(cfg, explicit)
    return apply_presets(cfg, explicit)
