"""The steps of the PyTorch evaluation transforms in numpy, equal to torchvision's: each task
composes its model input from them (``tasks/<name>/runtime.py``), as its PyTorch path composes
``data/transforms.py`` and its own transforms.

Images are ``H x W x C`` arrays: pictures ``uint8`` RGB (as ``data.images.load_image`` reads them),
band arrays ``float32`` in their own units (as ``data.arrays.read_bands`` reads them). Resizing is
bilinear with antialiasing, as ``torchvision.transforms.v2.functional.resize(antialias=True)``:

- ``uint8``: torch's native kernel (the one torchvision uses on CPUs with AVX2 / AVX512 and on
  ARM): per axis, width first, weights of the triangle filter widened by the scale factor,
  normalised, rounded to ``int16`` fixed point with the most bits that keep the largest weight
  under ``2**15``, sums rounded and clamped back to ``uint8`` after each axis. The result is
  bit-identical to torch's (tested), so the model sees the same pixels on both paths.
- ``float32``: the same filter in floating point (equal to torch's to float rounding).

Then ``[0, 1]`` scaling for pictures (``x * (1/255)``) and per-band ``(x - mean) / std``; the model
input is ``C x H x W`` float32.

Memory: a resize holds its input, its output and one output-sized temporary (each tap's source
rows are gathered at output size; the input is never copied whole into a wider type), and a task
asks ``check_work`` before it resizes, so what an image becomes stays within the pixel limit its
file was read under (``data.images.work_size_problem``).
"""

from __future__ import annotations

import numpy as np

from dinotune.data.images import work_size_problem
from dinotune.data.input_spec import InputSpec
from dinotune.errors import DataError

__all__ = ["resize", "short_side_size", "center_crop", "normalize", "pad_to_multiple", "check_work"]


def check_work(name: str, image: np.ndarray, work: tuple[int, int], max_pixels: int, step: str) -> None:
    """DataError naming ``name`` when ``image`` (``H x W x C``) would become ``work`` ``(h, w)``
    pixels by ``step`` (e.g. "resized to the short side 256"), more than ``max_pixels`` (0 = no
    limit): checked before anything of that size is allocated."""
    problem = work_size_problem(image.shape[:2], work, max_pixels, step)
    if problem:
        raise DataError(f"{name}: {problem}")


def _filter_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Antialiased bilinear weights (torch's ``_compute_indices_min_size_weights_aa``): the first
    source index of each output pixel (``out``) and ``out x taps`` normalised weights."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0  # interp_size 2 (bilinear) / 2, widened when shrinking
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    centers = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    first = np.maximum((centers - support + 0.5).astype(np.int64), 0)  # C++ casts truncate toward zero
    last = np.minimum((centers + support + 0.5).astype(np.int64), in_size)
    taps = int((last - first).max())
    j = np.arange(taps)
    weights = np.clip(1.0 - np.abs((j[None, :] + first[:, None] - centers[:, None] + 0.5) * invscale), 0.0, None)
    weights[j[None, :] >= (last - first)[:, None]] = 0.0
    total = weights.sum(1, keepdims=True)
    weights = weights / np.where(total != 0.0, total, 1.0)
    return first, weights


def _resize_axis(image: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    in_size = image.shape[axis]
    first, weights = _filter_weights(in_size, out_size)
    index = np.minimum(first[:, None] + np.arange(weights.shape[1])[None, :], in_size - 1)
    moved = np.moveaxis(image, axis, 0)
    shape = (-1,) + (1,) * (moved.ndim - 1)
    # each tap gathers its source rows at output size: a copy of the whole input in a wider type
    # (int64 was 8x a 9000 x 9000 photo: 1.9 GB) is never made
    if image.dtype == np.uint8:
        precision = 0  # as many fraction bits as keep the largest weight inside int16
        while precision < 22 and int(0.5 + weights.max() * (1 << (precision + 1))) < (1 << 15):
            precision += 1
        scaled = weights * (1 << precision)
        fixed = np.where(scaled < 0, (scaled - 0.5).astype(np.int64), (scaled + 0.5).astype(np.int64))
        # int32 holds every sum: weights are >= 0 and sum to ~2**precision <= 2**22, so a sum is at
        # most ~255 * 2**22 + rounding < 2**31 (torch's kernel accumulates in 32 bits as well)
        fixed = fixed.astype(np.int32)
        acc = np.full((out_size,) + moved.shape[1:], 1 << (precision - 1), dtype=np.int32)
        term = np.empty_like(acc)
        for k in range(weights.shape[1]):
            np.multiply(moved[index[:, k]], fixed[:, k].reshape(shape), out=term)
            acc += term
        out = np.clip(acc >> precision, 0, 255).astype(np.uint8)
    else:
        w32 = weights.astype(np.float32)
        out = moved[index[:, 0]].astype(np.float32, copy=False) * w32[:, 0].reshape(shape)
        for k in range(1, weights.shape[1]):
            out += moved[index[:, k]] * w32[:, k].reshape(shape)
    return np.moveaxis(out, 0, axis)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``H x W x C`` -> ``height x width x C``, bilinear with antialiasing as torchvision's
    ``resize(antialias=True)``; ``uint8`` stays ``uint8`` (bit-identical to torch), anything else
    becomes ``float32``. The same size returns the input (torchvision does too)."""
    if image.dtype != np.uint8:
        image = image.astype(np.float32, copy=False)
    if image.shape[1] != width:
        image = _resize_axis(image, 1, width)
    if image.shape[0] != height:
        image = _resize_axis(image, 0, height)
    return image


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's ``Resize(size)`` output: the short side ``size``, the long side
    ``int(size * long / short)``."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """dinotune's ``FlooredCenterCrop(size)``: offsets ``(H - size) // 2`` (as transformers'
    processors crop); a smaller image is zero-padded first, as torchvision pads."""
    h, w = image.shape[:2]
    if size > h or size > w:
        top, left = max(0, (size - h) // 2), max(0, (size - w) // 2)
        padded = np.zeros((max(h, size), max(w, size)) + image.shape[2:], dtype=image.dtype)
        padded[top: top + h, left: left + w] = image
        image, (h, w) = padded, padded.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    return image[top: top + size, left: left + size]


def normalize(image: np.ndarray, spec: InputSpec) -> np.ndarray:
    """``H x W x C`` (uint8 picture or float bands) -> ``C x H x W`` float32: pictures scaled to
    [0, 1] (``ToDtype(scale=True)``), then ``(x - mean) / std`` per band."""
    x = image.astype(np.float32)
    if image.dtype == np.uint8:
        x *= np.float32(1.0 / 255)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))


def pad_to_multiple(x: np.ndarray, multiple: int) -> np.ndarray:
    """``C x H x W`` zero-padded at the bottom / right to sides that are multiples of ``multiple``
    (the PyTorch collate functions pad batches this way, after normalisation)."""
    c, h, w = x.shape
    ph, pw = -(-h // multiple) * multiple, -(-w // multiple) * multiple
    if (ph, pw) == (h, w):
        return x
    padded = np.zeros((c, ph, pw), dtype=x.dtype)
    padded[:, :h, :w] = x
    return padded


def eval_crop_input(image: np.ndarray, size: int, spec: InputSpec, name: str = "image", max_pixels: int = 0
                   ) -> np.ndarray:
    """``classify_eval_transform``: short side to ``round(size * 256 / 224)``, center crop ``size``,
    normalise. ``H x W x C`` -> ``C x size x size`` float32. DataError naming ``name`` when the
    resized image would have more than ``max_pixels`` pixels (0 = no limit)."""
    short = int(round(size * 256 / 224))
    h, w = short_side_size(image.shape[0], image.shape[1], short)
    check_work(name, image, (h, w), max_pixels, f"resized to the short side {short}")
    return normalize(center_crop(resize(image, h, w), size), spec)
