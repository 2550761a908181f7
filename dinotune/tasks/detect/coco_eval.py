"""COCO detection metrics through pycocotools, from in-memory dicts, without its prints.

``coco_evaluate`` runs ``COCOeval`` on a ground-truth dict (COCO json layout: ``images``,
``annotations``, ``categories``) and a list of result dicts, and reads the 12 standard numbers,
per-class APs and a PR curve straight from ``COCOeval.eval["precision"]`` / ``["recall"]`` (the
same reductions as ``COCOeval.summarize``, which is not called: it hard-codes ``maxDets=100`` for
``AP``). Undefined numbers (pycocotools' ``-1``, e.g. ``APs`` without small ground truth) are
reported as ``None`` so the dict stays valid JSON.

Pitfalls handled here: pycocotools' ``loadRes`` crashes on an empty result list (we build an empty
result set instead: every defined AP is 0); a ground-truth annotation with ``id`` 0 is silently
counted as unmatched (ids are renumbered 1..N on a copy); missing ``area`` / ``iscrowd`` are
filled (box area, 0). Result ``category_id`` / ``image_id`` values unknown to the ground truth
raise, because that is how label indices written in place of category ids show up.
"""

from __future__ import annotations

import contextlib
import copy
import io
from typing import Any, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


__all__ = ["coco_evaluate", "STAT_NAMES"]

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# (is AP, IoU threshold or None for .50:.95, area range, index into maxDets)
_STATS = [(1, None, "all", 2), (1, .5, "all", 2), (1, .75, "all", 2), (1, None, "small", 2),
          (1, None, "medium", 2), (1, None, "large", 2), (0, None, "all", 0), (0, None, "all", 1),
          (0, None, "all", 2), (0, None, "small", 2), (0, None, "medium", 2), (0, None, "large", 2)]


def _quiet_coco(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _mean_defined(values: np.ndarray) -> float | None:
    defined = values[values > -1]
    return float(np.mean(defined)) if defined.size else None


def coco_evaluate(gt: dict, results: list[dict], iou_type: str = "bbox", per_class: bool = True,
                  max_dets: int = 100, img_ids: Sequence[int] | None = None) -> dict[str, Any]:
    """COCO metrics of ``results`` against ``gt``.

    Args:
        gt: COCO ground truth (not modified). Annotations need ``bbox`` (and ``segmentation`` for
            ``"segm"``); ``iscrowd`` regions are ignored as pycocotools does (detections on them
            are neither TP nor FP).
        results: COCO results ``{"image_id", "category_id", "bbox" xywh pixels | "segmentation"
            RLE, "score"}`` (not modified; may be empty).
        iou_type: ``"bbox"`` or ``"segm"``.
        max_dets: detections per image for the ``AP*`` and ``AR100``/``ARs/m/l`` numbers (the key
            names stay those of COCO's default 100); ``AR1`` / ``AR10`` use 1 / 10. At least 10.
        img_ids: evaluate only these images (default: every image of ``gt``).

    Returns:
        ``AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl`` (float, or None where
        undefined); if ``per_class``: ``per_class_AP`` / ``per_class_AP50`` {category name: AP
        at IoU .50:.95 / .50, None for a category without ground truth}; ``precision_recall``
        ``{"iou": 0.5, "recall": 101 thresholds, "precision": mean over categories with ground
        truth (None if there are none)}``; ``summary``: pycocotools' 12-line text.
    """
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    if max_dets < 10:
        raise ValueError(f"max_dets must be >= 10 (AR10 is reported), got {max_dets}")
    dataset = copy.deepcopy({k: gt[k] for k in ("images", "annotations", "categories") if k in gt})
    dataset.setdefault("annotations", [])
    sizes = {im["id"]: (im.get("height"), im.get("width")) for im in dataset.get("images", [])}
    for i, ann in enumerate(dataset["annotations"], start=1):
        ann["id"] = i  # 0 would read as "unmatched" in COCOeval; duplicates would collapse
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            if iou_type == "segm" and "segmentation" in ann:
                segm = ann["segmentation"]
                compressed = isinstance(segm, dict) and not isinstance(segm.get("counts"), list)
                rle = segm if compressed else mask_utils.frPyObjects(segm, *sizes[ann["image_id"]])
                ann["area"] = float(np.sum(mask_utils.area(rle)))
            else:
                ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
    coco_gt = _quiet_coco(dataset)

    known_imgs, known_cats = set(coco_gt.getImgIds()), set(coco_gt.getCatIds())
    bad_imgs = {r["image_id"] for r in results} - known_imgs
    bad_cats = {r["category_id"] for r in results} - known_cats
    if bad_imgs or bad_cats:
        raise ValueError(f"results name image ids {sorted(bad_imgs)[:10]} / category ids "
                         f"{sorted(bad_cats)[:10]} that are not in the ground truth")
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes adds keys: copy
        else:
            coco_dt = _quiet_coco({"images": list(dataset["images"]), "categories": dataset["categories"],
                                   "annotations": []})
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.maxDets = [1, 10, int(max_dets)]
        if img_ids is not None:
            ev.params.imgIds = sorted({int(i) for i in img_ids})
        ev.evaluate()
        ev.accumulate()

    p, precision, recall = ev.params, ev.eval["precision"], ev.eval["recall"]  # T R K A M / T K A M
    out: dict[str, Any] = {}
    lines = []
    for name, (is_ap, iou, area, m) in zip(STAT_NAMES, _STATS):
        a = p.areaRngLbl.index(area)
        s = precision[..., a, m] if is_ap else recall[..., a, m]
        if iou is not None:
            s = s[np.where(np.isclose(p.iouThrs, iou))[0]]
        out[name] = _mean_defined(s)
        iou_str = f"{p.iouThrs[0]:0.2f}:{p.iouThrs[-1]:0.2f}" if iou is None else f"{iou:0.2f}"
        title = "Average Precision  (AP)" if is_ap else "Average Recall     (AR)"
        value = -1.0 if out[name] is None else out[name]
        lines.append(f" {title} @[ IoU={iou_str:<9} | area={area:>6s} | maxDets={p.maxDets[m]:>3d} ] = {value:0.3f}")
    out["summary"] = "\n".join(lines)

    if per_class:
        names = [coco_gt.cats[c]["name"] for c in p.catIds]
        names = [n if names.count(n) == 1 else f"{n} ({c})" for n, c in zip(names, p.catIds)]
        all_area, last = p.areaRngLbl.index("all"), len(p.maxDets) - 1
        out["per_class_AP"] = {n: _mean_defined(precision[:, :, k, all_area, last]) for k, n in enumerate(names)}
        out["per_class_AP50"] = {n: _mean_defined(precision[0, :, k, all_area, last]) for k, n in enumerate(names)}
    pr = precision[0, :, :, p.areaRngLbl.index("all"), len(p.maxDets) - 1]  # R x K at IoU .5
    out["precision_recall"] = {"iou": float(p.iouThrs[0]), "recall": [float(r) for r in p.recThrs],
                               "precision": [_mean_defined(row) for row in pr]}
    return out
