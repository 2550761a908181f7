"""Evaluation-time logits at label resolution: whole-image or sliding-window inference (the
windows and crops of ``runtime/windows.py``, which the numpy runtime uses too).

Geometry follows ``align_corners=False``: a logit cell of stride ``s`` covers ``s`` input pixels,
so cropping the unpadded region and resizing to the label size is consistent at any stride.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from dinotune.runtime.windows import default_stride, logit_crop, window_starts


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def crop_and_resize(logits: Tensor, input_size: tuple[int, int], valid_size: tuple[int, int],
                    out_size: tuple[int, int]) -> Tensor:
    """Logits of a padded ``input_size`` input -> its top-left ``valid_size`` region at ``out_size``,
    cropped on the logit grid when the region falls on cell borders (``windows.logit_crop``), else
    after upsampling to input pixels."""
    cells = logit_crop(input_size, valid_size, logits.shape[-2:])
    if cells is not None:
        return _resize(logits[..., : cells[0], : cells[1]], out_size)
    vh, vw = valid_size
    return _resize(_resize(logits, input_size)[..., :vh, :vw], out_size)


@torch.no_grad()
def predict_logits(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    out_size: tuple[int, int],
    mode: str = "whole",
    window: int = 0,
    stride: int = 0,
    valid_size: tuple[int, int] | None = None,
    window_batch: int = 8,
    patch_size: int | None = None,
) -> Tensor:
    """``B x K x out_size`` logits for ``B x 3 x H x W`` images (padded region cropped off).

    Args:
        model: ``images -> B x K x h x w`` logits at any stride (a ``Segmenter``).
        out_size: ``(H, W)`` of the labels; logits are resized to it (bilinear).
        mode: ``"whole"``: one forward of the batch; ``"slide"``: ``window x window`` crops
            (``window`` a multiple of ``patch_size``) every ``stride`` pixels (0 = two thirds of
            the window, rounded down to a multiple of ``patch_size``), the last aligned to the
            border, images smaller than the window zero-padded; each window's logits are
            upsampled to the window, summed and divided by how many windows cover each pixel.
        valid_size: ``(h, w)`` of the unpadded image inside ``images`` (default: all of it).
        window_batch: slide mode forwards up to this many crops (of all images) at once.
        patch_size: the model's patch size (windows must be multiples of it); default: the
            model's ``patch_size`` attribute.
    """
    height, width = images.shape[-2:]
    vh, vw = valid_size if valid_size is not None else (height, width)
    if mode == "whole":
        return crop_and_resize(model(images).float(), (height, width), (vh, vw), out_size)
    if mode != "slide":
        raise ValueError(f"unknown inference mode {mode!r}: choose whole or slide")
    patch_size = patch_size or getattr(model, "patch_size", None)
    if not patch_size:
        raise ValueError("slide inference needs the model's patch size (pass patch_size)")
    if window <= 0 or window % patch_size:
        raise ValueError(f"slide window {window} must be a positive multiple of the patch size {patch_size}")
    stride = stride or default_stride(window, patch_size)
    if (vh, vw) == (window, window):  # one window is the whole image: skip the double resize
        return crop_and_resize(model(images[..., :vh, :vw]).float(), (vh, vw), (vh, vw), out_size)
    images = images[..., :vh, :vw]
    b = images.shape[0]
    ph, pw = max(vh, window), max(vw, window)
    if (ph, pw) != (vh, vw):
        images = F.pad(images, (0, pw - vw, 0, ph - vh))
    boxes = [(y, x) for y in window_starts(ph, window, stride) for x in window_starts(pw, window, stride)]
    total: Tensor | None = None
    count = torch.zeros(1, 1, ph, pw, device=images.device)
    per_chunk = max(1, window_batch // b)
    for i in range(0, len(boxes), per_chunk):
        chunk = boxes[i : i + per_chunk]
        crops = torch.cat([images[..., y : y + window, x : x + window] for y, x in chunk])
        logits = _resize(model(crops), (window, window)).float()
        if total is None:
            total = logits.new_zeros(b, logits.shape[1], ph, pw)
        for j, (y, x) in enumerate(chunk):
            total[..., y : y + window, x : x + window] += logits[j * b : (j + 1) * b]
            count[..., y : y + window, x : x + window] += 1
    return _resize((total / count)[..., :vh, :vw], out_size)
