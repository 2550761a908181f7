"""Segmentation decoders on DINOv2 patch maps and the ``Segmenter`` that joins them to a backbone.

- ``LinearDecoder``: BatchNorm + 1x1 conv on the concatenated patch maps of the last ``n``
  blocks (``n = 1``: last layer only; ``n = 4``: the official DINOv2 linear segmentation
  evaluation without its multi-scale test-time augmentation). Logits at the patch stride ``p``.
- ``FPNDecoder``: one block per pyramid level, resampled ViTDet style (shallow block -> finest
  scale), lateral 1x1 convs, a top-down path, 3x3 smoothing, then all levels upsampled to the
  finest, concatenated and fused ("UPerNet-lite"). Logits at stride ``p / scales[0]`` (3.5 px
  for 14-pixel patches and the default first scale 4).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinotune.backbone.model import DinoBackbone
from dinotune.config import SegmentModelConfig
from dinotune.models.pyramid import SCALES, group_norm, resample_stage
from dinotune.models.wrapper import BackboneHead

# Scale of the patch map for each FPN level, shallow (first) block -> finest level.
FPN_SCALES = SCALES


class LinearDecoder(nn.Module):
    """``n`` maps ``B x C x h x w`` -> concat -> BatchNorm2d(C n) -> 1x1 conv -> ``B x K x h x w``.

    ``patch_size``: the stride of the maps (and of the logits) in input pixels."""

    def __init__(self, in_dim: int, num_layers_used: int, num_classes: int, patch_size: int):
        super().__init__()
        if num_layers_used < 1:
            raise ValueError(f"the linear decoder needs at least one layer, got {num_layers_used}")
        self.num_layers_used = num_layers_used
        self.bn = nn.BatchNorm2d(in_dim * num_layers_used)
        self.classifier = nn.Conv2d(in_dim * num_layers_used, num_classes, kernel_size=1)
        self.output_stride = float(patch_size)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        if len(maps) != self.num_layers_used:
            raise ValueError(f"LinearDecoder expects {self.num_layers_used} maps, got {len(maps)}")
        x = torch.cat(list(maps), dim=1) if len(maps) > 1 else maps[0]
        return self.classifier(self.bn(x))


def _conv_norm_relu(in_ch: int, out_ch: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size=kernel, padding=kernel // 2, bias=False),
        group_norm(out_ch),
        nn.ReLU(inplace=True),
    )


class FPNDecoder(nn.Module):
    """Multi-block FPN: ``num_levels`` maps (shallow to deep, all at the patch stride ``p``) ->
    logits at the finest level.

    Level ``i`` resamples block ``i``'s map by ``FPN_SCALES[i]`` (4 levels: x4, x2, x1, x0.5 ->
    strides p/4, p/2, p, 2p; up-sampling by transposed convs, down-sampling by ``ceil_mode``
    max-pooling, so odd grids work). Coarser levels are upsampled to the next finer level's exact
    size in the top-down path and in the fusion, so sizes never need to divide evenly.
    """

    def __init__(self, in_dim: int, num_levels: int, fpn_dim: int, num_classes: int, patch_size: int):
        super().__init__()
        if not 1 <= num_levels <= len(FPN_SCALES):
            raise ValueError(f"the FPN decoder takes 1..{len(FPN_SCALES)} levels, got {num_levels}")
        self.num_levels = num_levels
        self.scales = list(FPN_SCALES[:num_levels])
        self.output_stride = patch_size / self.scales[0]
        self.resample = nn.ModuleList()
        self.lateral = nn.ModuleList()
        for scale in self.scales:
            stage, channels = resample_stage(in_dim, scale)
            self.resample.append(stage)
            self.lateral.append(nn.Sequential(
                nn.Conv2d(channels, fpn_dim, kernel_size=1, bias=False), group_norm(fpn_dim)
            ))
        self.smooth = nn.ModuleList(_conv_norm_relu(fpn_dim, fpn_dim, 3) for _ in self.scales)
        self.fuse = _conv_norm_relu(fpn_dim * num_levels, fpn_dim, 3)
        self.classifier = nn.Conv2d(fpn_dim, num_classes, kernel_size=1)

    def forward(self, maps: Sequence[Tensor]) -> Tensor:
        if len(maps) != self.num_levels:
            raise ValueError(f"FPNDecoder expects {self.num_levels} maps (shallow to deep), got {len(maps)}")
        laterals = [lat(res(m)) for m, res, lat in zip(maps, self.resample, self.lateral)]
        # top-down: coarsest first, each coarser map upsampled onto the next finer one and added
        for i in range(self.num_levels - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="bilinear", align_corners=False
            )
        outs = [smooth(x) for smooth, x in zip(self.smooth, laterals)]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [
            F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in outs[1:]
        ]
        return self.classifier(self.fuse(torch.cat(outs, dim=1)))


def default_fpn_layers(num_blocks: int, levels: int = 4) -> list[int]:
    """``levels`` evenly spaced block indices ending at the last: 12 -> [2, 5, 8, 11], 4 -> [0..3]."""
    return sorted({(i + 1) * num_blocks // levels - 1 for i in range(levels)} - {-1})


class Segmenter(BackboneHead):
    """``backbone`` (DinoBackbone) + ``head`` (decoder); ``layers`` = the block indices it reads.

    ``forward(images B x 3 x H x W) -> B x K x h x w`` logits at the head's ``output_stride``
    (the patch size for linear, a quarter of it for a 4-level fpn); upsampling to the label size
    is the caller's job.
    """

    def __init__(self, backbone: DinoBackbone, head: nn.Module, layers: Sequence[int], decoder: str,
                 num_classes: int):
        super().__init__(backbone, head)
        self.layers = list(layers)
        self.decoder = decoder
        self.num_classes = num_classes

    @property
    def output_stride(self) -> float:
        return float(self.head.output_stride)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.to_head(self.backbone_features(images, self.layers).layer_maps()))


def build_segmenter(backbone: DinoBackbone, num_classes: int, cfg: SegmentModelConfig) -> Segmenter:
    """A ``Segmenter`` from ``cfg`` (``fpn_layers`` empty = 4 evenly spaced blocks)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    p = backbone.patch_size
    if cfg.decoder == "linear":
        layers = backbone.resolve_layers(int(cfg.linear_layers))
        head: nn.Module = LinearDecoder(backbone.embed_dim, len(layers), num_classes, p)
    elif cfg.decoder == "fpn":
        if cfg.fpn_layers:
            layers = sorted(backbone.resolve_layers(list(cfg.fpn_layers)))
            if len(set(layers)) != len(layers):
                raise ValueError(f"fpn_layers {list(cfg.fpn_layers)} name a block twice")
        else:
            layers = default_fpn_layers(backbone.num_layers)
        if len(layers) > len(FPN_SCALES):
            raise ValueError(f"fpn_layers: at most {len(FPN_SCALES)} blocks, got {len(layers)}")
        head = FPNDecoder(backbone.embed_dim, len(layers), cfg.fpn_dim, num_classes, p)
    else:
        raise ValueError(f"unknown segmentation decoder {cfg.decoder!r}: choose linear or fpn")
    return Segmenter(backbone, head, layers, cfg.decoder, num_classes)
