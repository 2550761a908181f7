"""The ``bands`` section shared by every task config: N-band (multispectral) input.

Plain pictures (JPEG, PNG, ...) are read as RGB and normalised with the ImageNet mean / std, as
always. Band arrays (``.npy``, multi-band GeoTIFF / TIFF) keep every band; the model's patch
embedding is widened to their band count and each band is normalised with its own mean / std.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dinotune.config.base import ConfigError, opt

BandLayout = Literal["auto", "hwc", "chw"]


@dataclass
class BandsConfig:
    in_channels: int = opt(
        0, "input bands of the model (0 = from the data: 3 for pictures, the band count of .npy / multi-band "
        "TIFF files); other than 3, the patch embedding is widened from the pretrained RGB kernels", ge=0,
    )
    rgb_bands: list[int] = opt(
        [], "0-based bands that are red, green, blue (e.g. 3 2 1 for Sentinel-2 in EuroSAT's order): they keep "
        "the pretrained RGB kernels and are the ones drawn in pictures (empty = the first three bands)", ge=0,
    )
    layout: BandLayout = opt(
        "auto", "axis order of 3-d .npy / TIFF arrays: hwc (height, width, bands), chw, or auto (the axis "
        "smaller than the other two holds the bands; TIFF files say it in their header)", flag="--band-layout",
    )
    stats: Literal["auto", "data"] = opt(
        "auto", "per-band normalisation: auto = ImageNet mean / std for RGB pictures and the training data's "
        "per-band mean / std for band arrays; data = the training data's for every kind of file (saved in the "
        "run; eval and predict use the saved values). --band-mean / --band-std override both",
        flag="--band-stats",
    )
    mean: list[float] = opt(
        [], "per-band mean in the files' own units (raw values of band arrays, [0, 1] for pictures); with "
        "--band-std, used instead of computed statistics", flag="--band-mean",
    )
    std: list[float] = opt([], "per-band standard deviation, in the same units as --band-mean", flag="--band-std",
                           gt=0)

    def validate(self) -> None:
        """Checks that need no data: lengths agree with each other and with ``in_channels``."""
        if bool(self.mean) != bool(self.std):
            raise ConfigError("--band-mean and --band-std go together: give both lists (one value per band) "
                              "or neither")
        if len(self.mean) != len(self.std):
            raise ConfigError(f"--band-mean has {len(self.mean)} values but --band-std {len(self.std)}; give one "
                              "per band")
        if self.in_channels and self.mean and len(self.mean) != self.in_channels:
            raise ConfigError(f"--band-mean / --band-std have {len(self.mean)} values but --in-channels is "
                              f"{self.in_channels}")
        if self.rgb_bands and len(self.rgb_bands) != 3:
            raise ConfigError(f"--rgb-bands takes three band indices (red green blue), got {self.rgb_bands}")
        if self.in_channels and any(b >= self.in_channels for b in self.rgb_bands):
            raise ConfigError(f"--rgb-bands {self.rgb_bands}: band indices are 0-based and must be below "
                              f"--in-channels {self.in_channels}")
