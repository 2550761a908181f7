"""Instance segmentation metrics from COCO results, the same code for training-time evaluation,
``eval`` and ``analyze``: COCO's AP suite twice through pycocotools, on the boxes (detection's
numbers, under their usual names) and on the masks (under ``segm``).

The box numbers are those of ``detect.evaluation.detection_metrics`` (no single-object metrics:
beside AP they would read as the model's accuracy). The mask numbers are ``coco_evaluate(...,
iou_type="segm")``'s, computed on the results without their boxes so that pycocotools takes each
result's area from its mask (as detectron2's evaluator does): small / medium / large are then
judged on the mask's pixels for detections and ground truth alike. The training engine logs and
monitors top-level scalars only, so every scalar mask number is repeated flat as ``segm/<name>``.
"""

from __future__ import annotations

from typing import Any, Sequence

from dinotune.tasks.detect.coco import DetectionSource
from dinotune.tasks.detect.coco_eval import coco_evaluate
from dinotune.tasks.detect.evaluation import detection_metrics

__all__ = ["instance_metrics", "SEGM"]

# the key of the mask metrics, and the prefix of their flat copies
SEGM = "segm"


def instance_metrics(source: DetectionSource, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Box and mask COCO metrics of ``results`` on the images of ``source``.

    Args:
        source: a ``DetectionSource`` (an ``InstanceSource``) whose ``coco_gt()`` annotations carry
            ``segmentation`` (polygons or RLE in original pixels; crowd regions are ignored as
            pycocotools ignores them).
        results: COCO results ``{"image_id", "category_id", "bbox" xywh, "score", "segmentation":
            RLE {"size": [h, w], "counts"}}`` (not modified; may be empty).

    Returns:
        detection's keys (``AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl``,
        ``per_class_AP``, ``per_class_AP50``, ``precision_recall``) for the boxes; ``"segm"``: the
        same keys for the masks; ``"segm/AP"``, ``"segm/AP50"``, ...: each scalar of ``"segm"``
        again at the top level (float, or None where undefined).

    Raises:
        ValueError: a result without ``segmentation``, or ground truth without masks.
    """
    results = list(results)
    missing = sum(1 for r in results if not r.get("segmentation"))
    if missing:
        raise ValueError(f"{missing} of {len(results)} results have no segmentation: mask AP needs each "
                         "result's mask as a COCO RLE {\"size\": [h, w], \"counts\"}")
    gt = source.coco_gt()
    unmasked = sum(1 for a in gt.get("annotations", ()) if not a.get("segmentation"))
    if unmasked:
        raise ValueError(f"{source.name}: {unmasked} ground-truth objects have no segmentation: mask AP needs "
                         "a polygon or RLE mask on every annotation (crowd regions included)")
    metrics = detection_metrics(source, [{k: v for k, v in r.items() if k != "segmentation"} for r in results],
                                single_object=False)
    segm = coco_evaluate(gt, [{k: v for k, v in r.items() if k != "bbox"} for r in results], iou_type="segm",
                         img_ids=source.image_ids)
    segm.pop("summary", None)
    metrics[SEGM] = segm
    metrics.update({f"{SEGM}/{name}": value for name, value in segm.items()
                    if value is None or isinstance(value, (int, float))})
    return metrics
