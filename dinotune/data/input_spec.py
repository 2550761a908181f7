"""``InputSpec``: how images enter a model (band count, RGB bands, per-band statistics, file kind),
as the training data decided it and the run saved it (``meta["input"]``).

One typed description for every path that reads images: the PyTorch transforms and the widened
patch embedding (``data/bands.py``, ``backbone/channels.py``), the torch-free runtime of an exported
model (``dinotune.runtime``) and the server's upload checks. It needs no torch.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dinotune.data.arrays import BandLayout, band_header, is_band_file
from dinotune.errors import DataError

# The statistics DINOv2 / DINOv3 were trained with on RGB pictures (ImageNet's)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class InputSpec:
    """The model's input, as the training data decided it.

    Attributes:
        in_channels: bands per image (3 for pictures).
        rgb_bands: 0-based bands shown as red, green, blue; they keep the pretrained RGB kernels.
        mean / std: per-band normalisation, in the units the reader returns (raw values for band
            arrays, [0, 1] for pictures).
        arrays: the files are band arrays (``.npy`` / multi-band TIFF), not pictures.
        layout: axis order of 3-d arrays (``auto``, ``hwc``, ``chw``).
    """

    in_channels: int = 3
    rgb_bands: list[int] = field(default_factory=lambda: [0, 1, 2])
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    arrays: bool = False
    layout: BandLayout = "auto"

    @property
    def is_rgb(self) -> bool:
        """Plain RGB input: the pretrained patch embedding is used as it is."""
        return self.in_channels == 3 and list(self.rgb_bands) == [0, 1, 2]

    def to_meta(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> "InputSpec":
        """The spec a run saved (``meta["input"]``); a run without one reads RGB pictures."""
        return cls.from_dict(meta.get("input"))

    @classmethod
    def from_dict(cls, saved: dict[str, Any] | None) -> "InputSpec":
        """The spec from its saved fields (unknown keys ignored; None or empty: RGB pictures)."""
        if not saved:
            return cls()
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in saved.items() if k in known}
        for key in ("rgb_bands", "mean", "std"):
            if key in values:
                values[key] = list(values[key])
        return cls(**values)


class BandMoments:
    """Per-band mean and standard deviation accumulated over ``n x bands`` blocks of samples, in
    float64. A band that never varies gets std 1: its range is checked, not the variance, since
    ``sq / n - mean^2`` need not cancel to exactly 0 (a constant 17296.85 left std 2e-4, which would
    blow the band up instead of leaving it at 0)."""

    def __init__(self) -> None:
        self.total = self.sq = self.low = self.high = None
        self.count = 0

    def add(self, x: np.ndarray) -> None:
        """``x``: ``n x bands`` samples."""
        x = np.asarray(x, np.float64)
        self.total = x.sum(0) if self.total is None else self.total + x.sum(0)
        self.sq = (x * x).sum(0) if self.sq is None else self.sq + (x * x).sum(0)
        self.low = x.min(0) if self.low is None else np.minimum(self.low, x.min(0))
        self.high = x.max(0) if self.high is None else np.maximum(self.high, x.max(0))
        self.count += x.shape[0]

    def result(self) -> tuple[list[float], list[float]]:
        if not self.count:
            raise DataError("no samples to compute band statistics from")
        mean = self.total / self.count
        std = np.sqrt(np.maximum(self.sq / self.count - mean * mean, 0.0))
        std = np.where((self.high > self.low) & (std > 0), std, 1.0)
        return [float(v) for v in mean], [float(v) for v in std]


# ------------------------------------------------------------------------- files against it
def file_bands(path: Path, layout: BandLayout = "auto") -> int:
    """Band count of a file from its header: 3 for a picture (read as RGB)."""
    path = Path(path)
    return band_header(path, layout).bands if is_band_file(path) else 3


def check_band_counts(paths: Sequence[Path], layout: BandLayout = "auto", expected: int | None = None) -> int:
    """The band count shared by ``paths`` (headers only). A file whose count differs from the rest
    (the most common count, or ``expected``) is refused with a DataError naming it and both
    counts. Pictures count 3 bands. Returns the count (``expected`` when there are no paths)."""
    counts = [file_bands(p, layout) for p in paths]
    if not counts:
        return expected or 3
    usual = expected if expected is not None else Counter(counts).most_common(1)[0][0]
    odd = [(p, c) for p, c in zip(paths, counts) if c != usual]
    if odd:
        where = "the model takes" if expected is not None else "the other files have"
        shown = "; ".join(f"{p} has {c} band(s)" for p, c in odd[:5]) + (" ..." if len(odd) > 5 else "")
        raise DataError(f"{len(odd)} file(s) with another band count than the {usual} {where}: {shown}")
    return usual


def check_inputs(paths: Sequence[Path], spec: InputSpec, where: str) -> None:
    """Refuse (DataError) files of ``where`` (evaluation, validation, prediction) that do not fit the
    model's input: a picture where band arrays were trained on (or the reverse: their units
    differ), or another band count; each named with both counts."""
    for p in paths:
        if is_band_file(p) != spec.arrays:
            kind = "a band array" if spec.arrays else "a picture"
            raise DataError(f"{p}: the model was trained on {'band arrays' if spec.arrays else 'pictures'} "
                            f"({spec.in_channels} bands) but this {where} file is not {kind}")
    check_band_counts(paths, spec.layout, expected=spec.in_channels)
