"""Classification heads and the features they read (no transformers import here)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from dinotune.backbone.model import Features

Pool = Literal["cls", "cls_mean", "last4"]


def layers_needed(pool: Pool) -> int:
    return 4 if pool == "last4" else 1


def pooled_dim(embed_dim: int, pool: Pool) -> int:
    return {"cls": 1, "cls_mean": 2, "last4": 5}[pool] * embed_dim


def pool_features(f: Features, pool: Pool) -> Tensor:
    """``B x D`` head input.

    ``cls``: class token. ``cls_mean``: class token and mean patch token. ``last4``: the class
    tokens of the last 4 layers and the last layer's mean patch token, as in DINOv2's official
    linear evaluation (``create_linear_input`` with n=4, avgpool=True).
    """
    if pool == "cls":
        return f.cls
    if pool == "cls_mean":
        return torch.cat([f.cls, f.patch_mean], dim=-1)
    if pool == "last4":
        return torch.cat([*f.layers_cls[-4:], f.patch_mean], dim=-1)
    raise ValueError(f"unknown pool {pool!r}: choose cls, cls_mean or last4")


class LinearHead(nn.Module):
    """Dropout + one linear layer: ``B x D -> B x K``."""

    def __init__(self, in_dim: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)  # as DINOv2's linear evaluation
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(x))


class MLPHead(nn.Module):
    """LayerNorm -> Linear -> GELU -> Dropout -> Linear: ``B x D -> B x K``."""

    def __init__(self, in_dim: int, num_classes: int, hidden: int = 1024, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def build_head(kind: Literal["linear", "mlp"], in_dim: int, num_classes: int, hidden: int,
               dropout: float) -> nn.Module:
    if kind == "linear":
        return LinearHead(in_dim, num_classes, dropout)
    if kind == "mlp":
        return MLPHead(in_dim, num_classes, hidden, dropout)
    raise ValueError(f"unknown head {kind!r}: choose linear or mlp")
