"""Frost: a procedurally synthesised ice texture blended with the original's coefficients.

The original blends crops of six frost photographs that ship with it; we have none, so the texture
is generated here (an approximation: frost numbers are not comparable with published ImageNet-C).
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from dinotune.data.corruptions import _ops as ops


_FROST = [(1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75)]  # (image weight, frost weight)


def _noise_octave(height: int, width: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth zero-mean unit-variance noise with features about ``scale`` pixels across."""
    if scale <= 1.5:
        octave = ndimage.gaussian_filter(rng.standard_normal((height, width)), scale / 2)
    else:
        grid = rng.standard_normal((int(np.ceil(height / scale)) + 1, int(np.ceil(width / scale)) + 1))
        size = (int(round(grid.shape[1] * scale)), int(round(grid.shape[0] * scale)))
        octave = np.asarray(Image.fromarray(grid.astype(np.float32)).resize(size, Image.Resampling.BICUBIC))
        octave = octave[:height, :width].astype(np.float64)
    return (octave - octave.mean()) / (octave.std() + 1e-12)


def _fractal_noise(height: int, width: int, scales, weights, rng: np.random.Generator) -> np.ndarray:
    total = sum(w * _noise_octave(height, width, s, rng) for s, w in zip(scales, weights))
    lo, hi = np.percentile(total, [1, 99])
    return np.clip((total - lo) / max(hi - lo, 1e-12), 0, 1)


def _segments(start: np.ndarray, angle: np.ndarray, length: np.ndarray, n_points: int):
    """Points along straight segments (``start``: ``N x 2`` row/col) and per-point ink per pixel."""
    t = np.linspace(0.0, 1.0, n_points)
    step = length[:, None] * t[None, :]
    rows = start[:, 0:1] + np.sin(angle)[:, None] * step
    cols = start[:, 1:2] + np.cos(angle)[:, None] * step
    ink = np.repeat(length / max(n_points - 1, 1), n_points)  # constant ink per unit length
    return rows.ravel(), cols.ravel(), ink


def _frost_crystals(cover: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Feathery ice-crystal streaks in [0, 1]: straight stems with side branches at +-60 degrees
    (ice's hexagonal habit) and twigs on those, denser where ``cover`` (in [0, 1]) is high."""
    height, width = cover.shape
    candidates = rng.uniform((0, 0), (height, width), size=(max(8, int(height * width / 250)), 2))
    cells = cover[candidates[:, 0].astype(int), candidates[:, 1].astype(int)]
    seeds = candidates[rng.random(len(candidates)) < 0.15 + 0.85 * cells ** 2]
    n = len(seeds)
    angle = rng.uniform(0, 2 * np.pi, n)
    length = rng.uniform(15, 60, n)
    strength = rng.uniform(0.5, 1.0, n)
    pieces = [(*_segments(seeds, angle, length, 120), np.repeat(strength, 120))]

    parent = (seeds, angle, length, strength)
    # (children per side, points per child, child length as a fraction of the parent's)
    for n_children, n_points, fraction in ((8, 40, 0.3), (3, 12, 0.35)):
        p_start, p_angle, p_length, p_strength = parent
        t = (np.arange(n_children) + rng.uniform(0, 1, (len(p_start), n_children))) / n_children
        direction = np.stack([np.sin(p_angle), np.cos(p_angle)], axis=-1)
        start = p_start[:, None, :] + (t * p_length[:, None])[..., None] * direction[:, None, :]
        start = np.repeat(start.reshape(-1, 2), 2, axis=0)  # one child on each side
        side = np.tile([np.pi / 3, -np.pi / 3], t.size)
        c_angle = np.repeat(p_angle, n_children * 2) + side + rng.normal(0, 0.1, side.size)
        c_length = (np.repeat(p_length[:, None] * fraction * (1 - 0.7 * t), 2, axis=1).ravel()
                    * rng.uniform(0.6, 1.4, side.size))
        c_strength = np.repeat(p_strength, n_children * 2) * rng.uniform(0.5, 1.0, side.size)
        rows, cols, ink = _segments(start, c_angle, c_length, n_points)
        pieces.append((rows, cols, ink, np.repeat(c_strength, n_points)))
        parent = (start, c_angle, c_length, c_strength)

    rows = np.concatenate([p[0] for p in pieces])
    cols = np.concatenate([p[1] for p in pieces])
    ink = np.concatenate([p[2] * p[3] for p in pieces])
    r, c = np.rint(rows).astype(np.int64), np.rint(cols).astype(np.int64)
    inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
    canvas = np.bincount(r[inside] * width + c[inside], weights=ink[inside],
                         minlength=height * width).reshape(height, width)
    lines = 1.0 - np.exp(-1.2 * ndimage.gaussian_filter(canvas, 0.5))
    glow = ndimage.gaussian_filter(lines, 2.5)
    return np.clip(lines + 0.6 * glow, 0, 1)


def _frost_texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Procedural stand-in for the original's frost photographs, ``H x W x 3`` in [0, 255].

    Patchy ice cover (coarse noise), icy grain (fine noise) and feathery crystal streaks, blue-white
    on a dark blue-grey ground, mean brightness around 0.4 of full scale. An approximation, not the
    photographs.
    """
    cover = _fractal_noise(height, width, (128, 64, 32), (0.5, 0.3, 0.2), rng)
    grain = _fractal_noise(height, width, (6, 3, 1), (0.3, 0.4, 0.3), rng)
    crystals = _frost_crystals(cover, rng)
    ice = 0.1 + 0.3 * cover + 0.15 * grain * (0.3 + 0.7 * cover) + 0.6 * crystals * (0.4 + 0.6 * cover)
    ice = np.clip(ice, 0, 1)
    tint = np.array([0.84, 0.92, 1.0])
    rgb = ice[..., None] * tint + (ice * crystals)[..., None] * (1 - tint) * 0.8  # crystals whiter
    return np.clip(rgb, 0, 1) * 255.0


def frost(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """``clip(a * image + b * frost)`` with the original's ``(a, b)``; the frost layer is synthetic
    (see :func:`_frost_texture`): an approximation of ImageNet-C frost."""
    image_weight, frost_weight = _FROST[severity - 1]
    texture = _frost_texture(x.shape[0], x.shape[1], rng)
    return ops.to_uint8((image_weight * x.astype(np.float64) + frost_weight * texture) / 255.0)
