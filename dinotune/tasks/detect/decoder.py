"""Deformable DETR decoder with iterative box refinement (``with_box_refine``).

Every layer has its own weights, class head and box head. Layer ``l`` attends around the boxes
of layer ``l - 1`` (detached, as in Deformable DETR) and predicts its boxes as
``sigmoid(bbox_embed_l(h_l) + inverse_sigmoid(reference_l))``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from dinotune.tasks.detect.deformable import MSDeformAttn, Shapes

PRIOR_PROB = 0.01


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def position_encoding(feature_map: Tensor, temperature: float = 10000.0) -> Tensor:
    """DETR's ``PositionEmbeddingSine(normalize=True)`` without a mask (Deformable DETR's
    pixel-centre variant): ``B x C x H x W`` -> ``B x C x H x W``, the first ``C / 2`` channels
    encode ``y``, the rest ``x``, each as interleaved sin / cos of ``2 pi * (i + 0.5) / H``."""
    b, c, h, w = feature_map.shape
    if c % 4:
        raise ValueError(f"sine position encoding needs channels divisible by 4, got {c}")
    feats = c // 2
    kw = dict(dtype=torch.float32, device=feature_map.device)
    scale = 2 * math.pi
    y = (torch.arange(h, **kw) + 0.5) / h * scale
    x = (torch.arange(w, **kw) + 0.5) / w * scale
    dim_t = temperature ** (2 * (torch.arange(feats, **kw) // 2) / feats)

    def encode(v: Tensor) -> Tensor:  # n -> n x feats
        v = v[:, None] / dim_t
        return torch.stack([v[:, 0::2].sin(), v[:, 1::2].cos()], dim=2).flatten(1)

    pos_y = encode(y)[:, None, :].expand(h, w, feats)
    pos_x = encode(x)[None, :, :].expand(h, w, feats)
    pos = torch.cat([pos_y, pos_x], dim=-1).permute(2, 0, 1)
    return pos[None].expand(b, c, h, w).to(feature_map.dtype)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else torch.relu(layer(x))
        return x


class DeformableDecoderLayer(nn.Module):
    """Self-attention over queries, deformable cross-attention to the pyramid, FFN; post-norm."""

    def __init__(self, d_model: int = 256, n_heads: int = 8, ffn_dim: int = 1024, n_levels: int = 3,
                 n_points: int = 4, dropout: float = 0.0):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: Shapes, level_start_index: Tensor | None = None,
                padding_mask: Tensor | None = None) -> Tensor:
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attn = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes,
                               level_start_index, padding_mask)
        tgt = self.norm2(tgt + self.dropout2(attn))
        ffn = self.linear2(self.dropout3(torch.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class DecoderOutput(NamedTuple):
    logits: list[Tensor]  # per layer, B x Q x K
    boxes: list[Tensor]  # per layer, B x Q x 4 sigmoid cxcywh (float32)
    references: list[Tensor]  # per layer, the detached B x Q x 4 boxes it attended around
    hidden: list[Tensor]  # per layer, the B x Q x C query states its heads read (a mask head reads them too)


class DeformableDecoder(nn.Module):
    """``num_layers`` independently constructed layers, each with its own class and box head."""

    def __init__(self, d_model: int, n_heads: int, ffn_dim: int, n_levels: int, n_points: int,
                 dropout: float, num_layers: int, num_classes: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError("the decoder needs at least one layer")
        # separate constructions, never [layer] * n or deepcopies of one module
        self.layers = nn.ModuleList(
            DeformableDecoderLayer(d_model, n_heads, ffn_dim, n_levels, n_points, dropout)
            for _ in range(num_layers))
        self.class_embed = nn.ModuleList(nn.Linear(d_model, num_classes) for _ in range(num_layers))
        self.bbox_embed = nn.ModuleList(MLP(d_model, d_model, 4, 3) for _ in range(num_layers))
        bias = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)
        for cls, box in zip(self.class_embed, self.bbox_embed):
            nn.init.constant_(cls.bias, bias)
            nn.init.zeros_(box.layers[-1].weight)  # layers start by keeping their reference box
            nn.init.zeros_(box.layers[-1].bias)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_boxes: Tensor, memory: Tensor,
                spatial_shapes: Shapes, level_start_index: Tensor | None = None,
                padding_mask: Tensor | None = None) -> DecoderOutput:
        """Args:
            tgt, query_pos: ``B x Q x C`` query content and positional embeddings.
            reference_boxes: ``B x Q x 4`` initial sigmoid ``cxcywh`` boxes (gradients reach
                them through layer 0's prediction).
            memory: ``B x sum(H_l W_l) x C`` flattened pyramid.
        """
        n_levels = len(spatial_shapes)
        logits, boxes, references, hidden = [], [], [], []
        reference = reference_boxes.float()
        for layer, cls, box in zip(self.layers, self.class_embed, self.bbox_embed):
            # the same box on every level: without padding masks all levels span the whole canvas
            ref_levels = reference[:, :, None].expand(-1, -1, n_levels, -1)
            tgt = layer(tgt, query_pos, ref_levels, memory, spatial_shapes, level_start_index,
                        padding_mask)
            pred = (box(tgt).float() + inverse_sigmoid(reference)).sigmoid()
            logits.append(cls(tgt))
            boxes.append(pred)
            references.append(reference)
            hidden.append(tgt)
            reference = pred.detach()  # Deformable DETR: no gradient through the next reference
        return DecoderOutput(logits, boxes, references, hidden)
