"""Digital corruptions: contrast, elastic transform, pixelate, JPEG compression."""

from __future__ import annotations

from io import BytesIO

import numpy as np
from PIL import Image
from scipy import ndimage

from dinotune.data.corruptions import _ops as ops


# Constant tables below: hendrycks/robustness ImageNet-C/create_c/make_imagenet_c.py.
_CONTRAST = [0.4, 0.3, 0.2, 0.1, 0.05]  # factor on the deviation from the per-channel mean
# (alpha: displacement scale, sigma: smoothing px, affine corner jitter px) for 224 x 224 images;
# "244 should have been 224, but ultimately nothing is incorrect" (original comment).
_ELASTIC = [
    (244 * 2, 244 * 0.7, 244 * 0.1),
    (244 * 2, 244 * 0.08, 244 * 0.2),
    (244 * 0.05, 244 * 0.01, 244 * 0.02),
    (244 * 0.07, 244 * 0.01, 244 * 0.02),
    (244 * 0.12, 244 * 0.01, 244 * 0.02),
]
_PIXELATE = [0.6, 0.5, 0.4, 0.3, 0.25]  # downscale factor
_JPEG = [25, 18, 15, 10, 7]  # PIL JPEG quality


def contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = _CONTRAST[severity - 1]
    x = ops.to_float(x)
    means = x.mean(axis=(0, 1), keepdims=True)
    return ops.to_uint8((x - means) * c + means)


def _smooth_noise(height: int, width: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``skimage.filters.gaussian(U(-1, 1), sigma, mode='reflect', truncate=3)``.

    For large sigmas on large images (elastic severity 1 at 512 px: sigma 390, 0.6 s direct) the field
    is so smooth that filtering on a 4x coarser grid, the noise scaled by 1/4 to keep its variance per
    area, then upsampling bilinearly gives the same statistics in a few milliseconds.
    """
    if sigma <= 24 or height * width <= 256 * 256:
        return ndimage.gaussian_filter(rng.uniform(-1, 1, (height, width)), sigma, mode="reflect", truncate=3)
    f = 4
    hc, wc = -(-height // f), -(-width // f)
    coarse = ndimage.gaussian_filter(rng.uniform(-1, 1, (hc, wc)) / f, sigma / f, mode="reflect", truncate=3)
    return ndimage.zoom(coarse, (height / hc, width / wc), order=1, grid_mode=True, mode="nearest")[:height, :width]


def elastic_transform(x: np.ndarray, severity: int, rng: np.random.Generator, affine: bool = True) -> np.ndarray:
    """Random affine warp, then a Gaussian-smoothed random displacement field (the original's
    constants, given for 224 px, scaled by ``s = min(H, W) / 224``: jitter and sigma by ``s``, alpha by
    ``s^2`` so the displacement in pixels grows with ``s`` too). Not monotone over severities (see the
    module docstring). ``affine=False``: the dense-task variant, for tasks whose labels would
    otherwise no longer line up with the moved content (up to ~20% of the side at severity 2): it
    switches to ``_elastic_dense``."""
    alpha, sigma, jitter = _ELASTIC[severity - 1]
    height, width = x.shape[:2]
    s = min(height, width) / 224.0
    alpha, sigma, jitter = alpha * s * s, sigma * s, jitter * s
    img = ops.to_float(x, np.float32)

    if not affine:
        return _elastic_dense(x, severity, rng)
    # random affine: three reference points jittered, the map solved from them (cv2.getAffineTransform)
    centre = np.array([height // 2, width // 2], dtype=np.float64)
    half = max(min(height, width) // 3, 1)
    pts1 = np.array([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    pts2 = pts1 + rng.uniform(-jitter, jitter, size=pts1.shape)
    # output -> input map: A @ p2 + t = p1 (what scipy's affine_transform wants)
    solution = np.linalg.solve(np.hstack([pts2, np.ones((3, 1))]), pts1)
    matrix, offset = solution[:2].T, solution[2]
    img = np.stack([ndimage.affine_transform(img[..., c], matrix, offset=offset, order=1, mode="mirror")
                    for c in range(img.shape[2])], axis=-1)  # cv2.BORDER_REFLECT_101 == scipy "mirror"

    dx = (_smooth_noise(height, width, sigma, rng) * alpha).astype(np.float32)
    dy = (_smooth_noise(height, width, sigma, rng) * alpha).astype(np.float32)
    yy, xx = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
    coords = np.stack([yy + dy, xx + dx])
    out = np.stack([ndimage.map_coordinates(img[..., c], coords, order=1, mode="reflect")
                    for c in range(img.shape[2])], axis=-1)
    return ops.to_uint8(out)


# imagecorruptions' elastic (Michaelis et al. 2019, used for dense benchmarks such as Cityscapes-C):
# local displacements only, growing steadily with severity, so per-pixel labels remain valid.
_ELASTIC_DENSE_ALPHA = (250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12)


def _elastic_dense(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    height, width = x.shape[:2]
    alpha = _ELASTIC_DENSE_ALPHA[severity - 1]
    sigma = (height * 0.01, width * 0.01)
    max_d = height * 0.005
    img = ops.to_float(x, np.float32)
    dx, dy = (ndimage.gaussian_filter(rng.uniform(-max_d, max_d, size=(height, width)), sigma, mode="reflect",
                                      truncate=3) * alpha for _ in range(2))
    yy, xx = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
    coords = np.stack([yy + dy.astype(np.float32), xx + dx.astype(np.float32)])
    out = np.stack([ndimage.map_coordinates(img[..., c], coords, order=1, mode="reflect")
                    for c in range(img.shape[2])], axis=-1)
    return ops.to_uint8(out)


def pixelate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = _PIXELATE[severity - 1]
    height, width = x.shape[:2]
    image = Image.fromarray(x)
    small = image.resize((max(1, int(width * c)), max(1, int(height * c))), Image.Resampling.BOX)
    return np.asarray(small.resize((width, height), Image.Resampling.BOX))


def jpeg_compression(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    buffer = BytesIO()
    Image.fromarray(x).save(buffer, "JPEG", quality=_JPEG[severity - 1])
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))
