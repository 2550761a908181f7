"""Sliding windows over an image, and where a padded input's logits are cropped: one copy for the
PyTorch path (``tasks/segment/inference.py``) and the numpy runtime (``runtime/postprocess.py``),
so both cover an image with the same windows and crop it the same way.
"""

from __future__ import annotations

from typing import Sequence


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of ``window``-wide windows every ``stride`` pixels covering ``0..size``; the last
    one ends at the border (added only when the regular ones stop short of it). ``[0]`` when the
    window covers everything."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts


def default_stride(window: int, patch_size: int) -> int:
    """Two thirds of ``window``, rounded down to a multiple of ``patch_size`` (at least one patch)."""
    return max(patch_size, window * 2 // 3 // patch_size * patch_size)


def logit_crop(input_size: Sequence[int], valid_size: Sequence[int], logit_size: Sequence[int]) -> tuple[int, int] | None:
    """Where the top-left ``valid_size`` region of a padded ``input_size`` input ends on its
    ``logit_size`` grid: ``(rows, columns)`` of logit cells when the region falls on cell borders
    (the usual case: sizes are multiples of the patch size), else None (the logits must then be
    upsampled to input pixels before cropping)."""
    (ih, iw), (vh, vw), (lh, lw) = input_size, valid_size, logit_size
    ch, cw = vh * lh / ih, vw * lw / iw
    if float(ch).is_integer() and float(cw).is_integer():
        return int(ch), int(cw)
    return None
