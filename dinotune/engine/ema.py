"""An exponential moving average (EMA) of the trained weights, evaluated beside the raw ones.

After every optimizer step ``n`` (0-based count of earlier updates) each tracked weight moves:

    ema <- d_n * ema + (1 - d_n) * w,   d_n = min(decay, (1 + n) / (10 + n))

The warm-up of ``d_n`` (TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``) keeps
the average from clinging to the initial weights, a random head, for the first thousands of
steps of a short fine-tuning run: ``d_0`` = 0.1, ``d_90`` = 0.91, and ``decay`` itself from
step ``(10 * decay - 1) / (1 - decay)`` on (8,990 for 0.999; timm's ``ModelEmaV3`` warms up too).

Tracked: every parameter of the head and the backbone's trainable parameters for the adapter
kind (``trainable_backbone_parameters``: LoRA / DoRA weights, or the whole backbone with
``full``) in every phase, so a two-stage run averages the adapters too once stage 2 moves
them (frozen weights average to themselves). Buffers (norm running statistics) are not
averaged: the EMA model uses the live ones, a copy as of the last step. Under DDP every
process holds the same weights after each step, so every process holds the same average.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from dinotune.adapters import trainable_backbone_parameters
from dinotune.config import AdapterConfig


def tracked_parameters(model: nn.Module, adapter: AdapterConfig) -> dict[str, nn.Parameter]:
    """``{"head.<name>" | "backbone.<name>": parameter}``: what the EMA averages."""
    params = {f"head.{n}": p for n, p in model.head.named_parameters()}
    params.update({f"backbone.{n}": p for n, p in trainable_backbone_parameters(model.backbone, adapter)})
    return params


class ModelEma:
    """The average of ``model``'s tracked weights, starting from their current values.

    Args:
        model: has ``.head`` and ``.backbone`` (adapted already).
        adapter: the run's adapter config (which backbone weights train).
        decay: the EMA decay in [0, 1), e.g. 0.999 (``--ema``).
    """

    def __init__(self, model: nn.Module, adapter: AdapterConfig, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} outside [0, 1)")
        self.decay = decay
        self.updates = 0  # optimizer steps averaged so far
        self.params = tracked_parameters(model, adapter)
        self.shadow = {k: p.detach().clone().float() for k, p in self.params.items()}

    def current_decay(self) -> float:
        """``d_n`` of the next update (see the module docstring)."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """Fold the weights as they are now into the average (call after each optimizer step)."""
        d = self.current_decay()
        keys = list(self.shadow)
        # lerp: ema + (1 - d) * (w - ema) = d * ema + (1 - d) * w
        torch._foreach_lerp_([self.shadow[k] for k in keys], [self.params[k].detach().float() for k in keys], 1.0 - d)
        self.updates += 1

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block and exactly its own ones again
        after it (also when the block raises). The raw weights wait in a copy meanwhile: one more
        copy of the tracked weights while evaluating (small for LoRA, a model's worth for full)."""
        with torch.no_grad():
            raw = {k: p.detach().clone() for k, p in self.params.items()}
            for k, p in self.params.items():
                p.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(raw[k])

    def state_dict(self) -> dict[str, Any]:
        """``{"decay", "updates", "weights": {name: tensor}}``, for the trainer state."""
        return {"decay": self.decay, "updates": self.updates, "weights": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved; the tracked names must be the same."""
        weights = state["weights"]
        if set(weights) != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - set(weights)), sorted(set(weights) - set(self.shadow))
            raise ValueError(f"the saved EMA tracks other weights (missing {missing[:3]}, unexpected {extra[:3]})")
        for k, v in weights.items():
            self.shadow[k].copy_(v)
        self.updates = int(state["updates"])
