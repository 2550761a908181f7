"""Instance masks without torch: the graph's mask logits to boolean masks in original pixels, and
COCO run-length encoding (RLE) of those masks.

The graph's ``masks`` are ``k x Hm x Wm`` logits on a grid covering the whole padded ``S x S``
canvas of ``detect.transforms.resize_pad``: the image at the top-left, resized so its longer side
is ``S``, padding right / bottom. ``original_masks`` does what the PyTorch pipeline
``interpolate(logits, (S, S)) -> [:nh, :nw] -> interpolate(., (h, w)) -> > threshold`` does
(``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``, no antialiasing), with
each bilinear resize written as a per-axis interpolation matrix: resizing is linear and separable,
so the two resizes and the crop between them compose into one ``h x Hm`` matrix for the rows and
one ``w x Wm`` matrix for the columns (``A @ logits @ B.T``), and the ``S x S`` canvas is never
built. Equal to PyTorch's up to float32 rounding (about 1e-6 on the logits).

RLEs are pycocotools' compressed form with the counts as text: ``{"size": [h, w], "counts": str}``,
what COCO results and annotations carry and ``pycocotools.mask`` reads back.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

__all__ = ["canvas_part", "interpolation_matrix", "original_masks", "iter_original_masks", "encode", "encode_logits",
           "decode", "area", "mask_box", "logit"]

# Float32 values one chunk of masks may take while being resized (the largest array of the chunk
# is ``chunk x h x max(w, Wm)``): 64 MB whatever the number of masks or the picture's size.
CHUNK_VALUES = 16 * 2**20


def logit(probability: float) -> float:
    """The mask logit threshold of a probability threshold (``inference.mask_threshold``): a pixel's
    sigmoid is above ``probability`` exactly when its logit is above this."""
    if not 0 < probability < 1:
        raise ValueError(f"mask threshold {probability!r}: a probability between 0 and 1 (exclusive) is expected")
    return math.log(probability / (1 - probability))


def canvas_part(size: Sequence[int], canvas_size: int) -> tuple[int, int]:
    """``(nh, nw)``: the rows and columns of the ``S x S`` canvas the ``(h, w)`` image covers, rounded
    as ``detect.transforms.resize_pad`` rounds them (``min(S, max(1, round(h * S / max(h, w))))``)."""
    h, w = int(size[0]), int(size[1])
    factor = canvas_size / max(h, w)
    return min(canvas_size, max(1, round(h * factor))), min(canvas_size, max(1, round(w * factor)))


def interpolation_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The ``out_size x in_size`` float64 matrix of a 1-D bilinear resize as PyTorch computes it with
    ``align_corners=False`` and a target size (no antialiasing): output ``i`` samples the input at
    ``(i + 0.5) * in / out - 0.5``, clamped at 0, between its two neighbours (the last index
    repeated at the far edge)."""
    # in float32, as PyTorch computes the source positions of a float32 tensor
    scale = np.float32(in_size / out_size)
    src = np.maximum(scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5),
                     np.float32(0.0))
    low = np.minimum(src.astype(np.int64), in_size - 1)  # src >= 0: truncation is the floor
    high = np.minimum(low + 1, in_size - 1)
    frac = np.clip(src - low.astype(np.float32), 0.0, 1.0).astype(np.float64)
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, low), 1.0 - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix


def _axis_matrix(grid: int, canvas_size: int, part: int, out_size: int) -> np.ndarray:
    """``out_size x grid``: grid -> canvas (``canvas_size``), its first ``part`` entries, -> ``out_size``."""
    to_canvas = interpolation_matrix(grid, canvas_size)[:part]
    return (interpolation_matrix(part, out_size) @ to_canvas).astype(np.float32)


def iter_original_masks(logits: np.ndarray, size: Sequence[int], canvas_size: int,
                        threshold: float = 0.0) -> Iterator[np.ndarray]:
    """``original_masks`` in consecutive chunks (``c x h x w`` bool, ``c`` at least 1), so that only
    one chunk of full-size masks exists at a time (see ``CHUNK_VALUES``)."""
    logits = np.asarray(logits)
    if logits.ndim != 3:
        raise ValueError(f"mask logits of shape {logits.shape}: k x Hm x Wm is expected")
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"image size {h} x {w}: both sides must be at least 1 pixel")
    k, grid_h, grid_w = logits.shape
    nh, nw = canvas_part((h, w), canvas_size)
    rows = _axis_matrix(grid_h, canvas_size, nh, h)  # h x Hm
    cols_t = _axis_matrix(grid_w, canvas_size, nw, w).T.copy()  # Wm x w
    chunk = max(1, CHUNK_VALUES // (h * max(w, grid_w)))
    for start in range(0, k, chunk):
        part = logits[start: start + chunk].astype(np.float32, copy=False)
        tall = (rows @ part).reshape(-1, grid_w)  # (c * h) x Wm: the larger product as one matrix product
        yield (tall @ cols_t).reshape(len(part), h, w) > threshold


def original_masks(logits: np.ndarray, size: Sequence[int], canvas_size: int, threshold: float = 0.0) -> np.ndarray:
    """Boolean masks in original pixels from the graph's mask logits.

    Args:
        logits: ``k x Hm x Wm`` float32 logits on a grid covering the ``S x S`` canvas.
        size: the original image's ``(h, w)``.
        canvas_size: ``S``, the canvas side (the export's ``image_size``).
        threshold: a pixel belongs to the object where its resized logit is above this (0: a
            probability above 0.5).

    Returns:
        ``k x h x w`` bool. Use ``iter_original_masks`` (or ``encode_logits``) for many masks of a
        large picture: this array is ``k * h * w`` bytes.
    """
    h, w = int(size[0]), int(size[1])
    chunks = list(iter_original_masks(logits, (h, w), canvas_size, threshold))
    return np.concatenate(chunks) if chunks else np.zeros((0, h, w), dtype=bool)


def encode(masks: np.ndarray) -> list[dict[str, Any]]:
    """COCO RLEs of ``k x h x w`` boolean masks: ``[{"size": [h, w], "counts": str}]`` (pycocotools'
    compressed counts as ASCII text, JSON-ready)."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"masks of shape {masks.shape}: k x h x w is expected")
    if not masks.shape[0]:
        return []
    # pycocotools encodes h x w x k column-major uint8
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def encode_logits(logits: np.ndarray, size: Sequence[int], canvas_size: int,
                  threshold: float = 0.0) -> tuple[list[dict[str, Any]], list[int]]:
    """RLEs and pixel areas of ``original_masks(logits, ...)``, one chunk of full-size masks at a time."""
    rles: list[dict[str, Any]] = []
    areas: list[int] = []
    for masks in iter_original_masks(logits, size, canvas_size, threshold):
        rles += encode(masks)
        areas += [int(v) for v in masks.sum(axis=(1, 2))]
    return rles, areas


def to_rle(segmentation: Mapping[str, Any] | list, size: Sequence[int] | None = None) -> dict[str, Any]:
    """pycocotools' compressed RLE of any COCO ``segmentation``: an RLE with text or byte counts, an
    uncompressed RLE (counts as a list) or polygons (these two need the image's ``size`` (h, w))."""
    if isinstance(segmentation, Mapping) and not isinstance(segmentation.get("counts"), list):
        if "size" not in segmentation or "counts" not in segmentation:
            raise ValueError(f"not a COCO RLE (a size and counts are expected): {str(segmentation)[:80]}")
        counts = segmentation["counts"]
        return {"size": list(segmentation["size"]), "counts": counts.encode("ascii") if isinstance(counts, str)
                else counts}
    if isinstance(segmentation, Mapping):  # uncompressed: it carries its own size
        h, w = segmentation["size"]
        return mask_utils.frPyObjects(dict(segmentation), int(h), int(w))
    if size is None:
        raise ValueError("polygons need the image's size (h, w) to be made a mask")
    h, w = int(size[0]), int(size[1])
    return mask_utils.merge(mask_utils.frPyObjects([list(p) for p in segmentation], h, w))


def decode(segmentation: Mapping[str, Any] | list, size: Sequence[int] | None = None) -> np.ndarray:
    """The ``(h, w)`` bool mask of a COCO ``segmentation``: an RLE (compressed or not), or polygons
    ``[[x0, y0, x1, y1, ...], ...]`` with ``size`` ``(h, w)``."""
    return mask_utils.decode(to_rle(segmentation, size)).astype(bool)


def area(segmentation: Mapping[str, Any] | list, size: Sequence[int] | None = None) -> int:
    """Pixels of a COCO ``segmentation`` (``decode``'s arguments), counted on its RLE."""
    return int(mask_utils.area(to_rle(segmentation, size)))


def mask_box(segmentation: Mapping[str, Any] | list, size: Sequence[int] | None = None) -> list[float]:
    """The ``xywh`` box around a COCO ``segmentation``'s pixels (``[0, 0, 0, 0]`` when it is empty)."""
    return [float(v) for v in mask_utils.toBbox(to_rle(segmentation, size))]
