"""Weather corruptions: snow, fog, brightness (frost lives in :mod:`.frost_synth`)."""

from __future__ import annotations

import numpy as np

from dinotune.data.corruptions import _ops as ops


# Constant tables below: hendrycks/robustness ImageNet-C/create_c/make_imagenet_c.py.
# (mean, std of flake noise, zoom, threshold, blur radius, blur sigma, image blend)
_SNOW = [
    (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
    (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
    (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
    (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
    (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
]
_FOG = [(1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)]  # (fog amount, fractal wibble decay)
_BRIGHTNESS = [0.1, 0.2, 0.3, 0.4, 0.5]  # added to HSV value


def snow(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    loc, scale, zoom, threshold, radius, sigma, blend = _SNOW[severity - 1]
    img = ops.to_float(x, np.float32)
    layer = rng.normal(size=img.shape[:2], loc=loc, scale=scale)
    layer = ops.clipped_zoom(layer, zoom)
    layer[layer < threshold] = 0
    layer = np.floor(np.clip(layer, 0, 1) * 255) / 255.0  # the original's 8-bit PNG hand-off
    # ImageMagick motion blur in the original; falling flakes, angle uniform in [-135, -45]
    layer = ops.motion_blur(layer, radius, sigma, rng.uniform(-135, -45))
    layer = (np.round(np.clip(layer, 0, 1) * 255) / 255.0)[..., None].astype(np.float32)
    img = blend * img + (1 - blend) * np.maximum(img, ops.gray(img)[..., None] * 1.5 + 0.5)
    return ops.to_uint8(img + layer + np.rot90(layer, k=2))

def fog(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Plasma-fractal haze; the fractal is the next power of two >= the longer side, cropped (as
    ``imagecorruptions`` does; the original crops 224 from 256)."""
    amount, decay = _FOG[severity - 1]
    height, width = x.shape[:2]
    img = ops.to_float(x)
    max_val = img.max()
    fractal = ops.plasma_fractal(ops.next_power_of_2(max(height, width)), decay, rng)[:height, :width]
    img = img + amount * fractal[..., None]
    return ops.to_uint8(img * max_val / (max_val + amount))


def brightness(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = _BRIGHTNESS[severity - 1]
    hsv = ops.rgb_to_hsv(ops.to_float(x))
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return ops.to_uint8(ops.hsv_to_rgb(hsv))
