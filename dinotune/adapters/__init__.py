"""Adapters on the backbone: none (frozen), LoRA / DoRA through PEFT, or full fine-tuning.

Adapters touch the backbone module only; heads are always fully trainable and live elsewhere. Each
kind is one object in ``ADAPTERS`` (``table.py``; one file per kind: ``frozen.py``, ``lora.py``,
``full.py``, over the contract in ``base.py``), and the functions below ask it: no caller compares
kind names.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from dinotune.adapters.base import Adapter
from dinotune.adapters.counts import count_parameters, format_parameter_count
from dinotune.adapters.full import BACKBONE_WEIGHTS
from dinotune.adapters.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_tensors, is_peft, merge_peft
from dinotune.adapters.table import ADAPTERS, adapter_for
from dinotune.adapters.targets import resolve_targets
from dinotune.backbone.model import DinoBackbone
from dinotune.config import AdapterConfig


def apply_adapter(backbone: DinoBackbone, cfg: AdapterConfig) -> None:
    """Adapt ``backbone`` in place and set ``requires_grad`` on exactly the trainable weights."""
    adapter_for(cfg.kind).apply(backbone, cfg)


def trainable_backbone_parameters(backbone: DinoBackbone, cfg: AdapterConfig) -> list[tuple[str, nn.Parameter]]:
    """The backbone parameters an optimizer should update for this adapter kind. A patch embedding
    widened for N-band input (``backbone/channels.py``) is new, so it trains with LoRA and DoRA
    too; with ``none`` the backbone, that layer included, stays frozen (a head-only probe, whose
    features may be cached: the widened layer starts from the pretrained kernels, not at random)."""
    return adapter_for(cfg.kind).trainable(backbone)


def save_adapter(backbone: DinoBackbone, cfg: AdapterConfig, folder: Path) -> None:
    """Write the adapter (LoRA/DoRA) or the whole backbone (full) into ``folder``; nothing for none.
    A widened patch embedding (N-band input) is written beside them (``input_embedding.safetensors``)
    for every kind but ``full``, whose backbone file holds it already."""
    adapter_for(cfg.kind).save(backbone, folder)


def load_adapter(backbone: DinoBackbone, cfg: AdapterConfig, folder: Path) -> None:
    """Load what ``save_adapter`` wrote onto a backbone already adapted with ``cfg`` (and widened
    to the run's bands: ``backbone/channels.py``)."""
    adapter_for(cfg.kind).load(backbone, folder)


def merge_adapter(backbone: DinoBackbone) -> None:
    """Fold LoRA / DoRA into the base weights: plain DINOv2 / DINOv3 again, same outputs, faster.
    What to merge is read off the backbone (a PEFT wrapper), not a kind: merging twice, or a
    backbone of another kind, changes nothing."""
    merge_peft(backbone)


__all__ = [
    "ADAPTERS", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "BACKBONE_WEIGHTS", "Adapter", "adapter_for", "adapter_tensors",
    "apply_adapter", "count_parameters", "format_parameter_count", "is_peft", "load_adapter", "merge_adapter",
    "resolve_targets", "save_adapter", "trainable_backbone_parameters",
]
