"""The instance segmenter's model, matcher, loss and tensor post-processing: shapes, a perfect mask
costs nothing, the matcher follows the masks, the post-processing picks the masks of its boxes,
Mask R-CNN trains and predicts masks."""

from __future__ import annotations

import pytest
import torch

from dinotune.backbone import DinoBackbone
from dinotune.config import build_config
from dinotune.config.instance import InstanceModelConfig
from dinotune.tasks.instance.criterion import (
    MaskHungarianMatcher,
    MaskSetCriterion,
    dice_loss,
    grid_points,
    pairwise_mask_costs,
    point_sample,
    uncertain_points,
)
from dinotune.tasks.instance.model import build_mask_detr
from dinotune.tasks.instance.postprocess import MaskPostProcess

SMALL = dict(num_queries=5, decoder_layers=2, hidden_dim=32, num_heads=2, ffn_dim=64, sampling_points=2,
             pyramid_scales=[2.0, 1.0], decoder_dropout=0.0, mask_dim=16, mask_scale=4.0)
S = 56


@pytest.fixture(scope="module")
def backbone():
    return DinoBackbone.from_spec("random:tiny").eval()


def _criterion(points: int = 4096) -> MaskSetCriterion:
    matcher = MaskHungarianMatcher(2.0, 5.0, 2.0, 0.25, 2.0, 5.0, 5.0, points)
    weights = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    return MaskSetCriterion(3, matcher, weights, 0.25, 2.0, True, points, 3.0, 0.75)


def _square(size: int, x0: int, y0: int, x1: int, y1: int) -> torch.Tensor:
    m = torch.zeros(size, size, dtype=torch.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def test_forward_shapes_every_layer_has_masks(backbone):
    torch.manual_seed(0)
    model = build_mask_detr(backbone, 3, InstanceModelConfig(**SMALL)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, S, S))
    grid = 4 * S // backbone.patch_size  # mask_scale 4 of the patch grid
    assert out["pred_masks"].shape == (2, 5, grid, grid)
    assert out["pred_logits"].shape == (2, 5, 3) and out["pred_boxes"].shape == (2, 5, 4)
    assert len(out["aux_outputs"]) == 1 and out["aux_outputs"][0]["pred_masks"].shape == (2, 5, grid, grid)


def test_masks_get_gradients_through_the_loss(backbone):
    torch.manual_seed(0)
    model = build_mask_detr(backbone, 3, InstanceModelConfig(**SMALL)).train()
    out = model(torch.randn(1, 3, S, S))
    target = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]]),
              "masks": _square(S, 14, 14, 42, 42)[None]}
    losses = _criterion().training_losses(out, [target])
    assert {"loss_mask", "loss_dice"} <= losses.keys()
    losses["loss"].backward()
    grads = [p.grad for n, p in model.head.named_parameters() if n.startswith(("pixel_embed", "mask_embed"))]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_perfect_mask_costs_nothing_and_a_wrong_one_does():
    target = _square(S, 10, 20, 30, 44)
    logits = (target.float() * 2 - 1) * 60  # certain, on the target's own grid
    points = uncertain_points(logits[None], 10 ** 6, 3.0, 0.75, (S, S))  # a grid this small: every pixel
    assert points.shape == (1, S * S, 2)
    p, t = point_sample(logits[None], points), point_sample(target[None].float(), points)
    assert torch.equal(t, target.float().reshape(1, -1))  # cell centres read each pixel exactly
    assert float(torch.nn.functional.binary_cross_entropy_with_logits(p, t)) < 1e-6
    assert float(dice_loss(p, t)) == pytest.approx(0.0, abs=1e-6)
    wrong = -logits
    assert float(dice_loss(point_sample(wrong[None], points), t)) > 0.9


def test_loss_is_zero_for_a_perfect_prediction():
    masks = torch.stack([_square(S, 4, 4, 20, 30), _square(S, 30, 10, 50, 50)])
    boxes = torch.tensor([[12 / S, 17 / S, 16 / S, 26 / S], [40 / S, 30 / S, 20 / S, 40 / S]])
    labels = torch.tensor([0, 2])
    logits = torch.full((1, 2, 3), -60.0)
    logits[0, 0, 0] = logits[0, 1, 2] = 60.0
    out = {"pred_logits": logits, "pred_boxes": boxes[None], "pred_masks": (masks.float() * 2 - 1)[None] * 60}
    losses = _criterion()(out, [{"labels": labels, "boxes": boxes, "masks": masks}])
    for name in ("loss_mask", "loss_dice", "loss_bbox", "loss_giou"):
        assert float(losses[name]) < 1e-5, name
    # the masks swapped between the queries: whichever way the matcher goes, some loss says so
    swapped = {**out, "pred_masks": out["pred_masks"].flip(1)}
    wrong = _criterion()(swapped, [{"labels": labels, "boxes": boxes, "masks": masks}])
    assert float(wrong["loss_dice"] + wrong["loss_ce"] + wrong["loss_bbox"]) > 0.5


def test_matcher_prefers_the_right_mask():
    # two queries with the same class and box; only their masks tell them apart
    a, b = _square(S, 0, 0, 28, 56), _square(S, 28, 0, 56, 56)
    box = torch.tensor([[0.5, 0.5, 1.0, 1.0]])
    out = {"pred_logits": torch.zeros(1, 2, 3), "pred_boxes": box.expand(2, 4)[None],
           "pred_masks": torch.stack([a, b]).float().mul(2).sub(1).mul(10)[None]}
    targets = [{"labels": torch.tensor([0, 0]), "boxes": box.expand(2, 4), "masks": torch.stack([b, a])}]
    (rows, cols), = MaskHungarianMatcher(2.0, 5.0, 2.0, 0.25, 2.0, 5.0, 5.0, 4096)(out, targets)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0}


def test_pairwise_costs_equal_the_per_pair_losses():
    torch.manual_seed(0)
    p, t = torch.randn(4, 50), (torch.rand(3, 50) > 0.5).float()
    bce, dice = pairwise_mask_costs(p, t)
    for i in range(4):
        for j in range(3):
            ref = torch.nn.functional.binary_cross_entropy_with_logits(p[i], t[j])
            torch.testing.assert_close(bce[i, j], ref)
            torch.testing.assert_close(dice[i, j], dice_loss(p[i:i + 1], t[j:j + 1])[0])


def test_uncertain_points_favour_the_boundary():
    torch.manual_seed(0)
    logits = torch.full((1, 200, 200), 20.0)
    logits[:, :, 80:120] = 0.0  # the uncertain band: 20 % of the map
    points = uncertain_points(logits, 1000, 3.0, 0.75, (200, 200))
    assert points.shape == (1, 1000, 2)
    in_band = ((points[0, :, 0] * 200 >= 80) & (points[0, :, 0] * 200 < 120)).float().mean()
    assert in_band > 0.5  # the band's ~600 of 3000 candidates all taken, then 250 uniform: ~0.65, not 0.2
    # pixel centres of the target grid, so targets are read exactly
    assert torch.allclose((points * 200 - 0.5).round(), points * 200 - 0.5, atol=1e-3)
    torch.testing.assert_close(grid_points(2, 3, torch.device("cpu")),
                               torch.tensor([[1 / 6, 0.25], [0.5, 0.25], [5 / 6, 0.25],
                                             [1 / 6, 0.75], [0.5, 0.75], [5 / 6, 0.75]]))


def test_postprocess_picks_the_masks_of_its_boxes():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 3)
    masks = torch.arange(2 * 4, dtype=torch.float32).reshape(2, 4, 1, 1).expand(-1, -1, 5, 5)
    out = {"pred_logits": logits, "pred_boxes": torch.rand(2, 4, 4) * 0.5 + 0.25, "pred_masks": masks}
    post = MaskPostProcess(topk=6, score_threshold=0.0, canvas_size=S)
    scores, labels, boxes, picked = post.dense(out, torch.tensor([[40.0, 56.0], [56.0, 30.0]]))
    flat = logits.sigmoid().reshape(2, -1)
    for b in range(2):
        top = flat[b].topk(6).indices
        assert torch.equal(labels[b], top % 3)
        assert torch.equal(picked[b, :, 0, 0], masks[b, top // 3, 0, 0])
    dets = post(out, torch.tensor([1.0, 1.0]), torch.tensor([[40, 56], [56, 30]]))
    assert dets[0]["masks"].shape == (6, 5, 5)


def test_mask_rcnn_trains_and_predicts_masks():
    from dinotune.tasks import build_backbone
    from dinotune.tasks.instance.maskrcnn import build_maskrcnn_bundle

    cfg = build_config("instance", data="unused", model="random:tiny", image_size=S, head="maskrcnn", hidden_dim=32,
                       rcnn_rpn_batch=32, rcnn_roi_batch=32, top_k=10)
    backbone, _ = build_backbone(cfg)
    torch.manual_seed(0)
    bundle = build_maskrcnn_bundle(backbone, 2, cfg, ["a", "b"], [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
    target = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]]),
              "masks": _square(S, 14, 14, 42, 42)[None]}
    model = bundle.model.train()
    losses = bundle.criterion(model(torch.randn(2, 3, S, S), [target, target]), [target, target])
    assert "loss_mask" in losses and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, S, S))
    grid = round(S * 0.5)
    assert out["masks"].shape[0] == 2 and out["masks"].shape[-2:] == (grid, grid)
    dets = bundle.postprocess(out, torch.tensor([1.0, 1.0]), torch.tensor([[S, S], [S, S]]))
    for d in dets:
        assert d["masks"].shape == (len(d["scores"]), grid, grid)
        assert torch.all(d["scores"][:-1] >= d["scores"][1:])


def test_a_mask_starts_as_its_box(backbone):
    """With the embeddings' dot product at zero, each query's mask is its box (the prior), cell for cell."""
    torch.manual_seed(0)
    head = build_mask_detr(backbone, 3, InstanceModelConfig(**SMALL)).head
    pixels = torch.zeros(1, 16, 20, 20)  # no embedding signal
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.2], [0.2, 0.3, 0.3, 0.5]]])  # cxcywh on the canvas
    logits = head.masks(torch.randn(1, 2, 32), pixels, boxes)
    centres = (torch.arange(20) + 0.5) / 20
    for q, (cx, cy, w, h) in enumerate(boxes[0].tolist()):
        inside_x = (centres > cx - w / 2) & (centres < cx + w / 2)
        inside_y = (centres > cy - h / 2) & (centres < cy + h / 2)
        assert torch.equal(logits[0, q] > 0, inside_y[:, None] & inside_x[None, :])
    # the prior does not pull on the boxes: they are learned by the box losses alone
    boxes.requires_grad_(True)
    head.masks(torch.randn(1, 2, 32), pixels, boxes).sum().backward()
    assert boxes.grad is None or not boxes.grad.any()
