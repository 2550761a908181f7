"""Instances drawn for a person, without torch: ``predict --draw DIR`` of both backends (each image
with its masks, outlines, boxes and captions, and the confidence histogram) and the ground truth |
prediction figures of ``analyze``.

Which detections are shown follows detection's rules (``detect.drawing``: at least
``inference.draw_threshold``, or ``score_threshold`` when it is higher), and so do the notes that
keep a blank drawing from being taken for a broken model. Each object's mask is tinted in its
class's colour (the colour of its box) and outlined, so touching objects of one class stay apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from dinotune.tasks.detect.drawing import boxes_of
from dinotune.tasks.detect.drawing import draw_predictions as detect_draw_predictions
from dinotune.tasks.instance.masks import decode
from dinotune.viz.draw import class_colour, draw_detections, save_image, side_by_side

__all__ = ["MASK_ALPHA", "outline", "paint_masks", "draw_instances", "draw_records", "draw_predictions",
           "truth_figures"]

# how much of a pixel's colour its object's tint takes: the picture stays readable under the mask
MASK_ALPHA = 0.45


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The ``width`` pixels along the inside of a ``h x w`` bool mask's border: the mask minus its
    erosion (a pixel stays in the erosion when its four neighbours are in the mask; the picture's
    edge counts as outside)."""
    inner = np.asarray(mask, dtype=bool)
    for _ in range(max(1, int(width))):
        padded = np.pad(inner, 1)
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return np.asarray(mask, dtype=bool) & ~inner


def _fit(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """``mask`` at ``height x width`` (nearest neighbour): the picture drawn on may be a rescale of the
    image the mask was made for."""
    if mask.shape == (height, width):
        return mask
    resized = Image.fromarray(mask.astype(np.uint8) * 255, mode="L").resize((width, height), Image.Resampling.NEAREST)
    return np.asarray(resized) > 127


def paint_masks(image: Image.Image, segmentations: Sequence[Any], labels: Sequence[int], size: tuple[int, int],
                alpha: float = MASK_ALPHA) -> Image.Image:
    """A copy of ``image`` with each object's mask tinted in its class colour (``class_colour``, as
    its box) and outlined. ``segmentations``: COCO segmentations (RLE or polygons) made for an
    image of ``size`` ``(h, w)``, drawn in order (later ones on top); ``labels``: class indices."""
    out = np.array(image.convert("RGB"))
    height, width = out.shape[:2]
    line = max(1, round(max(width, height) / 500))  # 1 px on a small picture, 2 on a photo
    for segmentation, label in zip(segmentations, labels):
        mask = _fit(decode(segmentation, size), width, height)  # one full-size mask at a time
        colour = np.asarray(class_colour(int(label)), dtype=np.float32)
        out[mask] = (out[mask] * (1 - alpha) + colour * alpha).astype(np.uint8)
        out[outline(mask, line)] = colour.astype(np.uint8)
    return Image.fromarray(out, mode="RGB")


def draw_instances(image: Image.Image, detections: Sequence[dict[str, Any]], names: Sequence[str],
                   size: tuple[int, int] | None = None) -> Image.Image:
    """``image`` with records' ``detections`` (``category``, ``score``, ``bbox`` xywh,
    ``segmentation``) drawn: masks (weakest first, so the best is on top), then boxes captioned
    ``name score``. ``size``: the ``(h, w)`` the record was made for (default: the image's)."""
    index = {n: i for i, n in enumerate(names)}
    size = size or (image.height, image.width)
    sx, sy = image.width / max(1, size[1]), image.height / max(1, size[0])
    masked = sorted((d for d in detections if d.get("segmentation")), key=lambda d: d["score"])
    painted = paint_masks(image, [d["segmentation"] for d in masked], [index.get(d["category"], 0) for d in masked],
                          size)
    boxes, labels = boxes_of(detections, index)
    boxes = [[x0 * sx, y0 * sy, x1 * sx, y1 * sy] for x0, y0, x1, y1 in boxes]
    return draw_detections(painted, boxes, labels, list(names), [d["score"] for d in detections])


def draw_records(records: Sequence[dict[str, Any]], picture: Callable[[Path], Image.Image], out_dir: Path,
                 names: Sequence[str], threshold: float) -> list[Path]:
    """Each image (``picture(path)``: the RGB picture to draw on) with its instances scoring at least
    ``threshold``, as ``out_dir/<stem>.jpg``."""
    files = []
    for r in records:
        dets = [d for d in r["detections"] if d["score"] >= threshold]
        drawn = draw_instances(picture(Path(r["image"])), dets, names, (int(r["height"]), int(r["width"])))
        files.append(save_image(drawn, Path(out_dir) / f"{Path(r['image']).stem}.jpg"))
    return files


def draw_predictions(records: Sequence[dict[str, Any]], picture: Callable[[Path], Image.Image], folder: Path,
                     names: Sequence[str], settings: Mapping[str, Any]) -> list[Path]:
    """``predict --draw``: detection's (``detect.drawing.draw_predictions``) with the masks drawn."""
    return detect_draw_predictions(records, picture, folder, names, settings, draw=draw_records, what="object")


def truth_figures(predictions: Sequence[dict[str, Any]],
                  truth: Mapping[str, tuple[list, list[int], list[Any], tuple[int, int]]], out_dir: Path,
                  names: Sequence[str], threshold: float, spec: Any = None) -> list[Path]:
    """Ground truth | prediction side by side for each image, as ``out_dir/<stem>.jpg``: a drawing of
    predictions alone cannot show what was missed. ``truth``: image path -> (xyxy boxes in the
    annotation's pixels, class indices, COCO segmentations (polygons or RLE) in the same pixels,
    annotated (width, height)); both are rescaled when the file is a rescale of the annotated size.
    Band arrays are drawn through ``spec``'s (an ``InputSpec``) RGB bands."""
    from dinotune.data.bands import display_image  # the torch path's reader: only analyze draws truth

    files = []
    for p in predictions:
        image = display_image(Path(p["image"]), spec)
        gt_boxes, gt_labels, gt_segmentations, (w, h) = truth.get(p["image"], ([], [], [], image.size))
        sx, sy = image.width / max(1, w), image.height / max(1, h)
        gt_boxes = [[x0 * sx, y0 * sy, x1 * sx, y1 * sy] for x0, y0, x1, y1 in gt_boxes]
        ground = draw_detections(paint_masks(image, gt_segmentations, gt_labels, (h, w)), gt_boxes, gt_labels,
                                 list(names))
        dets = [d for d in p["detections"] if d["score"] >= threshold]
        predicted = draw_instances(image, dets, names, (int(p["height"]), int(p["width"])))
        figure = side_by_side([(f"ground truth: {len(gt_boxes)} objects", ground),
                               (f"prediction: {len(dets)} objects scoring >= {threshold:g}", predicted)])
        files.append(save_image(figure, Path(out_dir) / f"{Path(p['image']).stem}.jpg"))
    return files
