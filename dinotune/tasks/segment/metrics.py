"""Semantic segmentation metrics from one confusion matrix over the whole evaluation set.

Unlike per-batch IoU averaging (e.g. bitwise AND / OR of label maps batch by batch, then a mean
of the batch IoUs), every pixel of the set counts once: ``IoU_c = TP / (TP + FP + FN)`` with the
sums taken over all pixels, ignore pixels excluded. This is mmsegmentation's definition.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["SegmentationMetrics", "format_iou_table"]


class SegmentationMetrics:
    """Streaming ``K x K`` int64 confusion matrix (rows = ground truth, columns = prediction).

    Args:
        num_classes: ``K``.
        ignore_index: target value of pixels left out of every metric (255).
        class_names: ``K`` names for the per-class dicts; defaults to ``"0" .. "K-1"``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        names = [str(n) for n in class_names] if class_names is not None else [str(i) for i in range(num_classes)]
        if len(names) != num_classes:
            raise ValueError(f"class_names has {len(names)} entries but num_classes is {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = names
        self.reset()

    def reset(self) -> None:
        self._confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @property
    def confusion(self) -> Tensor:
        """The ``K x K`` counts so far (a copy)."""
        return self._confusion.clone()

    def add_confusion(self, confusion: Tensor) -> None:
        """Add counts accumulated elsewhere (another process's shard of the evaluation set)."""
        if tuple(confusion.shape) != (self.num_classes, self.num_classes):
            raise ValueError(f"confusion matrix of shape {tuple(confusion.shape)}, expected "
                             f"{self.num_classes} x {self.num_classes}")
        self._confusion += confusion.to(torch.int64).cpu()

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add predicted labels and targets of the same shape (``B x H x W`` or ``H x W``, integer).

        Raises:
            ValueError: shape mismatch, a float tensor, a target outside ``0..K-1`` that is not
                ``ignore_index``, or a prediction outside ``0..K-1`` on a non-ignored pixel.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError("pred and target must hold integer labels (argmax the logits first)")
        k = self.num_classes
        target = target.detach().to(pred.device, torch.int64).reshape(-1)
        pred = pred.detach().to(torch.int64).reshape(-1)
        keep = target != self.ignore_index
        target, pred = target[keep], pred[keep]
        if target.numel() == 0:
            return
        if int(target.min()) < 0 or int(target.max()) >= k:
            bad = torch.unique(target[(target < 0) | (target >= k)])[:10].tolist()
            raise ValueError(f"target values {bad} are neither in 0..{k - 1} nor ignore_index {self.ignore_index}")
        if int(pred.min()) < 0 or int(pred.max()) >= k:
            raise ValueError(f"predictions must lie in 0..{k - 1}, got [{int(pred.min())}, {int(pred.max())}]")
        if pred.is_cuda and torch.are_deterministic_algorithms_enabled():
            target, pred = target.cpu(), pred.cpu()
        self._confusion += torch.bincount(target * k + pred, minlength=k * k).view(k, k).cpu()

    def compute(self) -> dict[str, Any]:
        """Metrics over every pixel seen since construction or ``reset()``.

        Returns a JSON-serialisable dict:

        - ``mIoU``: mean IoU over the classes with ``TP + FP + FN > 0`` (nanmean: a class neither
          in the ground truth nor predicted is undefined and left out; a class predicted but
          absent from the ground truth has IoU 0 and counts).
        - ``per_class_IoU``: ``{name: IoU}``, ``None`` for the undefined classes.
        - ``per_class_accuracy``: ``{name: TP / ground-truth pixels}``, ``None`` if absent.
        - ``pixel_accuracy``: correct / counted pixels.
        - ``mean_class_accuracy``: mean of the per-class accuracies over classes in the ground truth.
        - ``confusion``: ``K x K`` ints; ``pixels``: counted (non-ignored) pixels.

        Raises:
            RuntimeError: no non-ignored pixel has been seen.
        """
        cm = self._confusion.to(torch.float64)
        pixels = int(self._confusion.sum())
        if pixels == 0:
            raise RuntimeError("SegmentationMetrics.compute() called before any non-ignored pixel was added")
        tp, gt, predicted = cm.diag(), cm.sum(1), cm.sum(0)
        union = gt + predicted - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))

        def per_class(values: Tensor) -> dict[str, float | None]:
            return {n: (None if torch.isnan(v) else float(v)) for n, v in zip(self.class_names, values)}

        return {
            "mIoU": float(iou.nanmean()),
            "per_class_IoU": per_class(iou),
            "per_class_accuracy": per_class(acc),
            "pixel_accuracy": float(tp.sum() / pixels),
            "mean_class_accuracy": float(acc.nanmean()),
            "confusion": self._confusion.tolist(),
            "pixels": pixels,
        }


def format_iou_table(result: dict[str, Any]) -> str:
    """Aligned ``class  IoU  acc  pixels`` table (``-`` for undefined) plus a mean row."""
    confusion = result.get("confusion")
    support = [sum(row) for row in confusion] if confusion else None
    accs = result.get("per_class_accuracy", {})

    def num(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.2f}"

    rows = [
        (name, num(iou), num(accs.get(name)), str(support[i]) if support else "")
        for i, (name, iou) in enumerate(result["per_class_IoU"].items())
    ]
    mean = ("mean", num(result["mIoU"]), num(result.get("mean_class_accuracy")), str(result.get("pixels", "")))
    header = ("class", "IoU", "acc", "pixels")
    widths = [max(len(r[i]) for r in [header, mean, *rows]) for i in range(4)]

    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [fmt(header), rule, *(fmt(r) for r in rows), rule, fmt(mean)]
    lines.append(f"pixel accuracy {num(result['pixel_accuracy'])}")
    return "\n".join(lines)
