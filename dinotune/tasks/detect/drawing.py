"""Detections drawn for a person, without torch: ``predict --draw DIR`` of both backends (each image
with its boxes, and the confidence histogram), the score a box needs to be shown, and the notes
that keep a blank drawing from being taken for a broken model.

A person reads drawings, CSV rows and per-image JSON records: they show the detections scoring at
least ``inference.draw_threshold`` (or ``score_threshold`` when it is higher). COCO results written
for evaluation keep every top-k detection (``runtime.DetectRuntime.format_predictions``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from PIL import Image

from dinotune.utils import info, warn
from dinotune.viz.draw import draw_detections, save_image


def shown_threshold(settings: Mapping[str, Any]) -> tuple[float, str]:
    """The score a detection needs to be shown to a person, and the flag that sets it (the higher of
    ``draw_threshold`` and ``score_threshold`` wins: below the latter nothing was kept at all)."""
    draw, score = float(settings.get("draw_threshold", 0.0)), float(settings.get("score_threshold", 0.0))
    return (score, "--score-threshold") if score > draw else (draw, "--draw-threshold")


def shown(records: Sequence[dict[str, Any]], threshold: float) -> list[dict[str, Any]]:
    """``records`` with only the detections scoring at least ``threshold``."""
    return [{**r, "detections": [d for d in r["detections"] if d["score"] >= threshold]} for r in records]


def boxes_of(dets: Sequence[dict[str, Any]], index: Mapping[str, int]) -> tuple[list[list[float]], list[int]]:
    """``xyxy`` boxes and class indices of records' detections (``xywh`` boxes, class names)."""
    boxes = [[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in dets)]
    return boxes, [index.get(d["category"], 0) for d in dets]


def confidence_histogram(records: Sequence[dict[str, Any]], out_dir: Path) -> Path:
    """``out_dir/confidence_histogram.png`` of every detection's score: where to put a threshold."""
    from dinotune.viz.plots import plot_histogram  # matplotlib: loaded only to draw

    scores = [d["score"] for r in records for d in r["detections"]]
    return plot_histogram(scores, Path(out_dir) / "confidence_histogram.png", "detection confidences", "score")


def draw_records(records: Sequence[dict[str, Any]], picture: Callable[[Path], Image.Image], out_dir: Path,
                 names: Sequence[str], threshold: float) -> list[Path]:
    """Each image (``picture(path)``: the RGB picture to draw on) with its detections scoring at least
    ``threshold``, as ``out_dir/<stem>.jpg``."""
    index = {n: i for i, n in enumerate(names)}
    files = []
    for r in records:
        dets = [d for d in r["detections"] if d["score"] >= threshold]
        boxes, labels = boxes_of(dets, index)
        drawn = draw_detections(picture(Path(r["image"])), boxes, labels, list(names), [d["score"] for d in dets])
        files.append(save_image(drawn, Path(out_dir) / f"{Path(r['image']).stem}.jpg"))
    return files


def images_without_boxes(records: Sequence[dict[str, Any]], threshold: float) -> int:
    """How many images would be drawn without a single box at ``threshold``."""
    return sum(1 for r in records if not any(d["score"] >= threshold for d in r["detections"]))


def blank_drawing_note(records: Sequence[dict[str, Any]], threshold: float, flag: str,
                       score_threshold: float = 0.0) -> str | None:
    """Why every drawn image is blank, or None when at least one shows a box. A blank drawing
    looks like a broken model or a broken drawing; the highest score says which ``flag`` value to
    try. ``score_threshold``: detections below it were never kept (named when nothing is left)."""
    if not records or images_without_boxes(records, threshold) < len(records):
        return None
    scores = [d["score"] for r in records for d in r["detections"]]
    n = len(records)
    if not scores:
        kept = f" scoring --score-threshold {score_threshold:g} or more" if score_threshold > 0 else ""
        return f"no detections at all{kept} in {n} images, so the drawings show no boxes"
    return (f"no detection at or above {threshold:g} in {n} images (highest score {max(scores):.2f}), so the "
            f"drawings show no boxes; lower {flag} to see the weaker ones")


def draw_predictions(records: Sequence[dict[str, Any]], picture: Callable[[Path], Image.Image], folder: Path,
                     names: Sequence[str], settings: Mapping[str, Any], *, draw: Callable[..., list[Path]] | None = None,
                     what: str = "box") -> list[Path]:
    """``predict --draw``: each image with its boxes and the confidence histogram, straight into
    ``folder`` (as segmentation's overlays), and a line saying what was drawn where (a warning
    when no box reached the threshold, so an empty drawing is not taken for a broken model).
    ``draw``: ``(records, picture, folder, names, threshold) -> files``, ``draw_records`` unless a
    task built on detection draws more (masks); ``what``: the noun of its objects in the messages."""
    threshold, flag = shown_threshold(settings)
    files = (draw or draw_records)(records, picture, folder, names, threshold)
    try:
        confidence_histogram(records, folder)
    except ImportError as exc:  # a torch-free deployment may lack matplotlib: the drawings are what matters
        warn(f"no confidence_histogram.png in {folder}: {exc} (pip install matplotlib)")
    note = blank_drawing_note(records, threshold, flag, float(settings.get("score_threshold", 0.0)))
    if note:
        warn(f"drew {len(files)} images into {folder}, but {note}")
        return files
    blank = images_without_boxes(records, threshold)
    info(f"drew {len(files)} images into {folder}"
         + (f" ({blank} without a {what} scoring {threshold:g} or more)" if blank else ""))
    return files
