"""Instance segmentation evaluation: mask AP equals pycocotools' segm evaluation run directly (a
perfect mask, a mask at IoU 0.6, crowd regions ignored, a mixed case), box AP stays detection's,
the flat ``segm/*`` copies equal the nested numbers, and the charts and table read them."""

from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dinotune.tasks.detect.coco import DetectionSource, ImageRecord
from dinotune.tasks.detect.coco_eval import STAT_NAMES
from dinotune.tasks.instance.analysis import mask_ap_table, metric_charts
from dinotune.tasks.instance.evaluation import instance_metrics
from dinotune.tasks.instance.masks import encode

CATS = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]
H, W = 60, 80


def square(x: int, y: int, w: int, h: int, size=(H, W)) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    mask[y: y + h, x: x + w] = True
    return mask


def polygon(x: int, y: int, w: int, h: int) -> list[list[float]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def rle(mask: np.ndarray) -> dict:
    return encode(mask[None])[0]


def source(anns: list[dict], images=((1, W, H),)) -> DetectionSource:
    """A source whose ``coco_gt()`` is exactly these images and annotations (``id`` filled)."""
    anns = [{"id": i + 1, "iscrowd": 0, **a} for i, a in enumerate(anns)]
    for a in anns:
        a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
    return DetectionSource(
        name="instances_val.json", images=[ImageRecord(i, Path(f"{i}.png"), w, h) for i, w, h in images],
        annotations={}, categories=CATS, gt_images={i: {"id": i, "width": w, "height": h, "file_name": f"{i}.png"}
                                                     for i, w, h in images},
        gt_annotations={i: [a for a in anns if a["image_id"] == i] for i, _, _ in images})


def result(mask: np.ndarray, bbox, score: float, category_id: int = 3, image_id: int = 1) -> dict:
    return {"image_id": image_id, "category_id": category_id, "bbox": [float(v) for v in bbox], "score": score,
            "segmentation": rle(mask)}


def pycocotools_segm(gt: dict, results: list[dict]) -> dict:
    """pycocotools' segm evaluation used the documented way (results without boxes, as COCO's segm
    results format): the 12 summary numbers by name."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        dt = coco_gt.loadRes([{k: v for k, v in r.items() if k != "bbox"} for r in copy.deepcopy(results)])
        ev = COCOeval(coco_gt, dt, "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {name: (None if v == -1 else float(v)) for name, v in zip(STAT_NAMES, ev.stats)}


def test_a_perfect_mask_gives_mask_ap_1_polygon_and_rle_truth():
    src = source([{"image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 20], "segmentation": polygon(10, 10, 30, 20)},
                  {"image_id": 1, "category_id": 7, "bbox": [45, 5, 20, 40],
                   "segmentation": rle(square(45, 5, 20, 40))}])
    # pycocotools' polygon rasterisation decides the truth's pixels: the result is that mask
    truth = mask_utils.decode(mask_utils.frPyObjects(polygon(10, 10, 30, 20), H, W))[..., 0].astype(bool)
    m = instance_metrics(src, [result(truth, [10, 10, 30, 20], 0.9),
                               result(square(45, 5, 20, 40), [45, 5, 20, 40], 0.8, category_id=7)])
    assert m["segm"]["AP"] == pytest.approx(1.0) and m["AP"] == pytest.approx(1.0)
    assert m["segm"]["per_class_AP"] == {"cat": pytest.approx(1.0), "dog": pytest.approx(1.0)}


def test_a_mask_at_iou_0_6_counts_at_50_not_75_while_its_box_is_perfect():
    truth, shifted = square(10, 10, 40, 40), square(20, 10, 40, 40)  # 30 x 40 shared of 50 x 40: IoU 0.6
    inter, union = (truth & shifted).sum(), (truth | shifted).sum()
    assert inter / union == pytest.approx(0.6)
    src = source([{"image_id": 1, "category_id": 3, "bbox": [10, 10, 40, 40], "segmentation": rle(truth)}])
    results = [result(shifted, [10, 10, 40, 40], 0.9)]
    m = instance_metrics(src, results)
    assert m["segm"]["AP50"] == pytest.approx(1.0) and m["segm"]["AP75"] == pytest.approx(0.0)
    assert m["AP75"] == pytest.approx(1.0)  # the box numbers are the boxes', not the masks'
    assert m["segm/AP50"] == m["segm"]["AP50"] and m["segm/AP75"] == m["segm"]["AP75"]
    expected = pycocotools_segm(src.coco_gt(), results)
    assert {k: m["segm"][k] for k in STAT_NAMES} == pytest.approx(expected)


def test_a_false_positive_on_a_crowd_region_is_ignored():
    crowd = square(40, 20, 35, 35)
    uncompressed = {"size": [H, W], "counts": _counts(crowd)}  # COCO crowd regions: counts as a list
    assert (mask_utils.decode(mask_utils.frPyObjects(uncompressed, H, W)) == crowd).all()
    objects = [{"image_id": 1, "category_id": 3, "bbox": [2, 2, 20, 20], "segmentation": polygon(2, 2, 20, 20)}]
    crowd_ann = {"image_id": 1, "category_id": 3, "bbox": [40, 20, 35, 35], "segmentation": uncompressed,
                 "iscrowd": 1, "area": float(crowd.sum())}
    truth = mask_utils.decode(mask_utils.frPyObjects(polygon(2, 2, 20, 20), H, W))[..., 0].astype(bool)
    # the false positive scores higher than the true one: counted, it would halve the precision
    results = [result(truth, [2, 2, 20, 20], 0.6), result(square(45, 25, 20, 20), [45, 25, 20, 20], 0.9)]
    with_crowd = instance_metrics(source(objects + [crowd_ann]), results)
    without = instance_metrics(source(objects), results)
    assert with_crowd["segm"]["AP"] == pytest.approx(1.0)
    assert without["segm"]["AP"] < 0.6
    assert with_crowd["segm"]["AP"] == pytest.approx(pycocotools_segm(source(objects + [crowd_ann]).coco_gt(),
                                                                      results)["AP"])


def _counts(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE counts (column-major runs, starting with background)."""
    flat = mask.ravel(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]])))
    runs = np.diff(np.concatenate([[0], change]))
    return runs.tolist() if flat[0] == 0 else [0] + runs.tolist()


def test_mask_metrics_equal_pycocotools_on_a_mixed_case_and_flat_keys_match():
    rng = np.random.default_rng(3)
    anns, results = [], []
    for image_id in (1, 2, 3):
        for _ in range(3):
            x, y = int(rng.integers(0, 40)), int(rng.integers(0, 30))
            w, h = int(rng.integers(5, 35)), int(rng.integers(5, 25))
            cat = int(rng.choice([3, 7]))
            anns.append({"image_id": image_id, "category_id": cat, "bbox": [x, y, w, h],
                         "segmentation": polygon(x, y, w, h)})
            dx, dy = int(rng.integers(-4, 5)), int(rng.integers(-4, 5))
            pred = square(max(0, x + dx), max(0, y + dy), w, h)
            results.append(result(pred, [x + dx, y + dy, w, h], float(rng.uniform(0.1, 1)), cat, image_id))
        results.append(result(square(0, 0, 10, 10), [0, 0, 10, 10], 0.3, 7, image_id))  # a false positive
    src = source(anns, images=((1, W, H), (2, W, H), (3, W, H)))
    m = instance_metrics(src, results)
    expected = pycocotools_segm(src.coco_gt(), results)
    assert {k: m["segm"][k] for k in STAT_NAMES} == pytest.approx(expected)
    scalars = {k: v for k, v in m["segm"].items() if not isinstance(v, (dict, list))}
    assert set(scalars) == set(STAT_NAMES)
    assert {k: m[f"segm/{k}"] for k in scalars} == scalars
    assert {"per_class_AP", "per_class_AP50", "precision_recall"} <= set(m["segm"]) and "summary" not in m["segm"]
    assert {"AP", "AP50", "per_class_AP", "precision_recall"} <= set(m) and "accuracy" not in m


def test_results_without_masks_and_truth_without_masks_are_refused():
    src = source([{"image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 20], "segmentation": polygon(10, 10, 30, 20)}])
    with pytest.raises(ValueError, match="1 of 1 results have no segmentation"):
        instance_metrics(src, [{"image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 20], "score": 0.5}])
    boxes_only = source([{"image_id": 1, "category_id": 3, "bbox": [10, 10, 30, 20]}])
    with pytest.raises(ValueError, match="instances_val.json: 1 ground-truth objects have no segmentation"):
        instance_metrics(boxes_only, [result(square(10, 10, 30, 20), [10, 10, 30, 20], 0.5)])
    empty = instance_metrics(src, [])  # no result at all: every defined AP is 0
    assert empty["segm"]["AP"] == 0.0 and empty["segm/AP"] == 0.0


def test_charts_and_table_show_box_and_mask_ap(tmp_path):
    truth, shifted = square(10, 10, 40, 40), square(20, 10, 40, 40)
    src = source([{"image_id": 1, "category_id": 3, "bbox": [10, 10, 40, 40], "segmentation": rle(truth)}])
    m = instance_metrics(src, [result(shifted, [10, 10, 40, 40], 0.9)])
    table = mask_ap_table(m)
    lines = table.splitlines()
    assert lines[0].split() == ["class", "box", "AP", "mask", "AP", "mask", "AP50"]
    cat = next(line for line in lines if line.startswith("cat")).split()
    assert cat == ["cat", "100.00", f"{100 * m['segm']['per_class_AP']['cat']:.2f}", "100.00"]
    assert next(line for line in lines if line.startswith("dog")).split() == ["dog", "-", "-", "-"]
    assert lines[-1].split()[0] == "all"
    files = metric_charts(m, tmp_path)
    assert {f.name for f in files} == {"per_class_ap.png", "precision_recall.png", "per_class_mask_ap.png",
                                       "mask_precision_recall.png"}
    assert all(f.is_file() and f.stat().st_size for f in files)
