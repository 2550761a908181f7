"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021) in plain PyTorch.

Sampling uses ``grid_sample`` per level exactly as the paper's PyTorch reference
(``ms_deform_attn_core_pytorch``): bilinear, ``align_corners=False``, zero padding. With that
convention a normalised location ``(x, y)`` in ``[0, 1]`` lands on pixel ``(i, j)``'s centre when
``x = (j + 0.5) / W`` and ``y = (i + 0.5) / H``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Shapes = Tensor | Sequence[tuple[int, int]]


def _shape_list(spatial_shapes: Shapes) -> list[tuple[int, int]]:
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def level_start_index(spatial_shapes: Shapes) -> Tensor:
    """Offsets of each level in the flattened ``sum(H * W)`` token axis."""
    sizes = [h * w for h, w in _shape_list(spatial_shapes)]
    return torch.tensor([0] + sizes[:-1], dtype=torch.long).cumsum(0)


def multi_scale_deformable_attn(value: Tensor, spatial_shapes: Shapes, sampling_locations: Tensor,
                                attention_weights: Tensor) -> Tensor:
    """Weighted sum of bilinearly sampled values over levels and points.

    Args:
        value: ``B x sum(H_l * W_l) x heads x head_dim``, levels concatenated, each row-major.
        spatial_shapes: ``L x 2`` ``(H, W)`` per level (int64 tensor or list of pairs).
        sampling_locations: ``B x Q x heads x L x P x 2`` normalised ``(x, y)`` in ``[0, 1]``;
            outside the map reads zeros.
        attention_weights: ``B x Q x heads x L x P`` (already normalised by the caller).

    Returns:
        ``B x Q x heads * head_dim``.
    """
    shapes = _shape_list(spatial_shapes)
    b, _, heads, dim = value.shape
    _, q, _, levels, points, _ = sampling_locations.shape
    if levels != len(shapes) or value.shape[1] != sum(h * w for h, w in shapes):
        raise ValueError(f"value has {value.shape[1]} tokens and the locations {levels} levels, "
                         f"but spatial_shapes are {shapes}")
    # sample in the wider dtype: bf16 grids would put points a pixel off on large maps
    dtype = torch.promote_types(value.dtype, sampling_locations.dtype)
    out_dtype = value.dtype
    value = value.to(dtype)
    grids = (2 * sampling_locations - 1).to(dtype)
    sampled = []
    for lvl, (v, (h, w)) in enumerate(zip(value.split([h * w for h, w in shapes], dim=1), shapes)):
        # (B x HW x heads x D) -> (B*heads x D x H x W)
        v = v.flatten(2).transpose(1, 2).reshape(b * heads, dim, h, w)
        # (B x Q x heads x P x 2) -> (B*heads x Q x P x 2)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (B*heads x D x Q x L*P) weighted by (B*heads x 1 x Q x L*P)
    weights = attention_weights.to(dtype).transpose(1, 2).reshape(b * heads, 1, q, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return out.view(b, heads * dim, q).transpose(1, 2).contiguous().to(out_dtype)


class MSDeformAttn(nn.Module):
    """Each query attends to ``n_points`` learned offsets around its reference point on every level."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: head ``k`` starts sampling along direction ``2 pi k / heads``,
        point ``i`` at distance ``i + 1``, with uniform attention."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: Tensor, reference_points: Tensor, value_input: Tensor,
                spatial_shapes: Shapes, level_start_index: Tensor | None = None,
                padding_mask: Tensor | None = None) -> Tensor:
        """Args:
            query: ``B x Q x C`` (content + positional embedding).
            reference_points: ``B x Q x L x 2`` normalised ``(cx, cy)`` per level, offsets then
                measured in pixels of each level; or ``B x Q x L x 4`` boxes ``(cx, cy, w, h)``,
                offsets then scaled by ``0.5 * (w, h) / n_points`` (points stay near the box).
            value_input: ``B x sum(H_l W_l) x C`` flattened feature maps.
            spatial_shapes: ``L x 2`` ``(H, W)``.
            level_start_index: unused by this PyTorch path (the split follows ``spatial_shapes``);
                accepted for the usual signature.
            padding_mask: optional ``B x sum(H_l W_l)`` bool, True where a token is padding.

        Returns:
            ``B x Q x C``.
        """
        shapes = _shape_list(spatial_shapes)
        b, q, _ = query.shape
        value = self.value_proj(value_input)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(b, value.shape[1], self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(b, q, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(b, q, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(b, q, self.n_heads, self.n_levels, self.n_points)
        ref = reference_points[:, :, None, :, None]  # B x Q x 1 x L x 1 x (2|4)
        if reference_points.shape[-1] == 2:
            normaliser = torch.tensor([(w, h) for h, w in shapes], dtype=ref.dtype, device=ref.device)
            locations = ref + offsets / normaliser[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = ref[..., :2] + offsets / self.n_points * ref[..., 2:] * 0.5
        else:
            raise ValueError(f"reference_points must end in 2 or 4 values, not {reference_points.shape[-1]}")
        out = multi_scale_deformable_attn(value, shapes, locations, weights)
        return self.output_proj(out)
