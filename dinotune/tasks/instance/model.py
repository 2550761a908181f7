"""The DETR-style instance segmenter: detection's deformable decoder with a mask per query.

As in Mask DINO and RF-DETR-Seg, each decoder layer's query states go through a shared MLP into a
mask embedding, which is dotted with per-pixel embeddings of a fine map (``B x Q x D`` with
``B x D x Hm x Wm`` -> ``B x Q x Hm x Wm`` mask logits). The fine map is the patch map resampled to
``mask_scale`` (stride ``p / mask_scale``: 3.5 pixels for 14-pixel patches at the default 4) plus
the decoder's finest pyramid level brought to the same size, then a 3 x 3 convolution and a 1 x 1
projection; it covers the whole padded canvas, as the boxes do.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinotune.backbone.model import DinoBackbone
from dinotune.config.instance import InstanceModelConfig
from dinotune.models.pyramid import group_norm, resample_stage
from dinotune.tasks.detect.decoder import MLP
from dinotune.tasks.detect.detr import DetrHead, DinoDetr


class PixelEmbedding(nn.Module):
    """``B x C x h x w`` patch map and the pyramid's finest ``B x hidden x H0 x W0`` level ->
    ``B x mask_dim x (s h) x (s w)`` per-pixel embeddings (``s = mask_scale``)."""

    def __init__(self, in_dim: int, hidden_dim: int, mask_dim: int, mask_scale: float):
        super().__init__()
        self.resample, channels = resample_stage(in_dim, mask_scale)
        self.project = nn.Conv2d(channels, hidden_dim, kernel_size=1)
        self.fuse = nn.Sequential(
            nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, padding=1, bias=False),
            group_norm(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, mask_dim, kernel_size=1),
        )

    def forward(self, patch_map: Tensor, finest: Tensor) -> Tensor:
        fine = self.project(self.resample(patch_map))
        # the decoder's level carries what its queries attended to; bilinear when the sizes differ
        if finest.shape[-2:] != fine.shape[-2:]:
            finest = F.interpolate(finest, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(fine + finest)


class MaskDetrHead(DetrHead):
    """``DetrHead`` plus masks: ``forward`` gives ``pred_logits`` ``B x Q x K``, ``pred_boxes``
    ``B x Q x 4`` and ``pred_masks`` ``B x Q x Hm x Wm`` (logits), and the same three keys for each
    earlier decoder layer in ``aux_outputs``.

    Args (besides ``DetrHead``'s):
        mask_dim: width ``D`` of the query and pixel mask embeddings.
        mask_scale: the mask grid as a scale factor of the patch map (one of the pyramid scales).
    """

    def __init__(self, in_dim: int, num_classes: int, num_queries: int, decoder_layers: int, hidden_dim: int,
                 num_heads: int, ffn_dim: int, sampling_points: int, pyramid_scales: Sequence[float],
                 dropout: float, patch_size: int, mask_dim: int, mask_scale: float):
        super().__init__(in_dim, num_classes, num_queries, decoder_layers, hidden_dim, num_heads, ffn_dim,
                         sampling_points, pyramid_scales, dropout, patch_size)
        self.mask_scale = float(mask_scale)
        self.pixel_embed = PixelEmbedding(in_dim, hidden_dim, mask_dim, mask_scale)
        # one MLP for every layer (Mask2Former): each layer's masks are read the same way
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.mask_norm = nn.LayerNorm(hidden_dim)

    def masks(self, hidden: Tensor, pixels: Tensor) -> Tensor:
        """``B x Q x hidden`` query states, ``B x D x Hm x Wm`` pixels -> ``B x Q x Hm x Wm`` logits."""
        return torch.einsum("bqd,bdhw->bqhw", self.mask_embed(self.mask_norm(hidden)), pixels)

    def forward(self, patch_map: Tensor) -> dict:
        levels = self.pyramid(patch_map)
        out = self.decode(levels)
        finest = max(range(len(levels)), key=lambda i: levels[i].shape[-1])
        pixels = self.pixel_embed(patch_map, levels[finest])
        per_layer = [{"pred_logits": lg, "pred_boxes": bx, "pred_masks": self.masks(h, pixels)}
                     for lg, bx, h in zip(out.logits, out.boxes, out.hidden)]
        return {**per_layer[-1], "aux_outputs": per_layer[:-1]}


def build_mask_detr(backbone: DinoBackbone, num_classes: int, cfg: InstanceModelConfig) -> DinoDetr:
    """The DETR-style instance segmenter on ``backbone`` with the sizes of ``cfg``."""
    head = MaskDetrHead(backbone.embed_dim, num_classes, cfg.num_queries, cfg.decoder_layers, cfg.hidden_dim,
                        cfg.num_heads, cfg.ffn_dim, cfg.sampling_points, list(cfg.pyramid_scales),
                        cfg.decoder_dropout, backbone.patch_size, cfg.mask_dim, cfg.mask_scale)
    return DinoDetr(backbone, head)
