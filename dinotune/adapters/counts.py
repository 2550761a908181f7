"""Trainable-parameter counts of a backbone + head model, as printed before training."""

from __future__ import annotations

from torch import nn


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameters in the backbone and elsewhere (the head), and the total."""
    out = {"backbone_trainable": 0, "head_trainable": 0, "total": 0}
    for name, p in model.named_parameters():
        out["total"] += p.numel()
        if p.requires_grad:
            key = "backbone_trainable" if name.startswith("backbone.") else "head_trainable"
            out[key] += p.numel()
    return out


def format_parameter_count(counts: dict[str, int]) -> str:
    trainable = counts["backbone_trainable"] + counts["head_trainable"]
    return (
        f"trainable parameters: {trainable:,} ({counts['backbone_trainable']:,} backbone + "
        f"{counts['head_trainable']:,} head) of {counts['total']:,} total "
        f"({100.0 * trainable / max(1, counts['total']):.2f}%)"
    )
