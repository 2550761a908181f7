"""Detection charts: per-class AP, precision-recall curve, confidence histogram, sample pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from dinotune.viz.draw import draw_detections, save_image
from dinotune.viz.plots import plot_bars, plot_curve, plot_histogram


def metric_charts(metrics: dict[str, Any], out_dir: Path) -> list[Path]:
    """Per-class AP bars and the PR curve at IoU 0.5 from ``coco_evaluate``'s result."""
    out_dir = Path(out_dir)
    files = []
    per_class = {k: v for k, v in (metrics.get("per_class_AP") or {}).items() if v is not None}
    if per_class:
        ordered = dict(sorted(per_class.items(), key=lambda kv: -kv[1]))
        files.append(plot_bars(ordered, out_dir / "per_class_ap.png", "AP per class (IoU .50:.95)", "AP"))
    pr = metrics.get("precision_recall")
    if pr and pr.get("recall"):
        files.append(plot_curve(pr["recall"], [p if p is not None else 0.0 for p in pr["precision"]],
                                out_dir / "precision_recall.png", f"precision-recall at IoU {pr.get('iou', 0.5)}",
                                "recall", "precision", label=f"AP50 {metrics.get('AP50') or 0:.3f}"))
    return files


def prediction_charts(predictions: Sequence[dict[str, Any]], out_dir: Path, names: Sequence[str],
                      samples: int = 8, score_threshold: float = 0.3) -> list[Path]:
    """Confidence histogram and up to ``samples`` images with their detections drawn.

    ``predictions``: the task's ``predict`` output (image path, detections with xywh boxes)."""
    from dinotune.data.images import load_image

    out_dir = Path(out_dir)
    scores = [d["score"] for p in predictions for d in p["detections"]]
    files = [plot_histogram(scores, out_dir / "confidence_histogram.png", "detection confidences", "score")]
    index = {n: i for i, n in enumerate(names)}
    for p in predictions[:samples]:
        dets = [d for d in p["detections"] if d["score"] >= score_threshold]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in dets)]
        drawn = draw_detections(load_image(p["image"]), boxes, [index.get(d["category"], 0) for d in dets],
                                list(names), [d["score"] for d in dets])
        files.append(save_image(drawn, out_dir / "samples" / f"{Path(p['image']).stem}.jpg"))
    return files
