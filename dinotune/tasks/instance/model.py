"""The DETR-style instance segmenter: detection's deformable decoder with a mask per query.

As in Mask DINO and RF-DETR-Seg, each decoder layer's query states go through a shared MLP into a
mask embedding, which is dotted with per-pixel embeddings of a fine map (``B x Q x D`` with
``B x D x Hm x Wm`` -> ``B x Q x Hm x Wm`` mask logits). The fine map is the patch map resampled to
``mask_scale`` (stride ``p / mask_scale``: 3.5 pixels for 14-pixel patches at the default 4) plus
the decoder's finest pyramid level brought to the same size, plus a light convolutional stem on
the image itself at stride 4, then a 3 x 3 convolution and a 1 x 1 projection; it covers the whole
padded canvas, as the boxes do. The stem is there because a ViT's patch tokens carry little below
the patch size: object outlines, and objects a few patches wide, need the pixels (the spatial prior
ViT-Adapter adds for Mask2Former on plain ViTs). Measured on 4 real COCO images (the overfit
benchmark), it is what lets masks follow outlines rather than patch-sized blobs.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinotune.backbone.model import DinoBackbone
from dinotune.config.instance import InstanceModelConfig
from dinotune.models.pyramid import group_norm, resample_stage
from dinotune.tasks.detect.decoder import MLP, position_encoding
from dinotune.tasks.detect.detr import DetrHead, DinoDetr


PRIOR_CAP = 3.0  # the box prior's distance cap, in mask cells
FUSE_BLOCKS = 1  # 3 x 3 convolutions on the fused fine map before the mask embedding


class ImageStem(nn.Module):
    """``B x bands x S x S`` image -> ``B x out_dim x S/4 x S/4``: two stride-2 3 x 3 convolutions."""

    def __init__(self, bands: int, out_dim: int, width: int = 32):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(bands, width, kernel_size=3, stride=2, padding=1, bias=False), group_norm(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out_dim, kernel_size=3, stride=2, padding=1),
        )

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images)


class PixelEmbedding(nn.Module):
    """``B x C x h x w`` patch map, the pyramid's finest ``B x hidden x H0 x W0`` level and the
    ``B x bands x S x S`` image -> ``B x mask_dim x (s h) x (s w)`` per-pixel embeddings
    (``s = mask_scale``)."""

    def __init__(self, in_dim: int, hidden_dim: int, mask_dim: int, mask_scale: float, bands: int):
        super().__init__()
        self.resample, channels = resample_stage(in_dim, mask_scale)
        self.project = nn.Conv2d(channels, hidden_dim, kernel_size=1)
        self.stem = ImageStem(bands, hidden_dim)
        blocks = []
        for _ in range(FUSE_BLOCKS):
            blocks += [nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, padding=1, bias=False), group_norm(hidden_dim),
                       nn.ReLU(inplace=True)]
        self.fuse = nn.Sequential(*blocks, nn.Conv2d(hidden_dim, mask_dim, kernel_size=1))

    def forward(self, patch_map: Tensor, finest: Tensor, images: Tensor) -> Tensor:
        fine = self.project(self.resample(patch_map))
        # the decoder's level carries what its queries attended to, the stem the pixels' detail;
        # both brought to the mask grid (bilinear) when their strides differ
        for extra in (finest, self.stem(images.to(fine.dtype))):
            if extra.shape[-2:] != fine.shape[-2:]:
                extra = F.interpolate(extra, size=fine.shape[-2:], mode="bilinear", align_corners=False)
            fine = fine + extra
        # where each pixel is: a query tells two alike objects apart by place (CondInst's coordinates)
        return self.fuse(fine + position_encoding(fine))


class MaskDetrHead(DetrHead):
    """``DetrHead`` plus masks: ``forward`` gives ``pred_logits`` ``B x Q x K``, ``pred_boxes``
    ``B x Q x 4`` and ``pred_masks`` ``B x Q x Hm x Wm`` (logits), and the same three keys for each
    earlier decoder layer in ``aux_outputs``.

    Args (besides ``DetrHead``'s):
        mask_dim: width ``D`` of the query and pixel mask embeddings.
        mask_scale: the mask grid as a scale factor of the patch map (one of the pyramid scales).
        bands: channels of the input images (the stem reads them).
    """

    def __init__(self, in_dim: int, num_classes: int, num_queries: int, decoder_layers: int, hidden_dim: int,
                 num_heads: int, ffn_dim: int, sampling_points: int, pyramid_scales: Sequence[float],
                 dropout: float, patch_size: int, mask_dim: int, mask_scale: float, bands: int = 3):
        super().__init__(in_dim, num_classes, num_queries, decoder_layers, hidden_dim, num_heads, ffn_dim,
                         sampling_points, pyramid_scales, dropout, patch_size)
        self.mask_scale = float(mask_scale)
        self.pixel_embed = PixelEmbedding(in_dim, hidden_dim, mask_dim, mask_scale, bands)
        # one MLP for every layer (Mask2Former): each layer's masks are read the same way
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.mask_norm = nn.LayerNorm(hidden_dim)
        self.box_prior = nn.Parameter(torch.tensor(1.0))  # logits per cell inside the box (see masks)

    def masks(self, hidden: Tensor, pixels: Tensor, boxes: Tensor) -> Tensor:
        """``B x Q x hidden`` query states, ``B x D x Hm x Wm`` pixels, ``B x Q x 4`` the queries'
        boxes (``cxcywh`` on the canvas) -> ``B x Q x Hm x Wm`` logits: the embeddings' dot product
        plus ``box_prior`` times each cell's signed distance (in cells, capped at ``PRIOR_CAP``) to
        the edge of the query's box, positive inside. Boxes are learned within a few dozen steps,
        masks far slower; the prior starts every mask as its box, and the dot product carves the
        object out of it. The boxes are detached: the masks do not pull on them."""
        dot = torch.einsum("bqd,bdhw->bqhw", self.mask_embed(self.mask_norm(hidden)), pixels)
        h, w = dot.shape[-2:]
        ys = (torch.arange(h, device=dot.device, dtype=dot.dtype) + 0.5) / h
        xs = (torch.arange(w, device=dot.device, dtype=dot.dtype) + 0.5) / w
        cx, cy, bw, bh = boxes.detach().to(dot.dtype).unbind(-1)  # B x Q each
        inside_x = torch.minimum(xs - (cx - bw / 2)[..., None], (cx + bw / 2)[..., None] - xs) * w  # B x Q x W
        inside_y = torch.minimum(ys - (cy - bh / 2)[..., None], (cy + bh / 2)[..., None] - ys) * h  # B x Q x H
        distance = torch.minimum(inside_y[..., :, None], inside_x[..., None, :]).clamp(-PRIOR_CAP, PRIOR_CAP)
        return dot + self.box_prior * distance

    def forward(self, patch_map: Tensor, images: Tensor) -> dict:
        """``B x C x h x w`` patch map and the ``B x bands x S x S`` images -> the outputs (class docstring)."""
        levels = self.pyramid(patch_map)
        out = self.decode(levels)
        finest = max(range(len(levels)), key=lambda i: levels[i].shape[-1])
        pixels = self.pixel_embed(patch_map, levels[finest], images)
        per_layer = [{"pred_logits": lg, "pred_boxes": bx, "pred_masks": self.masks(h, pixels, bx)}
                     for lg, bx, h in zip(out.logits, out.boxes, out.hidden)]
        return {**per_layer[-1], "aux_outputs": per_layer[:-1]}


class MaskDinoDetr(DinoDetr):
    """``.backbone`` + ``.head`` (``MaskDetrHead``, which also reads the images)."""

    def forward(self, images: Tensor) -> dict:
        return self.head(self.to_head(self.backbone_features(images).patch_map), self.to_head(images))


def build_mask_detr(backbone: DinoBackbone, num_classes: int, cfg: InstanceModelConfig) -> MaskDinoDetr:
    """The DETR-style instance segmenter on ``backbone`` with the sizes of ``cfg``."""
    bands = backbone.patch_embedding().in_channels
    head = MaskDetrHead(backbone.embed_dim, num_classes, cfg.num_queries, cfg.decoder_layers, cfg.hidden_dim,
                        cfg.num_heads, cfg.ffn_dim, cfg.sampling_points, list(cfg.pyramid_scales),
                        cfg.decoder_dropout, backbone.patch_size, cfg.mask_dim, cfg.mask_scale, bands)
    return MaskDinoDetr(backbone, head)
