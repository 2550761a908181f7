"""The DINO / iBOT projection head: tokens to prototype scores, as DINOv2 pretrains with.

Self-distillation compares student and teacher as distributions over ``prototypes`` learnt
directions, not as raw features; this head makes those scores. It is DINOv2's ``DINOHead``
(``dinov2/layers/dino_head.py``): an MLP to a small bottleneck, L2-normalisation, then a linear
layer whose rows are unit vectors, so every score is a cosine between the token and a prototype.
By default DINOv2 shares one head between the class token (DINO loss) and the masked patch tokens
(iBOT loss).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinotune.errors import ConfigError


class PrototypeLayer(nn.Module):
    """``... x D -> ... x K`` with the ``K x D`` weight rows normalised to unit length in every call.

    DINOv2 writes this as ``weight_norm(nn.Linear(D, K, bias=False))`` with the magnitude ``g``
    filled with 1 (and DINO v1 sets ``g.requires_grad = False``). Normalising an explicit weight
    computes the same function and the same gradient as ``v / ||v||`` with ``g = 1``, and leaves
    no magnitude parameter at all: nothing that ``requires_grad_(True)``, an EMA teacher update,
    an optimiser built from ``parameters()`` or a checkpoint load could bring back to life.
    """

    def __init__(self, in_dim: int, prototypes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(prototypes, in_dim))
        # nn.Linear's own initialisation: DINOv2 builds this layer after the trunc-normal pass over
        # the MLP, so it keeps the default; only the directions matter once normalised.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def normalized_weight(self) -> Tensor:
        """``K x D``, every row of norm 1: the prototypes the scores are cosines against."""
        return F.normalize(self.weight, dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.normalized_weight())


class DINOHead(nn.Module):
    """``... x in_dim -> ... x prototypes`` logits (``B x D`` class tokens or ``B x N x D`` patches).

    Args:
        in_dim: the backbone's embedding width.
        prototypes: ``K``, the number of prototypes (DINOv2 uses 65536 on LVD-142M; a few thousand
            suit a small dataset).
        hidden_dim: width of the MLP's hidden layers.
        bottleneck_dim: width of the L2-normalised bottleneck the prototypes live in.
        layers: number of linear layers in the MLP (``layers - 1`` of them followed by GELU).
    """

    def __init__(self, in_dim: int, prototypes: int = 4096, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3):
        super().__init__()
        if layers < 1:
            raise ConfigError(f"DINOHead layers={layers}: the MLP needs at least 1 linear layer")
        widths = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        blocks: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            blocks.append(nn.Linear(a, b))
            if i < layers - 1:
                blocks.append(nn.GELU())
        self.mlp = nn.Sequential(*blocks)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):  # DINOHead._init_weights
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # Named ``last_layer`` as in DINOv2, whose trainer drops this layer's gradients during the
        # first epoch (``freeze_last_layer_epochs``); a trainer can find it by that name.
        self.last_layer = PrototypeLayer(bottleneck_dim, prototypes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        # DINOv2's eps: 1e-12 underflows in float16, where the normalisation would divide by zero.
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, eps=eps)
        return self.last_layer(x)
