"""``DinoDetr``: DINOv2 patch map -> simple feature pyramid -> deformable DETR decoder.

There is no transformer encoder (as in ViTDet, the backbone already mixes the image globally).
The decoder's memory is each pyramid level (already ``hidden_dim`` wide: the pyramid's 1x1 + 3x3
convolutions act as the input projections) plus a sine position encoding and a learned level
embedding, flattened and concatenated. Deformable attention reads values only, so adding the
position and level there is what tells a query where and on which level it sampled.

No padding mask: images are zero-padded at the right / bottom to ``S x S`` (see the package
contract) and boxes are normalised to that canvas, so the padded area is simply part of the
image (zeros after normalisation). Every level then spans the whole canvas, reference boxes are
the same on every level (valid ratios are 1) and no key needs masking.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from dinotune.backbone.model import DinoBackbone
from dinotune.tasks.classify.model import backbone_grad_context
from dinotune.tasks.detect.decoder import DeformableDecoder, inverse_sigmoid, position_encoding
from dinotune.tasks.detect.deformable import level_start_index
from dinotune.tasks.detect.pyramid import SimpleFeaturePyramid

INIT_BOX_SIZE = 0.1  # initial reference boxes' width / height, as a fraction of the canvas


class DetrHead(nn.Module):
    """Everything trainable outside the backbone: pyramid, queries, decoder, class / box heads."""

    def __init__(self, in_dim: int, num_classes: int, num_queries: int = 100, decoder_layers: int = 6,
                 hidden_dim: int = 256, num_heads: int = 8, ffn_dim: int = 1024, sampling_points: int = 4,
                 pyramid_scales: Sequence[float] = (2.0, 1.0, 0.5), dropout: float = 0.0):
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} is not divisible by num_heads {num_heads}")
        if hidden_dim % 4:
            raise ValueError(f"hidden_dim {hidden_dim} must be a multiple of 4 (sine position encoding)")
        self.num_classes, self.num_queries, self.hidden_dim = num_classes, num_queries, hidden_dim
        self.pyramid = SimpleFeaturePyramid(in_dim, hidden_dim, pyramid_scales)
        n_levels = len(self.pyramid.scales)
        self.level_embed = nn.Parameter(torch.empty(n_levels, hidden_dim))
        nn.init.normal_(self.level_embed)
        # Deformable DETR: one embedding split into the positional half and the content half
        self.query_embed = nn.Embedding(num_queries, 2 * hidden_dim)
        # initial reference boxes from the positional half: (cx, cy) spread over the canvas as in
        # Deformable DETR, (w, h) starting at INIT_BOX_SIZE for every query, all learned
        self.reference_points = nn.Linear(hidden_dim, 4)
        nn.init.xavier_uniform_(self.reference_points.weight)
        nn.init.zeros_(self.reference_points.bias)
        with torch.no_grad():
            self.reference_points.weight[2:].zero_()
            self.reference_points.bias[2:].fill_(float(inverse_sigmoid(torch.tensor(INIT_BOX_SIZE))))
        self.decoder = DeformableDecoder(hidden_dim, num_heads, ffn_dim, n_levels, sampling_points,
                                         dropout, decoder_layers, num_classes)

    def memory(self, patch_map: Tensor) -> tuple[Tensor, list[tuple[int, int]]]:
        """``B x C x h x w`` -> (``B x sum(H_l W_l) x hidden`` memory, ``[(H_l, W_l)]``)."""
        levels = self.pyramid(patch_map)
        flat = []
        for lvl, feat in enumerate(levels):
            feat = feat + position_encoding(feat) + self.level_embed[lvl].view(1, -1, 1, 1)
            flat.append(feat.flatten(2).transpose(1, 2))
        return torch.cat(flat, dim=1), [tuple(f.shape[-2:]) for f in levels]

    def forward(self, patch_map: Tensor) -> dict:
        """``B x C x h x w`` patch map -> ``{"pred_logits", "pred_boxes", "aux_outputs"}``."""
        memory, shapes = self.memory(patch_map)
        b = patch_map.shape[0]
        query_pos, tgt = self.query_embed.weight.split(self.hidden_dim, dim=1)
        query_pos = query_pos[None].expand(b, -1, -1)
        tgt = tgt[None].expand(b, -1, -1)
        reference = self.reference_points(query_pos).sigmoid()
        out = self.decoder(tgt, query_pos, reference, memory, shapes,
                           level_start_index(shapes).to(memory.device))
        per_layer = [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(out.logits, out.boxes)]
        return {**per_layer[-1], "aux_outputs": per_layer[:-1]}


class DinoDetr(nn.Module):
    """``.backbone`` (``DinoBackbone``) + ``.head`` (``DetrHead``), as the engine expects."""

    def __init__(self, backbone: DinoBackbone, head: DetrHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, images: Tensor) -> Tensor:
        """``B x 3 x S x S`` -> ``B x C x S/14 x S/14`` last-layer patch map."""
        with backbone_grad_context(self.backbone):
            return self.backbone(images, layers=1).patch_map

    def forward(self, images: Tensor) -> dict:
        patch_map = self.features(images)
        return self.head(patch_map.to(self.head.level_embed.dtype))


def build_detr(backbone: DinoBackbone, num_classes: int, num_queries: int = 100, decoder_layers: int = 6,
               hidden_dim: int = 256, num_heads: int = 8, ffn_dim: int = 1024, sampling_points: int = 4,
               pyramid_scales: Sequence[float] = (2.0, 1.0, 0.5), dropout: float = 0.0) -> DinoDetr:
    head = DetrHead(backbone.embed_dim, num_classes, num_queries, decoder_layers, hidden_dim, num_heads,
                    ffn_dim, sampling_points, list(pyramid_scales), dropout)
    return DinoDetr(backbone, head)
