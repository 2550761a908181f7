"""Detections of overlapping tiles merged into one scene's: the same object seen by two tiles is kept
once.

Matching is by intersection over the smaller box (IoS), class by class, as SAHI's sliced inference
does by default: an object cut by a tile's border gives a partial box lying inside the whole box the
next tile sees, whose IoU with it can be far below any NMS threshold while its IoS is near 1.

- ``nms``: of matched boxes the best-scoring one is kept as it is (the default: a box is always one
  the model predicted, and two touching objects of one class stay two);
- ``union``: matched boxes are merged into the best one, which grows to their union (SAHI's NMM:
  recovers an object no tile saw whole, at the risk of joining neighbours).

torchvision's ``batched_nms`` scores by IoU only and compares every pair; here candidate pairs
come from a grid of cells the size of a tile, so a scene of many thousand boxes costs what its
neighbourhoods hold.
"""

from __future__ import annotations

from typing import Callable, Literal

import numpy as np

MATCH_THRESHOLD = 0.5  # IoS at or above which two same-class boxes are one object (SAHI's default)


def _cells(boxes: np.ndarray, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """``(cell key, box index)`` of every square of side ``cell`` each ``xyxy`` box touches, sorted by
    key (a box no larger than a cell touches at most four)."""
    lo = np.floor(boxes[:, :2] / cell).astype(np.int64)
    hi = np.floor(boxes[:, 2:] / cell).astype(np.int64)
    span = max(int((hi - lo).max(initial=0)) + 1, 1)
    keys, owners = [], []
    for dy in range(span):
        for dx in range(span):
            x, y = lo[:, 0] + dx, lo[:, 1] + dy
            inside = (x <= hi[:, 0]) & (y <= hi[:, 1])
            keys.append((y[inside] << 32) + x[inside])
            owners.append(np.flatnonzero(inside))
    keys, owners = np.concatenate(keys), np.concatenate(owners)
    order = np.argsort(keys, kind="stable")
    return keys[order], owners[order]


def candidate_pairs(boxes: np.ndarray, cell: float, keep: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)``, ``i < j``, of ``N x 4`` ``xyxy`` boxes sharing a ``cell``-sized square
    of the plane (every intersecting pair does), each once; ``keep(i, j)`` filters them square by
    square, so memory follows the pairs kept, never all candidates of a crowded square."""
    n = len(boxes)
    empty = np.zeros(0, np.int64)
    if n < 2:
        return empty, empty
    keys, owners = _cells(boxes, cell)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], len(keys)]
    found = []
    for s, e in zip(starts.tolist(), ends.tolist()):
        if e - s < 2:
            continue
        m = owners[s:e]
        a, b = np.triu_indices(len(m), k=1)
        i, j = np.minimum(m[a], m[b]), np.maximum(m[a], m[b])
        if keep is not None:
            ok = keep(i, j)
            i, j = i[ok], j[ok]
        if len(i):
            found.append(i * n + j)
    if not found:
        return empty, empty
    pairs = np.unique(np.concatenate(found))  # a pair sharing two squares, once
    return pairs // n, pairs % n


def intersection_over_smaller(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoS of ``N x 4`` ``xyxy`` boxes ``a`` and ``b``: intersection / the smaller area."""
    w = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    h = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    smaller = np.minimum(area_a, area_b)
    return np.where(smaller > 0, w * h / np.maximum(smaller, 1e-12), 0.0)


def merge_detections(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, method: Literal["nms", "union"],
                     cell: float, threshold: float = MATCH_THRESHOLD, tiles: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """One detection per object of the scene.

    Args:
        boxes: ``N x 4`` ``xyxy`` scene pixels; scores: ``N``; labels: ``N`` class indices.
        method: ``nms`` or ``union`` (see the module docstring).
        cell: the neighbourhood size (the tile side: no box is larger).
        threshold: IoS at or above which two boxes of one class match.
        tiles: ``N`` tile indices: boxes of one tile never match (the model's own set prediction
            already decided between them: a tiled image predicts what the plain one does).

    Returns:
        ``(kept indices, best first, into the inputs; their boxes, k x 4)``: the boxes are the inputs'
        for ``nms`` and the grown unions for ``union``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    tile_of = np.asarray(tiles) if tiles is not None else None

    def match(i: np.ndarray, j: np.ndarray) -> np.ndarray:
        ok = labels[i] == labels[j]
        if tile_of is not None:
            ok &= tile_of[i] != tile_of[j]
        ok[ok] = intersection_over_smaller(boxes[i[ok]], boxes[j[ok]]) >= threshold
        return ok

    i, j = candidate_pairs(boxes, max(float(cell), 1.0), match)
    # stable order: best score first, ties by input order, so a merge is the same however it was split
    order = np.lexsort((np.arange(len(scores)), -scores))
    rank = np.empty(len(scores), np.int64)
    rank[order] = np.arange(len(scores))
    # each pair pointed from the better-ranked box to the other
    better = np.where(rank[i] < rank[j], i, j)
    worse = np.where(rank[i] < rank[j], j, i)
    by_better: dict[int, list[int]] = {}
    for b, w in zip(better.tolist(), worse.tolist()):
        by_better.setdefault(b, []).append(w)
    gone = np.zeros(len(scores), bool)
    kept: list[int] = []
    out_boxes = boxes.copy()
    for k in order.tolist():
        if gone[k]:
            continue
        kept.append(k)
        for w in by_better.get(k, ()):
            if not gone[w]:
                gone[w] = True
                if method == "union":
                    out_boxes[k, :2] = np.minimum(out_boxes[k, :2], boxes[w, :2])
                    out_boxes[k, 2:] = np.maximum(out_boxes[k, 2:], boxes[w, 2:])
    kept_arr = np.asarray(kept, np.int64)
    return kept_arr, out_boxes[kept_arr]
