"""Typed run configuration: the one place where defaults live.

Every task config is a tree of dataclasses. Each leaf field carries its help text (and, optionally,
its command-line flag) in ``metadata``, so the CLI, the YAML file saved in every run folder and the
Python API all read the same defaults.

Precedence when a run is configured: dataclass defaults < ``--config FILE.yaml`` < ``--set a.b=v``
< explicit flags.
"""

from __future__ import annotations

from typing import Any

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
    opt,
    check_ranges,
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

TASK_CONFIGS: dict[str, type] = {"classify": ClassifyConfig, "detect": DetectConfig, "segment": SegmentConfig}


def apply_presets(cfg: Any, explicit: dict[str, Any]) -> Any:
    """Expand ``--lightweight`` when it is among the explicit overrides, without touching the other
    keys the user set explicitly. (A saved config.yaml already holds the expanded values.)"""
    if coerce(explicit.get("model.lightweight", False), bool, "model.lightweight"):
        for key, value in LIGHTWEIGHT_PRESET.items():
            if key not in explicit:
                set_dotted(cfg, key, value)
    # a --baseline (detection) replaces the DINOv2 detector: its head, no adapter, a placeholder backbone
    if explicit.get("model.baseline", "none") != "none":
        from dinotune.config.detect import BASELINE_PRESET

        for key, value in BASELINE_PRESET.items():
            if key not in explicit:
                set_dotted(cfg, key, value)
    # the "improved" single-object detector is defined by its two-stage freeze-then-unfreeze schedule
    if explicit.get("model.head") == "improved" and "train.two_stage" not in explicit:
        set_dotted(cfg, "train.two_stage", True)
    return cfg


def build_config(task: str, base: Any = None, **kwargs: Any) -> Any:
    """A task config from defaults (or ``base``: a config, a dict, or a YAML path) plus keyword
    overrides named like the CLI flags (``adapter="lora", rank=16, image_size=448``) or dotted
    keys passed as a dict (``**{"optim.lr": 1e-3}``)."""
    if task not in TASK_CONFIGS:
        raise ConfigError(f"unknown task {task!r}; valid: {', '.join(TASK_CONFIGS)}")
    cls = TASK_CONFIGS[task]
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
