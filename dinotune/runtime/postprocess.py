"""The torch path's post-processing in numpy: the per-image records ``dinotune predict`` writes.

- classification (``ClassifyTask.predict``): softmax, top-k classes;
- detection (``DetectTask.predict``): the graph's top-k boxes in original pixels, thresholded, as
  COCO ``xywh`` with the dataset's category ids; image ids from an image-info mapping, numeric
  file stems, or 1..N;
- segmentation (``tasks/segment/inference.py`` + ``SegmentTask.predict``): logits resized to the
  label size by bilinear interpolation (``align_corners=False``, no antialiasing: torch's
  ``F.interpolate``), whole-image or in overlapping windows averaged, arg-max, class shares.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from dinotune.errors import DataError

__all__ = ["classify_record", "detection_record", "image_ids", "resize_logits", "crop_and_resize",
           "window_starts", "default_stride", "segment_logits", "class_shares"]


# ----------------------------------------------------------------------------- classification
def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``N x K`` float32 logits."""
    x = logits.astype(np.float32)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def classify_record(image: str, logits: np.ndarray, names: Sequence[str], top_k: int) -> dict[str, Any]:
    """``{"image", "predictions": [{"class", "index", "score"}]}``: the ``min(top_k, K)`` best
    classes of one image's ``K`` logits, best first."""
    probs = softmax(logits[None])[0]
    k = min(int(top_k), len(names))
    order = np.argsort(-probs, kind="stable")[:k]
    return {"image": image, "predictions": [{"class": names[int(c)], "index": int(c), "score": float(probs[c])}
                                            for c in order]}


# ---------------------------------------------------------------------------------- detection
def image_ids(paths: Sequence[Path], mapping: dict[str, int] | None) -> dict[str, int]:
    """COCO image ids (``DetectTask``'s rule): from ``mapping`` (file name -> id), else numeric file
    stems (``000000123456.jpg`` -> 123456) when they are all distinct, else 1..N in order."""
    if mapping:
        missing = [p.name for p in paths if p.name not in mapping]
        if missing:
            raise DataError(f"image info has no id for {', '.join(missing[:5])}")
        return {str(p): int(mapping[p.name]) for p in paths}
    if all(p.stem.isdigit() for p in paths) and len({int(p.stem) for p in paths}) == len(paths):
        return {str(p): int(p.stem) for p in paths}
    return {str(p): i + 1 for i, p in enumerate(paths)}


def detection_record(image: str, image_id: int, size: tuple[int, int], scores: np.ndarray, labels: np.ndarray,
                     boxes: np.ndarray, categories: Sequence[dict[str, Any]], threshold: float, top_k: int,
                     category_ids: str) -> dict[str, Any]:
    """One image's record from the graph's ``k`` detections (``scores`` k, ``labels`` k, ``boxes``
    ``k x 4`` xyxy original pixels, best first): those scoring at least ``threshold``, at most
    ``top_k``, boxes as ``xywh`` rounded to 2 decimals, scores to 5; ``category_id`` the dataset's
    id (``coco``) or the class index (``yolo``). ``size`` is ``(h, w)``."""
    keep = scores >= threshold
    xyxy = boxes[keep].astype(np.float32)
    xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1).tolist()[:top_k]
    detections = []
    for lab, score, box in zip(labels[keep].tolist(), scores[keep].tolist(), xywh):
        lab = int(lab)
        detections.append({"category_id": lab if category_ids == "yolo" else int(categories[lab]["id"]),
                           "category": categories[lab]["name"], "bbox": [round(v, 2) for v in box],
                           "score": round(float(score), 5)})
    h, w = size
    return {"image": image, "image_id": image_id, "width": int(w), "height": int(h), "detections": detections}


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
    """``tasks/segment/inference.crop_and_resize``: logits of a padded ``input_size`` input -> its
    top-left ``valid_size`` region at ``out_size`` (cropped on the logit grid when the region falls
    on cell borders, else after upsampling to input pixels)."""
    (ih, iw), (vh, vw) = input_size, valid_size
    lh, lw = logits.shape[-2:]
    ch, cw = vh * lh / ih, vw * lw / iw
    if float(ch).is_integer() and float(cw).is_integer():
        return resize_logits(logits[..., : int(ch), : int(cw)], out_size)
    return resize_logits(resize_logits(logits, (ih, iw))[..., :vh, :vw], out_size)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows covering ``0..size``; the last one ends at the border."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts


def default_stride(window: int, patch_size: int) -> int:
    """Two thirds of ``window``, rounded down to a multiple of ``patch_size`` (at least one patch)."""
    return max(patch_size, window * 2 // 3 // patch_size * patch_size)


def segment_logits(forward: Callable[[np.ndarray], np.ndarray], image: np.ndarray, out_size: Sequence[int],
                   valid_size: Sequence[int], mode: str, window: int, stride: int, window_batch: int) -> np.ndarray:
    """``K x out_size`` logits of one ``C x H x W`` image (zero-padded beyond ``valid_size``), as
    ``predict_logits``. ``forward``: ``N x C x window x window -> N x K x h x w``. ``mode``
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


def label_map(logits: np.ndarray) -> np.ndarray:
    """``K x H x W`` logits -> ``H x W`` arg-max labels (uint8 up to 255 classes, as the torch path)."""
    labels = logits.argmax(0)
    return labels.astype(np.uint8 if logits.shape[0] <= 255 else np.int64)


def class_shares(mask: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """``{class name: fraction of pixels}`` for the classes present, rounded to 5 decimals."""
    counts = np.bincount(mask.ravel(), minlength=len(names))
    return {names[c]: round(float(v) / mask.size, 5) for c, v in enumerate(counts) if v}
