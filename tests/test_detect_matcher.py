"""DETR matching and set loss: per-image Hungarian matching, costs against brute force, the
criterion's losses (empty images, aux layers, weighting, bf16), and the box maths they rest on."""

from __future__ import annotations

import itertools

import pytest
import torch
from torchvision.ops import generalized_box_iou

from dinotune.config import DetectLossConfig
from dinotune.ops import box_ops
from dinotune.tasks.detect.criterion import LOSSES, SetCriterion, base_name
from dinotune.tasks.detect.matcher import HungarianMatcher as _Matcher

K = 4
LOSS = DetectLossConfig()  # the configured defaults (Deformable DETR's costs and focal parameters)
WEIGHTS = {"loss_ce": LOSS.class_weight, "loss_bbox": LOSS.bbox_weight, "loss_giou": LOSS.giou_weight}


def HungarianMatcher(**kw) -> _Matcher:  # noqa: N802 - the matcher with the config's costs unless given
    costs = dict(cost_class=LOSS.class_weight, cost_bbox=LOSS.bbox_weight, cost_giou=LOSS.giou_weight,
                 focal_alpha=LOSS.focal_alpha, focal_gamma=LOSS.focal_gamma)
    return _Matcher(**{**costs, **kw})


def random_boxes(n: int, gen: torch.Generator) -> torch.Tensor:
    """``n x 4`` valid normalised cxcywh boxes."""
    centre = 0.2 + 0.6 * torch.rand(n, 2, generator=gen)
    size = 0.05 + 0.3 * torch.rand(n, 2, generator=gen)
    return torch.cat([centre, size], dim=1)


def random_batch(counts: list[int], q: int = 6, seed: int = 0, requires_grad: bool = False):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(counts), q, K, generator=gen)
    boxes = torch.stack([random_boxes(q, gen) for _ in counts])
    outputs = {"pred_logits": logits.requires_grad_(requires_grad), "pred_boxes": boxes.requires_grad_(requires_grad)}
    targets = [{"labels": torch.randint(0, K, (n,), generator=gen), "boxes": random_boxes(n, gen)} for n in counts]
    return outputs, targets


def criterion(aux_loss: bool = True, **matcher_kw) -> SetCriterion:
    return SetCriterion(K, HungarianMatcher(**matcher_kw), WEIGHTS, LOSS.focal_alpha, LOSS.focal_gamma, aux_loss)


def perfect_outputs(targets: list[dict], q: int, perms: list[list[int]]):
    """Predictions holding exact copies of the targets at query ``perms[b][j]`` for target ``j``,
    confident in the target's class; the other queries sit far away and predict background."""
    logits = torch.full((len(targets), q, K), -8.0)
    boxes = torch.tensor([0.9, 0.9, 0.02, 0.02]).repeat(len(targets), q, 1)
    for b, (t, perm) in enumerate(zip(targets, perms)):
        for j, query in enumerate(perm):
            boxes[b, query] = t["boxes"][j]
            logits[b, query, t["labels"][j]] = 8.0
    return {"pred_logits": logits, "pred_boxes": boxes}


# --- matcher ---------------------------------------------------------------------------------------

def test_batched_matching_equals_per_image():
    outputs, targets = random_batch([2, 0, 5], q=6, seed=1)
    matcher = HungarianMatcher()
    batched = matcher(outputs, targets)
    assert len(batched) == 3
    for b, (src, tgt) in enumerate(batched):
        alone = matcher({k: v[b:b + 1] for k, v in outputs.items()}, [targets[b]])[0]
        assert src.dtype == tgt.dtype == torch.int64
        assert torch.equal(src, alone[0]) and torch.equal(tgt, alone[1])
        assert len(src) == len(targets[b]["labels"])
        assert torch.equal(src, src.sort().values)  # scipy's order: ascending query index
        assert len(set(src.tolist())) == len(src) and sorted(tgt.tolist()) == list(range(len(tgt)))


def test_each_image_is_matched_against_its_own_predictions():
    """Regression: matching every image against image 0's queries gives image 1 the wrong pairs."""
    box_a, box_b = [0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.2, 0.2]
    boxes = torch.tensor([[box_a, box_b], [box_b, box_a]])  # image 1 holds image 0's queries swapped
    outputs = {"pred_logits": torch.zeros(2, 2, K), "pred_boxes": boxes}
    target = {"labels": torch.tensor([0, 0]), "boxes": torch.tensor([box_a, box_b])}
    matcher = HungarianMatcher()
    indices = matcher(outputs, [target, target])
    assert indices[0][1][indices[0][0].argsort()].tolist() == [0, 1]  # query 0 -> A, query 1 -> B
    assert dict(zip(indices[1][0].tolist(), indices[1][1].tolist())) == {0: 1, 1: 0}
    # the test discriminates: image 0's predictions would give image 1 the identity instead
    buggy = matcher({k: v[:1] for k, v in outputs.items()}, [target])[0]
    assert dict(zip(buggy[0].tolist(), buggy[1].tolist())) == {0: 0, 1: 1}


def test_matcher_recovers_permuted_copies_and_losses_vanish():
    gen = torch.Generator().manual_seed(2)
    targets = [{"labels": torch.tensor([1, 3, 0]), "boxes": random_boxes(3, gen)},
               {"labels": torch.tensor([2, 2]), "boxes": random_boxes(2, gen)}]
    perms = [[4, 0, 2], [3, 1]]
    outputs = perfect_outputs(targets, q=5, perms=perms)
    for (src, tgt), perm in zip(HungarianMatcher()(outputs, targets), perms):
        assert dict(zip(tgt.tolist(), src.tolist())) == dict(enumerate(perm))
    losses = criterion(aux_loss=False)(outputs, targets)
    assert losses["loss_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0.0, abs=1e-5)
    noisy = dict(outputs, pred_logits=torch.randn(2, 5, K, generator=gen))
    assert losses["loss_ce"] < criterion(aux_loss=False)(noisy, targets)["loss_ce"]


def focal_cost(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0):
    """Deformable DETR's classification cost, written out by hand in float64."""
    p = logits.double().sigmoid()[:, labels]
    pos = alpha * (1 - p) ** gamma * -torch.log(p)
    neg = (1 - alpha) * p ** gamma * -torch.log(1 - p)
    return pos - neg


def l1_cost(boxes: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    return (boxes.double()[:, None, :] - tgt.double()[None, :, :]).abs().sum(-1)


def giou_cost(boxes: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    xyxy = lambda b: torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], dim=1).double()  # noqa: E731
    return -generalized_box_iou(xyxy(boxes), xyxy(tgt))


@pytest.mark.parametrize("weights", [(0.0, 1.0, 0.0), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (2.0, 5.0, 2.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matching_is_the_brute_force_optimum(weights, seed):
    w_class, w_bbox, w_giou = weights
    outputs, targets = random_batch([3], q=4, seed=10 + seed)
    logits, boxes, t = outputs["pred_logits"][0], outputs["pred_boxes"][0], targets[0]
    cost = (w_class * focal_cost(logits, t["labels"]) + w_bbox * l1_cost(boxes, t["boxes"])
            + w_giou * giou_cost(boxes, t["boxes"]))  # 4 x 3, computed independently of the matcher
    ranked = sorted((sum(cost[q, j].item() for j, q in enumerate(perm)), perm)
                    for perm in itertools.permutations(range(4), 3))
    (best_cost, best), (second_cost, _) = ranked[:2]
    matcher = HungarianMatcher(cost_class=w_class, cost_bbox=w_bbox, cost_giou=w_giou)
    src, tgt = matcher(outputs, targets)[0]
    assert cost[src, tgt].sum().item() == pytest.approx(best_cost, abs=1e-5)
    if second_cost - best_cost > 1e-4:  # a class-only cost ties targets of the same class
        assert dict(zip(tgt.tolist(), src.tolist())) == dict(enumerate(best))


def test_matcher_more_targets_than_queries_and_all_zero_costs():
    outputs, targets = random_batch([5], q=3, seed=4)
    src, tgt = HungarianMatcher()(outputs, targets)[0]
    assert len(src) == len(tgt) == 3 and len(set(tgt.tolist())) == 3
    losses = criterion()(outputs, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="costs are 0"):
        HungarianMatcher(cost_class=0, cost_bbox=0, cost_giou=0)


# --- criterion -------------------------------------------------------------------------------------

@pytest.mark.parametrize("counts", [[0, 0], [3, 0, 1]])
def test_empty_targets(counts):
    outputs, targets = random_batch(counts, q=5, seed=5, requires_grad=True)
    for b, (src, tgt) in enumerate(HungarianMatcher()(outputs, targets)):
        assert len(src) == len(tgt) == counts[b]
        assert src.dtype == tgt.dtype == torch.int64
    outputs["aux_outputs"] = [{"pred_logits": outputs["pred_logits"] * 0.5, "pred_boxes": outputs["pred_boxes"]}]
    crit = criterion()
    losses = crit(outputs, targets)
    assert set(losses) == set(LOSSES) | {f"{name}_0" for name in LOSSES}
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    assert losses["loss_ce"] > 0  # every query is pushed to background
    if not sum(counts):
        assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
        assert losses["loss_bbox"].requires_grad and losses["loss_giou"].requires_grad
    crit.total(losses).backward()
    for tensor in (outputs["pred_logits"], outputs["pred_boxes"]):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all()
    if not sum(counts):
        assert not outputs["pred_boxes"].grad.any()


def test_classification_loss_normalisation_matches_deformable_detr():
    outputs, targets = random_batch([2, 3], q=4, seed=6)
    crit = criterion(aux_loss=False)
    indices = crit.matcher(outputs, targets)
    onehot = torch.zeros(2, 4, K)
    for b, (src, tgt) in enumerate(indices):
        onehot[b, src, targets[b]["labels"][tgt]] = 1
    p = outputs["pred_logits"].sigmoid()
    ce = torch.nn.functional.binary_cross_entropy_with_logits(outputs["pred_logits"], onehot, reduction="none")
    p_t = p * onehot + (1 - p) * (1 - onehot)
    alpha_t = 0.25 * onehot + 0.75 * (1 - onehot)
    expected = (alpha_t * ce * (1 - p_t) ** 2).sum() / 5  # sum over queries x classes / boxes in batch
    assert crit(outputs, targets)["loss_ce"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_aux_losses_are_matched_per_layer_and_weighted_by_name():
    gen = torch.Generator().manual_seed(7)
    targets = [{"labels": torch.tensor([0, 2]), "boxes": random_boxes(2, gen)},
               {"labels": torch.tensor([1]), "boxes": random_boxes(1, gen)}]
    final = perfect_outputs(targets, q=4, perms=[[0, 1], [2]])
    # the earlier layer is perfect under ITS matching, with the queries in another order
    aux0 = perfect_outputs(targets, q=4, perms=[[3, 0], [1]])
    aux1 = {"pred_logits": torch.randn(2, 4, K, generator=gen), "pred_boxes": torch.rand(2, 4, 4, generator=gen)}
    outputs = {**final, "aux_outputs": [aux0, aux1]}
    crit = criterion()
    losses = crit(outputs, targets)
    assert set(losses) == {f"{name}{suffix}" for name in LOSSES for suffix in ("", "_0", "_1")}
    for suffix in ("", "_0"):
        assert losses[f"loss_bbox{suffix}"].item() == pytest.approx(0.0, abs=1e-6)
        assert losses[f"loss_giou{suffix}"].item() == pytest.approx(0.0, abs=1e-5)
    assert losses["loss_bbox_1"] > 0.01
    expected = sum(WEIGHTS[name] * losses[f"{name}{suffix}"].item()
                   for name in LOSSES for suffix in ("", "_0", "_1"))
    assert crit.total(losses).item() == pytest.approx(expected, rel=1e-6)
    assert set(criterion(aux_loss=False)(outputs, targets)) == set(LOSSES)


def test_unknown_loss_names_fail_loudly():
    assert base_name("loss_giou_12") == "loss_giou" and base_name("loss_ce") == "loss_ce"
    crit = criterion()
    with pytest.raises(KeyError, match="loss_mask"):
        crit.total({"loss_ce": torch.tensor(1.0), "loss_mask_0": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="loss_dice"):
        SetCriterion(K, HungarianMatcher(), {**WEIGHTS, "loss_dice": 1.0}, 0.25, 2.0, True)
    with pytest.raises(ValueError, match="loss_giou"):
        SetCriterion(K, HungarianMatcher(), {"loss_ce": 1.0, "loss_bbox": 1.0}, 0.25, 2.0, True)


def test_criterion_rejects_bad_labels_and_class_counts():
    outputs, targets = random_batch([2], q=4, seed=8)
    targets[0]["labels"][0] = K
    with pytest.raises(ValueError, match="labels"):
        criterion()(outputs, targets)
    with pytest.raises(ValueError, match="classes"):
        SetCriterion(K + 1, HungarianMatcher(), WEIGHTS, 0.25, 2.0, True)(outputs, targets)


def test_losses_are_float32_under_bf16_autocast():
    outputs, targets = random_batch([3, 1], q=5, seed=9)
    half = {k: v.bfloat16().requires_grad_() for k, v in outputs.items()}
    crit = criterion()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = crit(half, targets)
        total = crit.total(losses)
    assert all(v.dtype == torch.float32 for v in losses.values())
    reference = crit({k: v.detach().float() for k, v in half.items()}, targets)
    for name, value in losses.items():
        assert value.item() == pytest.approx(reference[name].item(), rel=1e-5, abs=1e-6)
    total.backward()
    assert half["pred_boxes"].grad.dtype == torch.bfloat16 and torch.isfinite(half["pred_logits"].grad.float()).all()


# --- box maths -------------------------------------------------------------------------------------

def test_box_conversions_round_trip():
    gen = torch.Generator().manual_seed(11)
    cxcywh = random_boxes(50, gen).double()
    xyxy = box_ops.cxcywh_to_xyxy(cxcywh)
    assert (xyxy[:, 2:] > xyxy[:, :2]).all()
    torch.testing.assert_close(box_ops.xyxy_to_cxcywh(xyxy), cxcywh)
    torch.testing.assert_close(box_ops.xywh_to_xyxy(box_ops.xyxy_to_xywh(xyxy)), xyxy)
    xywh = box_ops.xyxy_to_xywh(box_ops.cxcywh_to_xyxy(cxcywh))
    torch.testing.assert_close(box_ops.xyxy_to_cxcywh(box_ops.xywh_to_xyxy(xywh)), cxcywh)
    torch.testing.assert_close(box_ops.xyxy_to_xywh(xyxy)[:, 2:], cxcywh[:, 2:])
    pixels = box_ops.denormalize(xyxy, 640.0, 480.0)
    assert pixels[:, 0::2].max() <= 640 and pixels[:, 1::2].max() <= 480
    torch.testing.assert_close(box_ops.normalize(pixels, 640.0, 480.0), xyxy)
    batched = xyxy.view(2, 25, 4)
    sizes = torch.tensor([640.0, 320.0]), torch.tensor([480.0, 100.0])
    scaled = box_ops.denormalize(batched, *sizes)
    torch.testing.assert_close(scaled[1], box_ops.denormalize(batched[1], 320.0, 100.0))


def test_pairwise_iou_matched_is_the_diagonal_of_box_iou():
    gen = torch.Generator().manual_seed(12)
    a = box_ops.cxcywh_to_xyxy(random_boxes(20, gen))
    b = box_ops.cxcywh_to_xyxy(random_boxes(20, gen))
    b[:5] = a[:5]  # some identical pairs (IoU 1), the rest mostly disjoint or partial
    iou = box_ops.pairwise_iou_matched(a, b)
    torch.testing.assert_close(iou, torch.diag(box_ops.box_iou(a, b)))
    torch.testing.assert_close(iou[:5], torch.ones(5))
