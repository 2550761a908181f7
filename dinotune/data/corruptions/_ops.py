"""Numpy re-implementations of the OpenCV / scikit-image / ImageMagick pieces the ImageNet-C code
uses, shared by the corruption modules (kept dependency-free: numpy, scipy, PIL only).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.signal import fftconvolve


def to_float(x: np.ndarray, dtype=np.float64) -> np.ndarray:
    return x.astype(dtype) / 255.0


def to_uint8(x01: np.ndarray) -> np.ndarray:
    """[0, 1] floats to uint8 the way the original stores them: ``np.uint8(clip(x) * 255)`` truncates."""
    return (np.clip(x01, 0.0, 1.0) * 255.0).astype(np.uint8)


def correlate(image: np.ndarray, kernel: np.ndarray, pad_mode: str) -> np.ndarray:
    """2-D correlation of each channel of ``H x W (x C)`` with a ``(2r+1) x (2r+1)`` kernel.

    Same result as ``scipy.ndimage.correlate`` with the matching border mode, computed by FFT so large
    kernels (motion blur, defocus) stay fast. ``pad_mode`` is a ``np.pad`` mode: ``"reflect"`` is
    OpenCV's default BORDER_REFLECT_101, ``"edge"`` ImageMagick's default virtual pixels.
    """
    r0, r1 = kernel.shape[0] // 2, kernel.shape[1] // 2
    pad = [(r0, r0), (r1, r1)] + [(0, 0)] * (image.ndim - 2)
    padded = np.pad(image, pad, mode=pad_mode)
    flipped = kernel[::-1, ::-1]
    if image.ndim == 3:
        flipped = flipped[..., None]
    return fftconvolve(padded, flipped, mode="valid", axes=(0, 1))


def gaussian(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """``skimage.filters.gaussian`` (defaults: mode 'nearest', truncate 4) over the spatial axes only."""
    sigmas = (sigma, sigma) + (0,) * (x.ndim - 2)
    return ndimage.gaussian_filter(x, sigmas, mode=mode, truncate=truncate)


def clipped_zoom(img: np.ndarray, zoom_factor: float) -> np.ndarray:
    """Zoom into the centre of a 2-D array by ``zoom_factor`` keeping its shape (the original's
    ``clipped_zoom``, generalised to non-square arrays)."""
    h, w = img.shape[:2]
    ch, cw = int(np.ceil(h / zoom_factor)), int(np.ceil(w / zoom_factor))
    top, left = (h - ch) // 2, (w - cw) // 2
    zoomed = ndimage.zoom(img[top:top + ch, left:left + cw], zoom_factor, order=1)
    trim_top, trim_left = (zoomed.shape[0] - h) // 2, (zoomed.shape[1] - w) // 2
    return zoomed[trim_top:trim_top + h, trim_left:trim_left + w]


def motion_kernel(radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick ``MotionBlurImage``'s kernel as a 2-D correlation kernel.

    ImageMagick averages ``width = 2 * ceil(radius) + 1`` pixels along a ray from each pixel, pixel
    ``i`` at offset ``(ceil(i cos a - .5), ceil(i sin a - .5))`` weighted by ``exp(-i^2 / 2 sigma^2)``
    (normalised): a one-sided trail, not a symmetric line.
    """
    width = 2 * int(np.ceil(radius)) + 1
    i = np.arange(width)
    weights = np.exp(-(i.astype(np.float64) ** 2) / (2.0 * sigma ** 2))
    weights /= weights.sum()
    theta = np.deg2rad(angle)
    dx = np.ceil(i * np.cos(theta) - 0.5).astype(int)
    dy = np.ceil(i * np.sin(theta) - 0.5).astype(int)
    r = width - 1
    kernel = np.zeros((2 * r + 1, 2 * r + 1))
    np.add.at(kernel, (r + dy, r + dx), weights)
    return kernel


def motion_blur(x: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    return correlate(x, motion_kernel(radius, sigma, angle), pad_mode="edge")


def cv2_gaussian_kernel(ksize: int, sigma: float) -> np.ndarray:
    """``cv2.getGaussianKernel(ksize, sigma)`` for ``sigma > 0``."""
    t = np.arange(ksize) - (ksize - 1) / 2.0
    k = np.exp(-(t ** 2) / (2.0 * sigma ** 2))
    return k / k.sum()


def disk(radius: int, alias_blur: float) -> np.ndarray:
    """The original's anti-aliased disk kernel (``disk()``): a normalised disk on a grid of at least
    17 x 17, smoothed by a 3 x 3 (radius <= 8) or 5 x 5 Gaussian (``cv2.GaussianBlur``)."""
    if radius <= 8:
        grid, ksize = np.arange(-8, 8 + 1), 3
    else:
        grid, ksize = np.arange(-radius, radius + 1), 5
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    g = cv2_gaussian_kernel(ksize, alias_blur)
    disk = ndimage.correlate1d(disk, g, axis=0, mode="mirror")  # OpenCV's BORDER_REFLECT_101
    return ndimage.correlate1d(disk, g, axis=1, mode="mirror")


def plasma_fractal(mapsize: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """Diamond-square height map in [0, 1], ``mapsize`` a power of two (the original's
    ``plasma_fractal``, itself from FLHerne/mapgen), including its ``wibble * U(-wibble, wibble)``."""
    assert mapsize & (mapsize - 1) == 0
    maparray = np.zeros((mapsize, mapsize), dtype=np.float64)
    stepsize = mapsize
    wibble = 100.0

    def wibbledmean(array: np.ndarray) -> np.ndarray:
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        half = stepsize // 2
        # squares: each square's centre is the mean of its corners plus noise
        corners = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        square = corners + np.roll(corners, shift=-1, axis=0)
        square += np.roll(square, shift=-1, axis=1)
        maparray[half:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(square)
        # diamonds: each edge midpoint is the mean of its two corners and two centres plus noise
        centres = maparray[half:mapsize:stepsize, half:mapsize:stepsize]
        corners = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        left = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        maparray[0:mapsize:stepsize, half:mapsize:stepsize] = wibbledmean(left)
        top = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        maparray[half:mapsize:stepsize, 0:mapsize:stepsize] = wibbledmean(top)
        stepsize //= 2
        wibble /= wibbledecay

    maparray -= maparray.min()
    peak = maparray.max()
    return maparray / peak if peak > 0 else maparray


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 1).bit_length()


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """``H x W x 3`` RGB in [0, 1] to HSV in [0, 1] (scikit-image's ``rgb2hsv`` conventions)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    delta = v - rgb.min(axis=-1)
    safe_v = np.where(v > 0, v, 1.0)
    safe_delta = np.where(delta > 0, delta, 1.0)
    s = np.where(v > 0, delta / safe_v, 0.0)
    h = np.where(b == v, 4.0 + (r - g) / safe_delta,
                 np.where(g == v, 2.0 + (b - r) / safe_delta, (g - b) / safe_delta))
    h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    return np.stack([h, s, v], axis=-1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_hsv` (scikit-image's ``hsv2rgb``)."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    h6 = h * 6.0
    i = np.floor(h6)
    f = h6 - i
    i = i.astype(np.int64) % 6
    p = v * (1.0 - s)
    q = v * (1.0 - f * s)
    t = v * (1.0 - (1.0 - f) * s)
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def gray(rgb: np.ndarray) -> np.ndarray:
    """``cv2.cvtColor(x, COLOR_RGB2GRAY)`` on float RGB."""
    return rgb @ np.array([0.299, 0.587, 0.114], dtype=rgb.dtype)
