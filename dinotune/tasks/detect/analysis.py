"""Detection charts: per-class AP, precision-recall curve, confidence histogram, sample pictures."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from dinotune.data.bands import InputSpec, display_image
from dinotune.viz.draw import draw_detections, save_image, side_by_side
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


def confidence_histogram(predictions: Sequence[dict[str, Any]], out_dir: Path) -> Path:
    """``out_dir/confidence_histogram.png`` of every detection's score: where to put a threshold."""
    scores = [d["score"] for p in predictions for d in p["detections"]]
    return plot_histogram(scores, Path(out_dir) / "confidence_histogram.png", "detection confidences", "score")


def _boxes(dets: Sequence[dict[str, Any]], index: dict[str, int]) -> tuple[list[list[float]], list[int]]:
    """xyxy boxes and class indices of ``predict``'s detections (xywh, class names)."""
    boxes = [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in dets)]
    return boxes, [index.get(d["category"], 0) for d in dets]


def draw_predictions(predictions: Sequence[dict[str, Any]], out_dir: Path, names: Sequence[str],
                     threshold: float, spec: InputSpec | None = None) -> list[Path]:
    """Each image with its detections scoring at least ``threshold``, as ``out_dir/<stem>.jpg``
    (``predict --draw DIR`` writes into DIR itself, as segmentation's overlays do). Band arrays are
    drawn through ``spec``'s RGB bands with a percentile stretch."""

    index = {n: i for i, n in enumerate(names)}
    files = []
    for p in predictions:
        dets = [d for d in p["detections"] if d["score"] >= threshold]
        boxes, labels = _boxes(dets, index)
        drawn = draw_detections(display_image(Path(p["image"]), spec), boxes, labels, list(names),
                                [d["score"] for d in dets])
        files.append(save_image(drawn, Path(out_dir) / f"{Path(p['image']).stem}.jpg"))
    return files


def truth_figures(predictions: Sequence[dict[str, Any]], truth: dict[str, tuple[list, list[int], tuple[int, int]]],
                  out_dir: Path, names: Sequence[str], threshold: float, spec: InputSpec | None = None) -> list[Path]:
    """Ground truth | prediction side by side for each image, as ``out_dir/<stem>.jpg``: a drawing
    of predictions alone cannot show what was missed. ``truth``: image path -> (xyxy boxes in the
    annotation's pixels, class indices, annotated (width, height)); boxes are rescaled when the file
    is a rescale of the annotated size. Band arrays are drawn through ``spec``'s RGB bands."""

    index = {n: i for i, n in enumerate(names)}
    files = []
    for p in predictions:
        image = display_image(Path(p["image"]), spec)
        gt_boxes, gt_labels, (w, h) = truth.get(p["image"], ([], [], image.size))
        sx, sy = image.width / max(1, w), image.height / max(1, h)
        gt_boxes = [[x0 * sx, y0 * sy, x1 * sx, y1 * sy] for x0, y0, x1, y1 in gt_boxes]
        dets = [d for d in p["detections"] if d["score"] >= threshold]
        boxes, labels = _boxes(dets, index)
        figure = side_by_side([
            (f"ground truth: {len(gt_boxes)} objects", draw_detections(image, gt_boxes, gt_labels, list(names))),
            (f"prediction: {len(dets)} boxes scoring >= {threshold:g}",
             draw_detections(image, boxes, labels, list(names), [d["score"] for d in dets])),
        ])
        files.append(save_image(figure, Path(out_dir) / f"{Path(p['image']).stem}.jpg"))
    return files


def images_without_boxes(predictions: Sequence[dict[str, Any]], threshold: float) -> int:
    """How many images would be drawn without a single box at ``threshold``."""
    return sum(1 for p in predictions if not any(d["score"] >= threshold for d in p["detections"]))


def blank_drawing_note(predictions: Sequence[dict[str, Any]], threshold: float, flag: str,
                       score_threshold: float = 0.0) -> str | None:
    """Why every drawn image is blank, or None when at least one shows a box. A blank drawing
    looks like a broken model or a broken drawing; the highest score says which ``flag`` value to
    try. ``score_threshold``: detections below it were never kept (named when nothing is left)."""
    if not predictions or images_without_boxes(predictions, threshold) < len(predictions):
        return None
    scores = [d["score"] for p in predictions for d in p["detections"]]
    n = len(predictions)
    if not scores:
        kept = f" scoring --score-threshold {score_threshold:g} or more" if score_threshold > 0 else ""
        return f"no detections at all{kept} in {n} images, so the drawings show no boxes"
    return (f"no detection at or above {threshold:g} in {n} images (highest score {max(scores):.2f}), so the "
            f"drawings show no boxes; lower {flag}")
