"""Detection evaluation: COCO AP equals pycocotools run directly, PostProcess maps boxes back to
original pixels, COCO results carry xywh and original category ids, and the single-object
metrics equal scikit-learn / pycocotools."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from dinotune.ops.box_ops import cxcywh_to_xyxy
from dinotune.tasks.detect.coco_eval import STAT_NAMES, coco_evaluate
from dinotune.tasks.detect.postprocess import PostProcess, to_coco_results
from dinotune.tasks.detect.single_metrics import single_object_metrics

CATS = [{"id": 1, "name": "cat"}, {"id": 5, "name": "dog"}, {"id": 90, "name": "fox"}]


def make_gt(anns, images=((1, 300, 300),), categories=CATS):
    """``anns``: (image_id, category_id, [x, y, w, h], iscrowd) tuples."""
    return {
        "images": [{"id": i, "width": w, "height": h} for i, w, h in images],
        "annotations": [
            {"id": n + 1, "image_id": im, "category_id": c, "bbox": list(map(float, b)),
             "area": float(b[2] * b[3]), "iscrowd": crowd}
            for n, (im, c, b, crowd) in enumerate(anns)
        ],
        "categories": copy.deepcopy(list(categories)),
    }


def det(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(map(float, bbox)), "score": score}


def reference(gt, results):
    """pycocotools used the documented way; returns (COCOeval, summary text)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), "bbox")
        ev.evaluate()
        ev.accumulate()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ev.summarize()
    return ev, buf.getvalue().rstrip("\n")


def assert_matches_reference(ours, gt, results):
    ev, summary = reference(gt, results)
    for name, value in zip(STAT_NAMES, ev.stats):
        assert (ours[name] is None) == (value == -1), name
        if ours[name] is not None:
            assert ours[name] == pytest.approx(float(value), abs=1e-12), name
    assert ours["summary"] == summary
    return ev


# ---------------------------------------------------------------- coco_evaluate

def test_perfect_predictions_give_ap_one():
    images = [(1, 640, 480), (2, 640, 480), (3, 320, 240)]
    anns = [(1, 1, [10, 10, 20, 20], 0), (1, 5, [100, 100, 60, 50], 0), (2, 90, [0, 0, 300, 400], 0),
            (2, 1, [50, 60, 150, 120], 0), (3, 5, [5, 5, 10, 12], 0), (3, 90, [200, 100, 100, 100], 0)]
    gt = make_gt(anns, images)
    results = [det(im, c, b, 1.0) for im, c, b, _ in anns]
    out = coco_evaluate(gt, results)
    assert_matches_reference(out, gt, results)
    for name in STAT_NAMES:
        assert out[name] == pytest.approx(1.0), name
    assert out["per_class_AP"] == pytest.approx({"cat": 1.0, "dog": 1.0, "fox": 1.0})
    assert out["per_class_AP50"] == pytest.approx({"cat": 1.0, "dog": 1.0, "fox": 1.0})
    pr = out["precision_recall"]
    assert pr["iou"] == 0.5 and len(pr["recall"]) == len(pr["precision"]) == 101
    assert pr["recall"][0] == 0.0 and pr["recall"][-1] == 1.0
    assert pr["precision"] == pytest.approx([1.0] * 101)
    assert gt == make_gt(anns, images), "the ground truth must not be modified"
    assert results == [det(im, c, b, 1.0) for im, c, b, _ in anns], "nor the results"
    json.dumps(out, allow_nan=False)  # plain floats / None / lists / str only


def test_shifted_box_gives_expected_ap():
    gt = make_gt([(1, 1, [50, 50, 100, 100], 0)])
    results = [det(1, 1, [70, 50, 100, 100], 0.9)]  # IoU = 80 * 100 / (120 * 100) = 2/3
    out = coco_evaluate(gt, results)
    assert_matches_reference(out, gt, results)
    assert out["AP50"] == pytest.approx(1.0, abs=1e-12)  # pycocotools divides by tp + fp + eps
    assert out["AP75"] == 0.0
    assert out["AP"] == pytest.approx(4 / 10, abs=1e-12)  # thresholds .50 .55 .60 .65 <= 0.667
    assert out["APs"] is None and out["APm"] is None and out["APl"] == pytest.approx(0.4)  # area 100^2 > 96^2


def test_false_positive_ranked_above_true_positive_halves_ap():
    gt = make_gt([(1, 5, [50, 50, 100, 100], 0)])
    tp, fp = det(1, 5, [50, 50, 100, 100], 0.8), det(1, 5, [200, 200, 50, 50], 0.9)
    out = coco_evaluate(gt, [fp, tp])
    assert_matches_reference(out, gt, [fp, tp])
    # ranks: FP (precision 0), TP (precision 1/2, recall 1) -> interpolated precision 0.5 everywhere
    assert out["AP"] == pytest.approx(0.5, abs=1e-12)
    assert out["AP50"] == pytest.approx(0.5, abs=1e-12)
    fp["score"] = 0.7  # below the TP: recall 1 is reached at precision 1
    assert coco_evaluate(gt, [fp, tp])["AP"] == pytest.approx(1.0)


def test_non_contiguous_category_ids_are_kept():
    gt = make_gt([(1, 1, [0, 0, 50, 50], 0), (1, 90, [100, 100, 80, 80], 0)])
    results = [det(1, 90, [100, 100, 80, 80], 0.9), det(1, 1, [0, 0, 50, 50], 0.8)]
    out = coco_evaluate(gt, results)
    assert out["AP"] == pytest.approx(1.0)
    assert out["per_class_AP"]["fox"] == pytest.approx(1.0)
    assert out["per_class_AP"]["dog"] is None  # no ground truth for id 5: undefined, not 0
    # a label index written in place of the category id is caught, not silently ignored
    with pytest.raises(ValueError, match="category ids"):
        coco_evaluate(gt, [det(1, 2, [0, 0, 50, 50], 0.8)])
    with pytest.raises(ValueError, match="image ids"):
        coco_evaluate(gt, [det(7, 1, [0, 0, 50, 50], 0.8)])


def test_empty_results_give_zero_ap():
    gt = make_gt([(1, 1, [0, 0, 50, 50], 0), (1, 5, [100, 100, 100, 100], 0)])
    out = coco_evaluate(gt, [])
    for name in ("AP", "AP50", "AP75", "APm", "APl", "AR1", "AR10", "AR100"):
        assert out[name] == 0.0, name
    assert out["APs"] is None  # no small ground truth
    assert out["per_class_AP"] == {"cat": 0.0, "dog": 0.0, "fox": None}
    assert out["precision_recall"]["precision"] == [0.0] * 101


def test_detection_on_crowd_region_is_not_a_false_positive():
    gt = make_gt([(1, 1, [10, 10, 50, 50], 0), (1, 1, [150, 150, 140, 140], 1)])
    tp = det(1, 1, [10, 10, 50, 50], 0.5)
    on_crowd = det(1, 1, [160, 160, 60, 60], 0.9)  # inside the crowd region, higher score
    out = coco_evaluate(gt, [on_crowd, tp])
    assert_matches_reference(out, gt, [on_crowd, tp])
    assert out["AP"] == pytest.approx(1.0)
    elsewhere = det(1, 1, [70, 150, 60, 60], 0.9)  # same box nowhere near anything: a real FP
    assert coco_evaluate(gt, [elsewhere, tp])["AP"] == pytest.approx(0.5)


def test_annotation_id_zero_is_handled():
    gt = make_gt([(1, 1, [0, 0, 50, 50], 0)])
    gt["annotations"][0]["id"] = 0  # pycocotools alone would count the match as a miss
    assert coco_evaluate(gt, [det(1, 1, [0, 0, 50, 50], 1.0)])["AP"] == pytest.approx(1.0)


def test_random_case_matches_pycocotools():
    rng = np.random.default_rng(0)
    images = [(i, 640, 480) for i in range(1, 9)]
    anns, results = [], []
    for im, _, _ in images:
        for _ in range(rng.integers(0, 6)):
            cat = CATS[rng.integers(0, 3)]["id"]
            x, y = rng.uniform(0, 400), rng.uniform(0, 300)
            w, h = rng.uniform(4, 200), rng.uniform(4, 150)
            anns.append((im, cat, [x, y, w, h], int(rng.random() < 0.1)))
            if rng.random() < 0.8:  # a noisy detection of it, sometimes with the wrong class
                c = cat if rng.random() < 0.8 else CATS[rng.integers(0, 3)]["id"]
                noisy = [x + rng.normal(0, 8), y + rng.normal(0, 8), w * rng.uniform(0.7, 1.3), h * rng.uniform(0.7, 1.3)]
                results.append(det(im, c, noisy, float(rng.random())))
        for _ in range(rng.integers(0, 4)):  # background detections
            results.append(det(im, CATS[rng.integers(0, 3)]["id"],
                               [rng.uniform(0, 500), rng.uniform(0, 400), rng.uniform(5, 100), rng.uniform(5, 100)],
                               float(rng.random())))
    gt = make_gt(anns, images)
    out = coco_evaluate(gt, results)
    ev = assert_matches_reference(out, gt, results)
    assert 0.0 < out["AP"] < 1.0
    prec = ev.eval["precision"]
    for k, cat in enumerate(CATS):
        s = prec[:, :, k, 0, 2]
        assert out["per_class_AP"][cat["name"]] == pytest.approx(float(np.mean(s[s > -1])), abs=1e-12)
        s = prec[0, :, k, 0, 2]
        assert out["per_class_AP50"][cat["name"]] == pytest.approx(float(np.mean(s[s > -1])), abs=1e-12)
    s = prec[0, :, :, 0, 2]
    assert out["precision_recall"]["precision"] == pytest.approx([float(np.mean(r[r > -1])) for r in s])
    # evaluating a subset of images equals evaluating a ground truth restricted to it
    sub = [1, 2, 3]
    gt_sub = {**gt, "images": [i for i in gt["images"] if i["id"] in sub],
              "annotations": [a for a in gt["annotations"] if a["image_id"] in sub]}
    res_sub = [r for r in results if r["image_id"] in sub]
    restricted = coco_evaluate(gt, res_sub, img_ids=sub)
    assert_matches_reference(restricted, gt_sub, res_sub)


# ---------------------------------------------------------------- PostProcess / to_coco_results

def _logit(p):
    return math.log(p / (1 - p))


def test_postprocess_boxes_back_to_original_pixels():
    # canvas S = 112, image 200 x 100 (w x h): scale = 112 / 200 = 0.56; the image covers the
    # top 112 x 56 of the canvas.
    boxes = torch.tensor([[[0.5, 0.25, 0.2, 0.1],  # canvas (44.8, 22.4, 67.2, 33.6) -> (80, 40, 120, 60)
                           [0.9, 0.45, 0.4, 0.2]]])  # -> (140, 70, 220, 110), clipped to (140, 70, 200, 100)
    logits = torch.tensor([[[_logit(0.9), -20.0], [-20.0, _logit(0.8)]]])
    pp = PostProcess(topk=2, score_threshold=0.0, canvas_size=112)
    (out,) = pp({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([0.56]), torch.tensor([[100, 200]]))
    assert out["labels"].dtype == torch.int64 and out["labels"].tolist() == [0, 1]
    assert out["scores"] == pytest.approx(torch.tensor([0.9, 0.8]), abs=1e-6)
    torch.testing.assert_close(out["boxes"], torch.tensor([[80.0, 40.0, 120.0, 60.0], [140.0, 70.0, 200.0, 100.0]]),
                               rtol=0, atol=1e-4)
    # canvas_size given to forward instead
    (again,) = PostProcess(topk=2, score_threshold=0.0)({"pred_logits": logits, "pred_boxes": boxes}, [0.56],
                                                         [[100, 200]], canvas_size=112)
    torch.testing.assert_close(again["boxes"], out["boxes"])
    with pytest.raises(ValueError, match="canvas_size"):
        PostProcess(topk=2, score_threshold=0.0)({"pred_logits": logits, "pred_boxes": boxes}, [0.56], [[100, 200]])


def test_postprocess_topk_over_queries_and_classes_and_threshold():
    probs = torch.tensor([[[0.10, 0.70, 0.20], [0.95, 0.05, 0.60], [0.30, 0.40, 0.80]],
                          [[0.01, 0.02, 0.03], [0.04, 0.05, 0.50], [0.06, 0.07, 0.08]]])
    logits = torch.log(probs / (1 - probs))
    g = torch.Generator().manual_seed(0)
    boxes = torch.cat([torch.rand(2, 3, 2, generator=g) * 0.4 + 0.3, torch.rand(2, 3, 2, generator=g) * 0.2 + 0.05], -1)
    outputs = {"pred_logits": logits, "pred_boxes": boxes}
    scales, sizes = torch.tensor([1.0, 1.0]), torch.tensor([[100, 100], [100, 100]])
    first, second = PostProcess(topk=4, score_threshold=0.0, canvas_size=100)(outputs, scales, sizes)
    assert first["scores"] == pytest.approx(torch.tensor([0.95, 0.80, 0.70, 0.60]), abs=1e-6)
    assert first["labels"].tolist() == [0, 2, 1, 2]
    expected_queries = [1, 2, 0, 1]  # inside the image: no clipping
    torch.testing.assert_close(first["boxes"], cxcywh_to_xyxy(boxes[0, expected_queries]) * 100)
    assert second["labels"].tolist()[0] == 2 and len(second["scores"]) == 4
    first, second = PostProcess(topk=4, score_threshold=0.65, canvas_size=100)(outputs, scales, sizes)
    assert first["labels"].tolist() == [0, 2, 1]
    assert len(second["scores"]) == 0 and second["boxes"].shape == (0, 4)
    (every,) = PostProcess(topk=100, score_threshold=0.0, canvas_size=100)({"pred_logits": logits[:1], "pred_boxes": boxes[:1]},
                                                      scales[:1], sizes[:1])
    assert len(every["scores"]) == 9  # topk clamped to Q x K
    assert torch.all(every["scores"][:-1] >= every["scores"][1:])


def test_to_coco_results_writes_xywh_and_original_category_ids():
    detections = [
        {"scores": torch.tensor([0.9, 0.4]), "labels": torch.tensor([2, 0]),
         "boxes": torch.tensor([[10.0, 20.0, 110.0, 70.0], [1.234, 2.345, 3.456, 4.567]])},
        {"scores": torch.tensor([]), "labels": torch.tensor([], dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    ]
    res = to_coco_results(detections, torch.tensor([42, 7]), CATS)
    assert len(res) == 2
    assert res[0] == {"image_id": 42, "category_id": 90, "bbox": [10.0, 20.0, 100.0, 50.0], "score": pytest.approx(0.9)}
    assert res[1]["category_id"] == 1 and res[1]["bbox"] == [1.23, 2.35, 2.22, 2.22]
    assert all(isinstance(v, float) for r in res for v in r["bbox"]) and isinstance(res[0]["image_id"], int)
    with pytest.raises(ValueError, match="labels"):
        to_coco_results([{"scores": torch.tensor([0.5]), "labels": torch.tensor([3]), "boxes": torch.zeros(1, 4)}],
                        [1], CATS)


def test_postprocessed_results_score_perfectly_end_to_end():
    # two images of 200 x 100 and 80 x 160 on a 112 canvas; the model outputs the targets exactly
    size = 112
    targets, logits, boxes = [], torch.full((2, 5, 3), -12.0), torch.rand(2, 5, 4) * 0.2 + 0.1
    gt_anns = []
    for i, (image_id, (h, w), objs) in enumerate([
            (11, (100, 200), [(0, [20.0, 10.0, 60.0, 40.0]), (2, [100.0, 50.0, 90.0, 45.0])]),
            (12, (160, 80), [(1, [5.0, 30.0, 50.0, 100.0])])]):
        scale = size / max(h, w)
        xyxy = torch.tensor([[x, y, x + bw, y + bh] for _, (x, y, bw, bh) in objs]) * scale / size
        cxcywh = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                              xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], 1)
        labels = torch.tensor([lab for lab, _ in objs])
        targets.append({"boxes": cxcywh, "labels": labels, "image_id": image_id,
                        "orig_size": torch.tensor([h, w]), "scale": scale})
        boxes[i, : len(objs)] = cxcywh
        logits[i, torch.arange(len(objs)), labels] = 5.0
        gt_anns += [(image_id, CATS[lab]["id"], b, 0) for lab, b in objs]
    gt = make_gt(gt_anns, [(11, 200, 100), (12, 80, 160), (13, 50, 50)])
    gt["annotations"].append({"id": 99, "image_id": 13, "category_id": 1, "bbox": [0, 0, 9, 9],
                              "area": 81.0, "iscrowd": 0})  # an image never fed: not evaluated
    pp = PostProcess(topk=10, score_threshold=0.0, canvas_size=size)
    scales = torch.tensor([t["scale"] for t in targets])
    sizes = torch.stack([t["orig_size"] for t in targets])
    outs = pp({"pred_logits": logits, "pred_boxes": boxes}, scales, sizes)
    results = to_coco_results(outs, [t["image_id"] for t in targets], CATS)
    result = coco_evaluate(gt, results, img_ids=[11, 12])
    assert result["AP"] == pytest.approx(1.0)
    assert result["per_class_AP"] == pytest.approx({"cat": 1.0, "dog": 1.0, "fox": 1.0})
    # image 13's object, never predicted, counts once it is evaluated
    assert coco_evaluate(gt, results)["AP"] < 1.0


# ---------------------------------------------------------------- single-object metrics

def test_single_object_classification_metrics_equal_sklearn():
    gt = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0])
    pred = torch.tensor([0, 1, 1, 4, 2, 0, 2, 4])  # class 4 predicted, never true; class 3 nowhere
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]]).repeat(8, 1)
    out = single_object_metrics(pred, torch.rand(8), boxes, gt, boxes, num_classes=5)
    p, r, f, _ = precision_recall_fscore_support(gt.numpy(), pred.numpy(), labels=[0, 1, 2, 4],
                                                 average="macro", zero_division=0)
    assert out["accuracy"] == pytest.approx(accuracy_score(gt.numpy(), pred.numpy()))
    assert out["precision"] == pytest.approx(p)
    assert out["recall"] == pytest.approx(r)
    assert out["f1"] == pytest.approx(f)
    assert out["mean_iou"] == pytest.approx(1.0) and out["count"] == 8
    assert out["per_class_ap50"][3] is None and out["per_class_ap50"][4] is None
    with pytest.raises(ValueError):
        single_object_metrics(torch.tensor([-2]), torch.rand(1), boxes[:1], gt[:1], boxes[:1], 5)
    with pytest.raises(ValueError):
        single_object_metrics(gt[:1], torch.rand(1), boxes[:1], torch.tensor([-1]), boxes[:1], 5)


def test_single_object_no_prediction_is_a_miss_but_nobodys_false_positive():
    # images 0, 1 are class 0 and both predicted right; image 2 (class 1) got no detection at all
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes = box.repeat(3, 1)
    out = single_object_metrics(torch.tensor([0, 0, -1]), torch.tensor([0.9, 0.8, 0.0]),
                                boxes, torch.tensor([0, 0, 1]), boxes, 2)
    assert out["accuracy"] == pytest.approx(2 / 3)
    # class 0: precision 1, recall 1; class 1: precision 0 (never predicted), recall 0
    assert out["precision"] == pytest.approx(0.5) and out["recall"] == pytest.approx(0.5)
    assert out["mean_iou"] == pytest.approx(2 / 3)  # the missed image contributes IoU 0
    assert out["per_class_ap50"] == [pytest.approx(1.0), 0.0]


def test_single_object_mean_iou_is_geometric():
    gt_boxes = torch.tensor([[0.0, 0.0, 100.0, 100.0]] * 4)
    pred_boxes = torch.tensor([
        [0.0, 0.0, 100.0, 100.0],      # identical: 1
        [20.0, 0.0, 120.0, 100.0],     # shifted by 20 px: 80 / 120
        [200.0, 200.0, 250.0, 260.0],  # disjoint: 0
        [25.0, 25.0, 75.0, 75.0],      # nested 50 x 50 in 100 x 100: 2500 / 10000
    ])
    labels = torch.zeros(4, dtype=torch.int64)
    out = single_object_metrics(labels, torch.rand(4), pred_boxes, labels, gt_boxes, num_classes=1)
    assert out["mean_iou"] == pytest.approx((1 + 80 / 120 + 0 + 0.25) / 4, abs=1e-12)
    # TP iff IoU >= 0.5: images 0 and 1; 2 of 4 objects found, ranking decides the AP
    assert out["accuracy"] == 1.0


def _single_reference_ap50(pl, scores, pb, gl, gb, cat_ids):
    xywh = lambda b: [b[0], b[1], b[2] - b[0], b[3] - b[1]]  # noqa: E731
    n = len(gl)
    gt = make_gt([(i + 1, cat_ids[int(gl[i])], xywh(gb[i].tolist()), 0) for i in range(n)],
                 [(i + 1, 1000, 1000) for i in range(n)],
                 [{"id": c, "name": str(c)} for c in cat_ids])
    results = [det(i + 1, cat_ids[int(pl[i])], xywh(pb[i].tolist()), float(scores[i])) for i in range(n)]
    ev, _ = reference(gt, results)
    prec = ev.eval["precision"][0, :, :, 0, 2]
    per_class = [float(np.mean(prec[:, k])) if (prec[:, k] > -1).any() else None for k in range(len(cat_ids))]
    return float(ev.stats[1]), per_class


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_object_map50_equals_pycocotools(seed):
    g = torch.Generator().manual_seed(seed)
    n, k = 60, 4
    gl = torch.randint(0, k - 1, (n,), generator=g)  # class 3 never true: pred-only class
    pl = torch.where(torch.rand(n, generator=g) < 0.7, gl, torch.randint(0, k, (n,), generator=g))
    xy = torch.rand(n, 2, generator=g) * 500
    wh = torch.rand(n, 2, generator=g) * 300 + 20
    gb = torch.cat([xy, xy + wh], 1).double()
    jitter = (torch.rand(n, 4, generator=g) - 0.5) * wh.repeat(1, 2) * 0.8
    pb = gb + jitter.double()
    pb = torch.cat([torch.minimum(pb[:, :2], pb[:, 2:] - 1), pb[:, 2:]], 1)
    scores = (torch.rand(n, generator=g) * 10).round() / 10  # ties resolved as pycocotools does
    out = single_object_metrics(pl, scores, pb, gl, gb, num_classes=k)
    ap50, per_class = _single_reference_ap50(pl, scores, pb, gl, gb, [1, 5, 90, 91])
    assert 0.0 < out["map50"] < 1.0
    assert out["map50"] == pytest.approx(ap50, abs=1e-12)
    assert out["per_class_ap50"] == pytest.approx(per_class, abs=1e-12)


def test_single_object_map50_hand_case():
    gb = torch.tensor([[0.0, 0.0, 100.0, 100.0]] * 4)
    pb = torch.tensor([[0.0, 0.0, 100.0, 100.0], [20.0, 0.0, 120.0, 100.0],
                       [200.0, 200.0, 250.0, 260.0], [25.0, 25.0, 75.0, 75.0]])
    labels = torch.zeros(4, dtype=torch.int64)
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])  # TP, TP, FP, FP: recall 0.5 at precision 1
    out = single_object_metrics(labels, scores, pb, labels, gb, num_classes=1)
    assert out["map50"] == pytest.approx(51 / 101, abs=1e-12)  # recall thresholds 0 .. 0.50
    ap50, _ = _single_reference_ap50(labels, scores, pb, labels, gb, [1])
    assert out["map50"] == pytest.approx(ap50, abs=1e-12)
