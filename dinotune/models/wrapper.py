"""``BackboneHead``: a DINOv2 backbone and a task head as one module, the shape the engine trains.

Every task model is ``.backbone`` (a ``DinoBackbone``, adapted or not) plus ``.head`` (everything
trainable outside it). What they share lives here once: the backbone runs without an autograd
graph when none of its weights train, its features are cast to the head's dtype, and the
parameters AdamW must not decay are collected from both parts (``no_weight_decay``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from dinotune.backbone.model import DinoBackbone, Features


def backbone_grad_context(backbone: nn.Module) -> contextlib.AbstractContextManager:
    """no_grad when nothing in the backbone trains: frozen features need no autograd graph."""
    trains = torch.is_grad_enabled() and any(p.requires_grad for p in backbone.parameters())
    return contextlib.nullcontext() if trains else torch.no_grad()


def declared_no_weight_decay(module: nn.Module) -> set[str]:
    """The parameter names ``module`` declares exempt from weight decay (timm's
    ``no_weight_decay()`` convention); an empty set when it declares none."""
    declare = getattr(module, "no_weight_decay", None)
    return set(declare()) if callable(declare) else set()


class BackboneHead(nn.Module):
    """``backbone`` + ``head``; subclasses define ``forward`` from ``backbone_features``.

    Args:
        backbone: the (adapted) DINOv2 backbone.
        head: the task head; its parameters always train.
    """

    def __init__(self, backbone: DinoBackbone, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    def backbone_features(self, images: Tensor, layers: int | Sequence[int] = 1) -> Features:
        """``Features`` of ``B x 3 x H x W`` normalised images (no graph when the backbone is frozen)."""
        with backbone_grad_context(self.backbone):
            return self.backbone(images, layers=layers)

    def to_head(self, x: Any) -> Any:
        """A tensor (or a list of tensors) in the head's parameter dtype."""
        dtype = next(self.head.parameters()).dtype
        if isinstance(x, (list, tuple)):
            return [t.to(dtype) for t in x]
        return x.to(dtype)

    def no_weight_decay(self) -> set[str]:
        """Full names of the parameters that AdamW must not decay, as declared by the two parts
        (matrices only: the engine exempts every 1-d parameter, biases and norms, on its own)."""
        return ({f"backbone.{n}" for n in declared_no_weight_decay(self.backbone)}
                | {f"head.{n}" for n in declared_no_weight_decay(self.head)})
