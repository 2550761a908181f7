"""Detection charts: per-class AP, precision-recall curve, ground truth beside the predictions
(``analyze``); the drawings ``predict --draw`` writes are ``drawing.py``'s."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from dinotune.data.bands import InputSpec, display_image
from dinotune.tasks.detect.drawing import boxes_of
from dinotune.viz.draw import draw_detections, save_image, side_by_side
from dinotune.viz.plots import plot_bars, plot_curve


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
        boxes, labels = boxes_of(dets, index)
        figure = side_by_side([
            (f"ground truth: {len(gt_boxes)} objects", draw_detections(image, gt_boxes, gt_labels, list(names))),
            (f"prediction: {len(dets)} boxes scoring >= {threshold:g}",
             draw_detections(image, boxes, labels, list(names), [d["score"] for d in dets])),
        ])
        files.append(save_image(figure, Path(out_dir) / f"{Path(p['image']).stem}.jpg"))
    return files


def ap_table(metrics: dict[str, Any]) -> str | None:
    """Aligned ``class  AP  AP50`` table (COCO AP in percent, ``-`` where a class has no ground truth
    in the evaluated split) plus the overall row, from ``coco_evaluate``'s result; None without
    per-class numbers."""
    ap = metrics.get("per_class_AP") or {}
    if not ap:
        return None
    ap50 = metrics.get("per_class_AP50") or {}

    def num(v: float | None) -> str:
        return "-" if v is None or v < 0 else f"{100 * v:.2f}"

    rows = [(name, num(v), num(ap50.get(name))) for name, v in ap.items()]
    total = ("all", num(metrics.get("AP")), num(metrics.get("AP50")))
    header = ("class", "AP", "AP50")
    widths = [max(len(r[i]) for r in [header, total, *rows]) for i in range(3)]

    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(r) for r in rows), rule, fmt(total)])
