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
from dinotune.config import DetectModelConfig
from dinotune.models.pyramid import SimpleFeaturePyramid
from dinotune.models.wrapper import BackboneHead
from dinotune.tasks.detect.decoder import DecoderOutput, DeformableDecoder, inverse_sigmoid, position_encoding
from dinotune.tasks.detect.deformable import level_start_index

INIT_BOX_SIZE = 0.1  # initial reference boxes' width / height, as a fraction of the canvas


class DetrHead(nn.Module):
    """Everything trainable outside the backbone: pyramid, queries, decoder, class / box heads.

    Args:
        in_dim: backbone width ``C``.
        num_classes: ``K`` (sigmoid scores, no "no object" class).
        num_queries: object queries ``Q``.
        decoder_layers, hidden_dim, num_heads, ffn_dim, sampling_points, dropout: the decoder.
        pyramid_scales: feature-pyramid levels as scale factors of the patch map.
        patch_size: the backbone's patch size (the pyramid's strides).
    """

    def __init__(self, in_dim: int, num_classes: int, num_queries: int, decoder_layers: int, hidden_dim: int,
                 num_heads: int, ffn_dim: int, sampling_points: int, pyramid_scales: Sequence[float],
                 dropout: float, patch_size: int):
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} is not divisible by num_heads {num_heads}")
        if hidden_dim % 4:
            raise ValueError(f"hidden_dim {hidden_dim} must be a multiple of 4 (sine position encoding)")
        self.num_classes, self.num_queries, self.hidden_dim = num_classes, num_queries, hidden_dim
        self.pyramid = SimpleFeaturePyramid(in_dim, hidden_dim, pyramid_scales, patch_size)
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

    def no_weight_decay(self) -> set[str]:
        """Learned embeddings AdamW must not shrink (as Deformable DETR's recipe)."""
        return {"query_embed.weight", "level_embed"}

    def memory(self, levels: Sequence[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """The pyramid's ``B x hidden x H_l x W_l`` maps -> (``B x sum(H_l W_l) x hidden`` memory,
        ``[(H_l, W_l)]``)."""
        flat = []
        for lvl, feat in enumerate(levels):
            feat = feat + position_encoding(feat) + self.level_embed[lvl].view(1, -1, 1, 1)
            flat.append(feat.flatten(2).transpose(1, 2))
        return torch.cat(flat, dim=1), [tuple(f.shape[-2:]) for f in levels]

    def decode(self, levels: Sequence[Tensor]) -> DecoderOutput:
        """The decoder's per-layer outputs on the pyramid's maps."""
        memory, shapes = self.memory(levels)
        b = memory.shape[0]
        query_pos, tgt = self.query_embed.weight.split(self.hidden_dim, dim=1)
        query_pos = query_pos[None].expand(b, -1, -1)
        tgt = tgt[None].expand(b, -1, -1)
        reference = self.reference_points(query_pos).sigmoid()
        return self.decoder(tgt, query_pos, reference, memory, shapes, level_start_index(shapes).to(memory.device))

    def forward(self, patch_map: Tensor) -> dict:
        """``B x C x h x w`` patch map -> ``{"pred_logits", "pred_boxes", "aux_outputs"}``."""
        out = self.decode(self.pyramid(patch_map))
        per_layer = [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(out.logits, out.boxes)]
        return {**per_layer[-1], "aux_outputs": per_layer[:-1]}


class DinoDetr(BackboneHead):
    """``.backbone`` (``DinoBackbone``) + ``.head`` (``DetrHead``), as the engine expects."""

    def forward(self, images: Tensor) -> dict:
        """``B x 3 x S x S`` -> the head's outputs on the ``B x C x S/p x S/p`` last-layer patch map."""
        return self.head(self.to_head(self.backbone_features(images).patch_map))


def build_detr(backbone: DinoBackbone, num_classes: int, cfg: DetectModelConfig) -> DinoDetr:
    """The DETR-style detector on ``backbone`` with the sizes of ``cfg``."""
    head = DetrHead(backbone.embed_dim, num_classes, cfg.num_queries, cfg.decoder_layers, cfg.hidden_dim,
                    cfg.num_heads, cfg.ffn_dim, cfg.sampling_points, list(cfg.pyramid_scales), cfg.decoder_dropout,
                    backbone.patch_size)
    return DinoDetr(backbone, head)
