"""ViTDet's simple feature pyramid (Li et al. 2022): multi-scale maps from a plain ViT's last layer,
and the resampling stages it is built from (the segmentation FPN decoder uses them too).

A scale factor ``s`` of the patch map (stride ``p``, the backbone's patch size) gives a level of
stride ``p / s``: for ``p = 14``, ``2`` -> 7, ``1`` -> 14, ``0.5`` -> 28. Up-sampling uses stride-2
transposed convolutions, down-sampling ``ceil_mode`` max-pooling, so odd patch grids work
(5 x 5 -> 10, 5, 3).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from dinotune.config.base import PYRAMID_SCALES


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the most groups ``<= max_groups`` that divide ``channels`` and hold at least
    two channels each: a one-channel group over a 1 x 1 map (a coarse level of a small image) has
    a single value, which GroupNorm refuses."""
    most = min(max_groups, max(1, channels // 2))
    groups = next(g for g in range(most, 0, -1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


SCALES = PYRAMID_SCALES  # the resampling factors a stage can apply


def resample_stage(in_dim: int, scale: float) -> tuple[nn.Module, int]:
    """The resampling stage for one scale factor (one of ``SCALES``) and the channels it outputs:
    ``B x in_dim x h x w`` -> ``B x C' x (s h) x (s w)`` (``ceil`` for down-sampling)."""
    half, quarter = max(1, in_dim // 2), max(1, in_dim // 4)
    if scale == 4:
        return nn.Sequential(
            nn.ConvTranspose2d(in_dim, half, kernel_size=2, stride=2),
            group_norm(half),
            nn.GELU(),
            nn.ConvTranspose2d(half, quarter, kernel_size=2, stride=2),
        ), quarter
    if scale == 2:
        return nn.ConvTranspose2d(in_dim, half, kernel_size=2, stride=2), half
    if scale == 1:
        return nn.Identity(), in_dim
    if scale == 0.5:
        return nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True), in_dim
    if scale == 0.25:
        return nn.Sequential(
            nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True),
            nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True),
        ), in_dim
    raise ValueError(f"pyramid scale {scale} is not one of {', '.join(f'{s:g}' for s in SCALES)}")


class SimpleFeaturePyramid(nn.Module):
    """``B x in_dim x h x w`` -> one ``B x out_dim x (s h) x (s w)`` map per scale, fine to coarse.

    Args:
        in_dim: channels of the patch map.
        out_dim: channels of every level.
        scales: scale factors of the patch map, each one of ``SCALES``.
        patch_size: the backbone's patch size (the patch map's stride), for ``strides``.
    """

    def __init__(self, in_dim: int, out_dim: int, scales: Sequence[float], patch_size: int):
        super().__init__()
        if not scales:
            raise ValueError("the feature pyramid needs at least one scale")
        if len(set(scales)) != len(scales):
            raise ValueError(f"repeated pyramid scales: {list(scales)}")
        self.scales = sorted((float(s) for s in scales), reverse=True)
        self.out_dim = out_dim
        self.patch_size = patch_size
        self.stages = nn.ModuleList()
        for scale in self.scales:
            resample, channels = resample_stage(in_dim, scale)
            self.stages.append(nn.Sequential(
                resample,
                nn.Conv2d(channels, out_dim, kernel_size=1, bias=False),
                group_norm(out_dim),
                nn.Conv2d(out_dim, out_dim, kernel_size=3, padding=1, bias=False),
                group_norm(out_dim),
            ))

    @property
    def strides(self) -> list[float]:
        """Pixel stride of each level."""
        return [self.patch_size / s for s in self.scales]

    def forward(self, patch_map: Tensor) -> list[Tensor]:
        return [stage(patch_map) for stage in self.stages]
