"""Metrics of the single-object detectors: one predicted (class, box, score) per image against one
ground-truth object per image (its largest, see ``single.largest_objects``).

- ``accuracy``: fraction of images whose predicted class is right.
- ``precision`` / ``recall`` / ``f1``: macro means over the classes PRESENT in the ground truth or
  the predictions (not all ``K``), with 0 for a 0/0 (a class predicted but absent has recall 0, a
  class never predicted has precision 0): exactly scikit-learn's
  ``precision_recall_fscore_support(gt, pred, labels=present, average="macro", zero_division=0)``.
- ``mean_iou``: mean over images of the geometric IoU of the predicted box with the ground-truth box
  (areas and intersections in float64; disjoint boxes give 0).
- ``map50``: COCO AP at IoU 0.5, averaged over classes with ground truth. For class ``c`` the
  detections are the images predicted as ``c``, ranked by score; one is a true positive iff its
  image's ground truth is ``c`` and IoU >= 0.5. Precision is made monotone and sampled at COCO's 101
  recall points, with pycocotools' exact arithmetic, so it equals ``COCOeval``'s ``AP50`` on the same
  data written as COCO dicts (images in input order, ids 1..N; checked in the tests).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from dinotune.ops import box_ops

__all__ = ["single_object_metrics", "average_precision_coco", "SINGLE_OBJECT_KEYS"]

# the scores ``single_object_metrics`` returns (what a single-object run may be judged by)
SINGLE_OBJECT_KEYS = ("accuracy", "precision", "recall", "f1", "mean_iou", "map50")

REC_THRS = np.linspace(0.0, 1.0, 101)  # pycocotools' recThrs


def average_precision_coco(scores: np.ndarray, is_tp: np.ndarray, num_gt: int) -> float:
    """COCO 101-point AP of detections ``scores`` / ``is_tp`` (same order as pycocotools: ties keep
    input order) against ``num_gt`` ground-truth objects (> 0)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    tps = np.asarray(is_tp, dtype=bool)[order]
    tp = np.cumsum(tps).astype(float)
    fp = np.cumsum(~tps).astype(float)
    recall = tp / num_gt
    precision = (tp / (fp + tp + np.spacing(1))).tolist()
    for i in range(len(precision) - 1, 0, -1):  # precision envelope, right to left
        if precision[i] > precision[i - 1]:
            precision[i - 1] = precision[i]
    inds = np.searchsorted(recall, REC_THRS, side="left")
    q = [precision[i] if i < len(precision) else 0.0 for i in inds]
    return float(np.mean(q))


def single_object_metrics(pred_labels: Tensor, pred_scores: Tensor, pred_boxes: Tensor, gt_labels: Tensor,
                          gt_boxes: Tensor, num_classes: int) -> dict[str, Any]:
    """Metrics of ``N`` single-object predictions (boxes ``xyxy``, any common unit, e.g. original
    pixels or normalised) against ``N`` ground-truth objects.

    Returns:
        ``accuracy``, ``precision``, ``recall``, ``f1`` (macro over present classes),
        ``mean_iou``, ``map50`` (floats), ``per_class_ap50`` (``K`` floats, None for a class with
        no ground truth) and ``count`` (``N``).

    Raises:
        ValueError: mismatched shapes, ``N == 0``, a ground-truth label outside ``[0, num_classes)``
            (filter images without an object, label -1 from ``largest_objects``, before calling) or a
            predicted label outside ``[-1, num_classes)``; ``-1`` means the detector predicted
            nothing for that image (counted wrong, IoU 0, nobody's false positive).
    """
    pl = pred_labels.detach().to("cpu", torch.int64).reshape(-1)
    gl = gt_labels.detach().to("cpu", torch.int64).reshape(-1)
    scores = pred_scores.detach().to("cpu", torch.float64).reshape(-1)
    pb = pred_boxes.detach().to("cpu", torch.float64).reshape(-1, 4)
    gb = gt_boxes.detach().to("cpu", torch.float64).reshape(-1, 4)
    n, k = gl.numel(), int(num_classes)
    if n == 0:
        raise ValueError("single_object_metrics needs at least one image")
    if not (pl.numel() == scores.numel() == pb.shape[0] == gb.shape[0] == n):
        raise ValueError(f"inconsistent lengths: labels {pl.numel()}/{n}, scores {scores.numel()}, "
                         f"boxes {pb.shape[0]}/{gb.shape[0]}")
    if int(gl.min()) < 0 or int(gl.max()) >= k:
        raise ValueError(f"gt_labels must lie in [0, {k}), got [{int(gl.min())}, {int(gl.max())}]")
    if int(pl.min()) < -1 or int(pl.max()) >= k:
        raise ValueError(f"pred_labels must lie in [-1, {k}) (-1: no prediction), got [{int(pl.min())}, {int(pl.max())}]")

    # column k collects "no prediction" (-1): wrong for accuracy and recall, no class's false positive
    none = pl < 0
    col = torch.where(none, torch.full_like(pl, k), pl)
    cm = torch.bincount(gl * (k + 1) + col, minlength=k * (k + 1)).view(k, k + 1).to(torch.float64)
    tp, predicted, support = cm[:, :k].diag(), cm[:, :k].sum(0), cm.sum(1)
    present = (predicted + support) > 0

    def safe(num: Tensor, den: Tensor) -> Tensor:
        return torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))

    precision = safe(tp, predicted)[present]
    recall = safe(tp, support)[present]
    f1 = safe(2 * tp, predicted + support)[present]  # = 2pr / (p + r), 0 where both are 0

    ious = box_ops.pairwise_iou_matched(pb, gb).masked_fill(none, 0.0)
    hit = ((pl == gl) & (ious >= 0.5)).numpy()
    per_class: list[float | None] = []
    for c in range(k):
        num_gt = int((gl == c).sum())
        sel = (pl == c).numpy()
        per_class.append(average_precision_coco(scores.numpy()[sel], hit[sel], num_gt) if num_gt else None)
    defined = [ap for ap in per_class if ap is not None]
    return {
        "accuracy": float((pl == gl).to(torch.float64).mean()),
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
        "mean_iou": float(ious.mean()),
        "map50": float(np.mean(defined)),
        "per_class_ap50": per_class,
        "count": n,
    }
