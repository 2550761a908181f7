"""Detection metrics from COCO results, the same code for training-time evaluation, ``eval`` and
``compare``: the COCO AP suite (pycocotools, against every ground-truth object) and, for
single-object detectors and ``compare``'s table, the single-object metrics (each image's
top-scoring detection against its largest object: accuracy, macro precision / recall / F1, mean
IoU, mAP@0.5). A DETR or Faster R-CNN run is judged by COCO's alone: beside AP its single-object
"accuracy" would read as the detector's.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from dinotune.ops import box_ops
from dinotune.tasks.detect.coco import DetectionSource
from dinotune.tasks.detect.coco_eval import coco_evaluate
from dinotune.tasks.detect.single_metrics import single_object_metrics

__all__ = ["detection_metrics", "single_object_scores"]


def detection_metrics(source: DetectionSource, results: Sequence[dict[str, Any]],
                      single_object: bool = True) -> dict[str, Any]:
    """COCO metrics (``coco_evaluate``'s keys, without the text summary) and, with
    ``single_object``, the single-object metrics of ``results`` (COCO result dicts: ``image_id``,
    original ``category_id``, ``bbox`` xywh in original pixels, ``score``) on the images of
    ``source``."""
    metrics = coco_evaluate(source.coco_gt(), list(results), img_ids=source.image_ids)
    metrics.pop("summary", None)
    if single_object:
        metrics.update(single_object_scores(source, results))
    return metrics


def single_object_scores(source: DetectionSource, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``single_object_metrics`` of each image's top-scoring result against its largest
    (non-crowd) object; an image without any result misses its object. Images without objects are
    left out; no image with an object gives ``{}``."""
    best: dict[int, dict[str, Any]] = {}
    for r in results:
        held = best.get(r["image_id"])
        if held is None or r["score"] > held["score"]:
            best[r["image_id"]] = r
    index = source.category_index
    pl, ps, pb, gl, gb = [], [], [], [], []
    for im in source.images:
        objects = source.targets(im.id)
        if not objects:
            continue
        largest = max(objects, key=lambda a: (a.bbox[2] - a.bbox[0]) * (a.bbox[3] - a.bbox[1]))
        gl.append(largest.label)
        gb.append(list(largest.bbox))
        top = best.get(im.id)
        if top is not None:
            pl.append(index[int(top["category_id"])])
            ps.append(float(top["score"]))
            pb.append(box_ops.xywh_to_xyxy(torch.tensor([top["bbox"]], dtype=torch.float64))[0].tolist())
        else:  # no detection at all: the largest object is missed
            pl.append(-1)
            ps.append(0.0)
            pb.append([0.0, 0.0, 0.0, 0.0])
    if not gl:
        return {}
    return single_object_metrics(torch.tensor(pl), torch.tensor(ps), torch.tensor(pb), torch.tensor(gl),
                                 torch.tensor(gb), len(source.categories))
