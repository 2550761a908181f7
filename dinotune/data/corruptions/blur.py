"""Blur corruptions: defocus, glass, motion, zoom."""

from __future__ import annotations

import numpy as np
from PIL import Image

from dinotune.data.corruptions import _ops as ops


# Constant tables below: hendrycks/robustness ImageNet-C/create_c/make_imagenet_c.py.
_DEFOCUS_BLUR = [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)]  # (disk radius px, alias blur)
_GLASS_BLUR = [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)]  # (sigma, max delta, iterations)
_MOTION_BLUR = [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)]  # ImageMagick (radius, sigma)
# zoom factors, np.arange as in the original (so e.g. severity 1 is 1.00 ... 1.11, 12 factors)
_ZOOM_BLUR = [
    np.arange(1, 1.11, 0.01),
    np.arange(1, 1.16, 0.01),
    np.arange(1, 1.21, 0.02),
    np.arange(1, 1.26, 0.02),
    np.arange(1, 1.31, 0.03),
]


def defocus_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    radius, alias_blur = _DEFOCUS_BLUR[severity - 1]
    kernel = ops.disk(radius, alias_blur)
    return ops.to_uint8(ops.correlate(ops.to_float(x), kernel, pad_mode="reflect"))  # cv2.filter2D's border


def _glass_shuffle(x: np.ndarray, max_delta: int, iterations: int, rng: np.random.Generator) -> None:
    """The original's local pixel shuffle, vectorised; shuffles ``x`` (``H x W x C``) in place.

    The original visits ``h = H-d .. d+1`` and ``w = W-d .. d+1`` (descending) and swaps pixel
    ``(h, w)`` with ``(h + dy, w + dx)``, ``dx, dy`` uniform in ``[-d, d)``. Two such swaps can only
    interact if both their rows and their columns are less than ``2d + 1`` apart, so the pixels of one
    residue class ``(h mod 2d+1, w mod 2d+1)`` can all swap at once. We run the classes one after the
    other (descending, like the original's scan), each pixel swapped once per iteration as in the
    original; only the order between nearby swaps differs, which does not change the look.
    """
    d = int(max_delta)
    height, width = x.shape[:2]
    rows = np.arange(height - d, d, -1)
    cols = np.arange(width - d, d, -1)
    if rows.size == 0 or cols.size == 0:
        return
    flat = x.reshape(height * width, -1)
    period = 2 * d + 1
    for _ in range(iterations):
        for a in range(period - 1, -1, -1):
            hs = rows[rows % period == a]
            if hs.size == 0:
                continue
            for b in range(period - 1, -1, -1):
                ws = cols[cols % period == b]
                if ws.size == 0:
                    continue
                hh, ww = np.meshgrid(hs, ws, indexing="ij")
                shifts = rng.integers(-d, d, size=(2,) + hh.shape)  # np.random.randint(-d, d): [-d, d)
                src = (hh * width + ww).ravel()
                dst = ((hh + shifts[1]) * width + (ww + shifts[0])).ravel()
                tmp = flat[src].copy()
                flat[src] = flat[dst]
                flat[dst] = tmp


def glass_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma, max_delta, iterations = _GLASS_BLUR[severity - 1]
    blurred = ops.to_uint8(ops.gaussian(ops.to_float(x), sigma))
    _glass_shuffle(blurred, max_delta, iterations, rng)
    return ops.to_uint8(ops.gaussian(ops.to_float(blurred), sigma))


def motion_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """ImageMagick-style motion blur (see :func:`ops.motion_kernel`) at an angle uniform in [-45, 45]."""
    radius, sigma = _MOTION_BLUR[severity - 1]
    angle = rng.uniform(-45, 45)
    return ops.to_uint8(ops.motion_blur(ops.to_float(x), radius, sigma, angle))


def zoom_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Average of the image and centre zooms of it: each zoom is a PIL bilinear resize of the centred
    ``1 / factor`` crop back to full size (the original crops + ``scipy.ndimage.zoom(order=1)``)."""
    factors = _ZOOM_BLUR[severity - 1]
    height, width = x.shape[:2]
    img = ops.to_float(x, np.float32)
    channels = [Image.fromarray(np.ascontiguousarray(img[..., c])) for c in range(img.shape[2])]  # mode F
    out = np.zeros_like(img)
    for factor in factors:
        half_w, half_h = width / (2.0 * factor), height / (2.0 * factor)
        box = (width / 2.0 - half_w, height / 2.0 - half_h, width / 2.0 + half_w, height / 2.0 + half_h)
        for c, channel in enumerate(channels):
            out[..., c] += np.asarray(channel.resize((width, height), Image.Resampling.BILINEAR, box=box))
    return ops.to_uint8((img + out) / (len(factors) + 1))
