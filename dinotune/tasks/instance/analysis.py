"""Instance segmentation charts and the terminal table: mask AP per class and the mask
precision-recall curve beside detection's box charts (``detect.analysis``), from
``evaluation.instance_metrics``' result. The ground truth | prediction figures are
``drawing.truth_figures``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dinotune.tasks.detect.analysis import metric_charts as box_charts
from dinotune.tasks.instance.evaluation import SEGM
from dinotune.viz.plots import plot_bars, plot_curve

__all__ = ["metric_charts", "mask_ap_table"]


def metric_charts(metrics: dict[str, Any], out_dir: Path) -> list[Path]:
    """Detection's box charts (``per_class_ap.png``, ``precision_recall.png``) and the mask ones:
    ``per_class_mask_ap.png`` (mask AP at IoU .50:.95 per class, best first) and
    ``mask_precision_recall.png`` (at IoU 0.5), from ``instance_metrics``' result."""
    out_dir = Path(out_dir)
    files = box_charts(metrics, out_dir)
    segm = metrics.get(SEGM) or {}
    per_class = {k: v for k, v in (segm.get("per_class_AP") or {}).items() if v is not None}
    if per_class:
        ordered = dict(sorted(per_class.items(), key=lambda kv: -kv[1]))
        files.append(plot_bars(ordered, out_dir / "per_class_mask_ap.png", "mask AP per class (IoU .50:.95)",
                               "mask AP"))
    pr = segm.get("precision_recall")
    if pr and pr.get("recall"):
        files.append(plot_curve(pr["recall"], [p if p is not None else 0.0 for p in pr["precision"]],
                                out_dir / "mask_precision_recall.png",
                                f"mask precision-recall at IoU {pr.get('iou', 0.5)}", "recall", "precision",
                                label=f"mask AP50 {segm.get('AP50') or 0:.3f}"))
    return files


def mask_ap_table(metrics: dict[str, Any]) -> str | None:
    """Aligned ``class  box AP  mask AP  mask AP50`` table (COCO AP in percent, ``-`` where a class
    has no ground truth in the evaluated split) and the overall ``all`` row, from
    ``instance_metrics``' result; None without per-class numbers."""
    segm = metrics.get(SEGM) or {}
    mask_ap = segm.get("per_class_AP") or {}
    if not mask_ap:
        return None
    box_ap, mask_ap50 = metrics.get("per_class_AP") or {}, segm.get("per_class_AP50") or {}

    def num(v: float | None) -> str:
        return "-" if v is None or v < 0 else f"{100 * v:.2f}"

    rows = [(name, num(box_ap.get(name)), num(v), num(mask_ap50.get(name))) for name, v in mask_ap.items()]
    total = ("all", num(metrics.get("AP")), num(segm.get("AP")), num(segm.get("AP50")))
    header = ("class", "box AP", "mask AP", "mask AP50")
    widths = [max(len(r[i]) for r in [header, total, *rows]) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        return "  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(r) for r in rows), rule, fmt(total)])
