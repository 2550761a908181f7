"""Dense post-processing in numpy, as the PyTorch path computes it: softmax, logits resized by
bilinear interpolation (``align_corners=False``, no antialiasing: torch's ``F.interpolate``),
the padded region cropped off, whole-image or in overlapping windows averaged. Tasks build their
records on these (``tasks/<name>/runtime.py``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from dinotune.runtime.windows import logit_crop, window_starts

__all__ = ["softmax", "resize_logits", "crop_and_resize", "dense_logits"]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis of float logits, in float32."""
    x = logits.astype(np.float32)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ------------------------------------------------------------------------------- segmentation
def _axis_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's bilinear source indices and weights along one axis (``align_corners=False``)."""
    scale = np.float32(in_size / out_size)
    src = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0)
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = (src - i0).astype(np.float32)
    return i0, i1, frac


def resize_logits(logits: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``... x h x w`` -> ``... x H x W`` (bilinear, ``align_corners=False``, no antialiasing, as
    ``F.interpolate``); the same size is returned as it is."""
    h_out, w_out = int(size[0]), int(size[1])
    x = logits.astype(np.float32, copy=False)
    if x.shape[-1] != w_out:
        i0, i1, f = _axis_weights(x.shape[-1], w_out)
        x = x[..., i0] * (1 - f) + x[..., i1] * f
    if x.shape[-2] != h_out:
        i0, i1, f = _axis_weights(x.shape[-2], h_out)
        x = x[..., i0, :] * (1 - f)[:, None] + x[..., i1, :] * f[:, None]
    return x


def crop_and_resize(logits: np.ndarray, input_size: Sequence[int], valid_size: Sequence[int],
                    out_size: Sequence[int]) -> np.ndarray:
    """Logits of a padded ``input_size`` input -> its top-left ``valid_size`` region at ``out_size``
    (as the PyTorch path's ``tasks/segment/inference.crop_and_resize``; ``windows.logit_crop``
    decides where the crop is taken)."""
    cells = logit_crop(input_size, valid_size, logits.shape[-2:])
    if cells is not None:
        return resize_logits(logits[..., : cells[0], : cells[1]], out_size)
    vh, vw = int(valid_size[0]), int(valid_size[1])
    return resize_logits(resize_logits(logits, input_size)[..., :vh, :vw], out_size)


def dense_logits(forward: Callable[[np.ndarray], np.ndarray], image: np.ndarray, out_size: Sequence[int],
                   valid_size: Sequence[int], mode: str, window: int, stride: int, window_batch: int) -> np.ndarray:
    """``K x out_size`` logits of one ``C x H x W`` image (zero-padded beyond ``valid_size``), as
    the PyTorch path's ``tasks/segment/inference.predict_logits``. ``forward``: ``N x C x window x window -> N x K x h x w``. ``mode``
    ``whole`` needs ``H x W == window x window`` (one forward); ``slide`` runs ``window x window``
    crops every ``stride`` pixels (the last at the border; an image smaller than the window is
    zero-padded), upsamples each to the window, and averages where they overlap."""
    height, width = image.shape[-2:]
    vh, vw = int(valid_size[0]), int(valid_size[1])
    if mode == "whole":
        return crop_and_resize(forward(image[None])[0], (height, width), (vh, vw), out_size)
    if (vh, vw) == (window, window):  # one window is the whole image: no double resize
        return crop_and_resize(forward(image[None, :, :vh, :vw])[0], (vh, vw), (vh, vw), out_size)
    image = image[:, :vh, :vw]
    ph, pw = max(vh, window), max(vw, window)
    if (ph, pw) != (vh, vw):
        padded = np.zeros((image.shape[0], ph, pw), dtype=image.dtype)
        padded[:, :vh, :vw] = image
        image = padded
    boxes = [(y, x) for y in window_starts(ph, window, stride) for x in window_starts(pw, window, stride)]
    total: np.ndarray | None = None
    count = np.zeros((ph, pw), dtype=np.float32)
    for i in range(0, len(boxes), max(1, window_batch)):
        chunk = boxes[i: i + max(1, window_batch)]
        crops = np.stack([image[:, y: y + window, x: x + window] for y, x in chunk])
        logits = resize_logits(forward(crops), (window, window))
        if total is None:
            total = np.zeros((logits.shape[1], ph, pw), dtype=np.float32)
        for j, (y, x) in enumerate(chunk):
            total[:, y: y + window, x: x + window] += logits[j]
            count[y: y + window, x: x + window] += 1
    return resize_logits((total / count)[:, :vh, :vw], out_size)
