"""``Classifier``: backbone features -> pooled vector -> head logits."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from dinotune.backbone.model import DinoBackbone
from dinotune.tasks.classify.heads import Pool, layers_needed, pool_features


def backbone_grad_context(backbone: nn.Module) -> contextlib.AbstractContextManager:
    """no_grad when nothing in the backbone trains: frozen features need no autograd graph."""
    trains = torch.is_grad_enabled() and any(p.requires_grad for p in backbone.parameters())
    return contextlib.nullcontext() if trains else torch.no_grad()


class Classifier(nn.Module):
    def __init__(self, backbone: DinoBackbone, head: nn.Module, pool: Pool):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.pool = pool

    def features(self, images: Tensor) -> Tensor:
        """``B x 3 x H x W`` normalised images -> ``B x D`` pooled features."""
        with backbone_grad_context(self.backbone):
            f = self.backbone(images, layers=layers_needed(self.pool))
            return pool_features(f, self.pool)

    def forward(self, images: Tensor | None = None, features: Tensor | None = None) -> Tensor:
        """Logits ``B x K`` from images, or from cached ``B x D`` features (backbone skipped)."""
        if features is None:
            if images is None:
                raise ValueError("Classifier needs images or features")
            features = self.features(images)
        return self.head(features.to(next(self.head.parameters()).dtype))
