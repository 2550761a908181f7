"""Noise corruptions: gaussian, shot (Poisson), impulse (salt & pepper)."""

from __future__ import annotations

import numpy as np

from dinotune.data.corruptions import _ops as ops


# Constant tables below: hendrycks/robustness ImageNet-C/create_c/make_imagenet_c.py.
_GAUSSIAN_NOISE = [0.08, 0.12, 0.18, 0.26, 0.38]  # std of additive noise, image in [0, 1]
_SHOT_NOISE = [60, 25, 12, 5, 3]  # photons per unit intensity (Poisson rate scale)
_IMPULSE_NOISE = [0.03, 0.06, 0.09, 0.17, 0.27]  # fraction of values hit by salt & pepper


def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = _GAUSSIAN_NOISE[severity - 1]
    x = ops.to_float(x)
    return ops.to_uint8(x + rng.normal(size=x.shape, scale=c))


def shot_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = _SHOT_NOISE[severity - 1]
    x = ops.to_float(x)
    return ops.to_uint8(rng.poisson(x * c) / float(c))


def impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Salt & pepper on every value independently, half salt half pepper, as
    ``skimage.util.random_noise(mode='s&p', amount=c)`` does: coloured specks on RGB."""
    c = _IMPULSE_NOISE[severity - 1]
    x = ops.to_float(x)
    flipped = rng.random(x.shape) < c
    salted = rng.random(x.shape) < 0.5
    x[flipped & salted] = 1.0
    x[flipped & ~salted] = 0.0
    return ops.to_uint8(x)
