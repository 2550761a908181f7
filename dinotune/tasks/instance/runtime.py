"""Instance segmentation without torch: an exported model's records, files and page view.

Detection's runtime (``detect.runtime``) with a mask per detection. The graph takes detection's
inputs (the ``S x S`` evaluation canvas, the original sizes) and returns detection's top ``k``
(``scores``, ``labels``, ``boxes`` in original pixels) plus ``masks``, ``k x Hm x Wm`` logits on a
grid covering the canvas. A record is ``detect.runtime.detection_record``'s whose every detection
also carries its mask in original pixels as a COCO RLE (``segmentation``) and its pixel count
(``area``); only the masks of kept detections are resized and encoded (``masks.py``).
``InstanceTask.predict`` builds its records with ``instance_record`` too, so both backends write
the same files.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from dinotune.errors import ConfigError
from dinotune.runtime.task import Prediction
from dinotune.tasks.detect.runtime import DetectRuntime, detect_input, detection_record, image_ids
from dinotune.tasks.instance.masks import decode, encode_logits, logit, mask_box

__all__ = ["instance_record", "InstanceRuntime", "page_mask", "PAGE_SIDE"]

# inference.mask_threshold's default, for an export description without one
DEFAULT_MASK_PROBABILITY = 0.5
# The page shows the picture at most this many pixels on its longer side (the server's overlay
# size): each object's mask is sent at that resolution, not the photo's.
PAGE_SIDE = 1024


def instance_record(image: str, image_id: int, size: tuple[int, int], scores: np.ndarray, labels: np.ndarray,
                    boxes: np.ndarray, masks: np.ndarray, categories: Sequence[dict[str, Any]], threshold: float,
                    top_k: int, category_ids: str, canvas_size: int, mask_threshold: float = 0.0) -> dict[str, Any]:
    """One image's record from its ``k`` detections, best first: ``scores`` k, ``labels`` k class
    indices, ``boxes`` ``k x 4`` ``xyxy`` original pixels, ``masks`` ``k x Hm x Wm`` logits on the
    ``canvas_size`` square canvas; ``size``: the image's ``(h, w)``. The detections kept are
    ``detection_record``'s (scoring at least ``threshold``, at most ``top_k``); their masks are
    the logits above ``mask_threshold`` in original pixels (``masks.original_masks``).

    Returns ``{"image", "image_id", "width", "height", "detections": [{"category_id", "category",
    "bbox", "score", "segmentation": {"size": [h, w], "counts": str}, "area": mask pixels}]}``."""
    record = detection_record(image, image_id, size, scores, labels, boxes, categories, threshold, top_k,
                              category_ids)
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[0] != np.asarray(scores).shape[0]:
        raise ValueError(f"{image}: masks of shape {masks.shape} for {np.asarray(scores).shape[0]} detections; "
                         "k x Hm x Wm logits are expected (a graph of another model?)")
    # the same choice as detection_record's: at or above the threshold, the first top_k of them
    kept = np.flatnonzero(np.asarray(scores) >= threshold)[:top_k]
    rles, areas = encode_logits(masks[kept], size, canvas_size, mask_threshold)
    for detection, rle, pixels in zip(record["detections"], rles, areas):
        detection["segmentation"] = rle
        detection["area"] = pixels
    return record


def page_mask(segmentation: dict[str, Any], size: tuple[int, int], side: int = PAGE_SIDE) -> dict[str, Any] | None:
    """One object's mask as the page draws it: ``{"image": PNG data URL, opaque on the object and
    transparent elsewhere, "bbox": [x, y, w, h] where it lies in the image's pixels}``, the crop
    around the object at the resolution of the picture the page shows (its ``(h, w)`` ``size``
    fitted into ``side``); None for an empty mask."""
    from PIL import Image

    x, y, w, h = (int(round(v)) for v in mask_box(segmentation))
    if w < 1 or h < 1:
        return None
    crop = decode(segmentation)[y: y + h, x: x + w]
    factor = min(1.0, side / max(size))
    shape = Image.fromarray(crop.astype(np.uint8), mode="L")
    if factor < 1:
        shape = shape.resize((max(1, round(w * factor)), max(1, round(h * factor))), Image.Resampling.NEAREST)
    shape = shape.convert("P")
    shape.putpalette([0, 0, 0, 255, 255, 255])  # index 0 (background) is transparent, 1 (object) white
    buf = io.BytesIO()
    shape.save(buf, format="PNG", transparency=0, optimize=True)
    return {"image": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"),
            "bbox": [x, y, w, h]}


class InstanceRuntime(DetectRuntime):
    """Boxes and masks per image (see the module docstring). ``info.postprocess`` holds detection's
    ``top_k`` and ``min_score`` and the inference section's ``mask_threshold``: the mask probability
    above which a pixel belongs to its object (a setting like the others: ``settings["mask_threshold"]``)."""

    name = "instance"
    graph_outputs = {**DetectRuntime.graph_outputs, "masks": 4}

    def check_postprocess(self, postprocess: dict[str, Any]) -> str | None:
        problem = super().check_postprocess(postprocess)
        if problem:
            return problem
        value = postprocess.get("mask_threshold", DEFAULT_MASK_PROBABILITY)
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1):
            return f"postprocess.mask_threshold is {value!r}; a probability between 0 and 1 (exclusive) is expected"
        return None

    def predict_files(self, paths: list[Path], settings: dict[str, Any],
                      read: Callable[[Path], np.ndarray]) -> list[dict[str, Any]]:
        draw = settings.get("draw")
        if draw and self.spec.arrays:  # checked before any image is predicted
            raise ConfigError("--draw with the ONNX backend draws pictures only; band arrays are drawn by the torch "
                              "path (dinotune predict RUN --draw DIR)")
        records = super().predict_files(paths, {**settings, "draw": ""}, read)  # drawn here, with the masks
        if draw:
            from PIL import Image

            from dinotune.tasks.instance.drawing import draw_predictions

            draw_predictions(records, lambda path: Image.fromarray(read(path), mode="RGB"), Path(draw),
                             self.class_names, settings)
        return records

    def predict_arrays(self, names: list[str], arrays: list[np.ndarray], settings: dict[str, Any]) -> list[Prediction]:
        ids = settings.get("ids") or image_ids([Path(n) for n in names], None)
        size = self.info.image_size
        canvases = [detect_input(a, size, self.spec)[0] for a in arrays]
        sizes = np.asarray([a.shape[:2] for a in arrays], dtype=np.float32)
        out = self.graph(images=np.stack(canvases), orig_sizes=sizes)
        # detections under the run's own threshold are gone before any predict option applies
        threshold = max(float(settings["score_threshold"]), float(self.info.postprocess.get("min_score", 0.0)))
        categories = self.info.categories or [{"id": i + 1, "name": n} for i, n in enumerate(self.class_names)]
        mask_logit = logit(float(settings.get("mask_threshold", DEFAULT_MASK_PROBABILITY)))
        return [(instance_record(name, ids[name], a.shape[:2], out["scores"][i], out["labels"][i], out["boxes"][i],
                                 out["masks"][i], categories, threshold, int(settings["top_k"]),
                                 settings["category_ids"], size, mask_logit), {})
                for i, (name, a) in enumerate(zip(names, arrays))]

    @staticmethod
    def coco_text(results: list[dict[str, Any]]) -> str:
        """COCO results with masks: a flat list, each result with its ``bbox`` and its ``segmentation``
        (RLE), as detectron2 writes them: ``COCO.loadRes`` reads the file as it is, and it evaluates
        with ``iouType`` ``"segm"`` (and ``"bbox"``). ``file_name`` is the image as predicted."""
        flat = [{"image_id": r["image_id"], "file_name": r["image"], "category_id": d["category_id"],
                 "bbox": d["bbox"], "score": d["score"], "segmentation": d["segmentation"]}
                for r in results for d in r["detections"]]
        return json.dumps(flat) + "\n"

    @classmethod
    def csv_rows(cls, results: list[dict[str, Any]]) -> list[list[Any]]:
        """One row per instance; ``rle``: its mask's COCO RLE counts (``size`` is the image's
        ``[height, width]``), decoded by ``pycocotools.mask.decode``."""
        return [["image", "image_id", "category", "category_id", "score", "x", "y", "width", "height", "area",
                 "rle"]] + [[r["image"], r["image_id"], d["category"], d["category_id"], d["score"], *d["bbox"],
                             d["area"], d["segmentation"]["counts"]]
                            for r in results for d in r["detections"]]

    @classmethod
    def view(cls, record: dict[str, Any], extras: dict[str, Any]) -> dict[str, Any]:
        """Detection's boxes, each with its ``mask`` (``page_mask``): the page tints it in the box's
        colour wherever it shows the box (the threshold slider hides both)."""
        size = (int(record["height"]), int(record["width"]))
        boxes = []
        for d in record["detections"]:
            box = {"name": d["category"], "score": d["score"], "bbox": d["bbox"]}
            shape = page_mask(d["segmentation"], size) if d.get("segmentation") else None
            if shape:
                box["mask"] = shape
            boxes.append(box)
        return {"boxes": boxes}
