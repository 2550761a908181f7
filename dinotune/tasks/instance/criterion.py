"""Matching and losses with masks (Mask2Former's recipe on detection's set loss).

A query's cost against a target adds, to detection's class and box costs, the sigmoid
cross-entropy and the dice loss of its mask against the target's, both on the same ``P`` points
drawn uniformly over the canvas (one draw per image, shared by every pair, so costs compare).
The matched pairs' mask losses are taken on ``P`` points per mask chosen by uncertainty: of
``oversample_ratio * P`` uniform candidates, the ``importance_ratio`` share where the predicted
logit is closest to 0, the rest uniform (PointRend / Mask2Former).

Points are the centres of the TARGET's pixels (the ``S x S`` canvas), drawn with replacement, or
every pixel when there are no more than ``P``: the target is read exactly (0 or 1, no blurred
edges), and the prediction bilinearly between its coarser cells, which is how evaluation brings
masks to the image, so the loss trains what is scored, and a perfect mask costs exactly 0.

Targets carry ``masks`` ``N x S x S`` {0, 1} on the canvas; predictions ``pred_masks``
``B x Q x Hm x Wm`` logits on a grid covering the same canvas, so one normalised point is the same
place in both (``grid_sample``, ``align_corners=False``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dinotune.tasks.detect.criterion import LOSSES, SetCriterion
from dinotune.tasks.detect.matcher import HungarianMatcher

MASK_LOSSES = ("loss_mask", "loss_dice")


def point_sample(maps: Tensor, points: Tensor) -> Tensor:
    """``N x H x W`` maps read (bilinearly) at ``N x P x 2`` points ``(x, y)`` in [0, 1] -> ``N x P``."""
    grid = (2.0 * points - 1.0).unsqueeze(2)  # N x P x 1 x 2 in grid_sample's [-1, 1]
    return F.grid_sample(maps.unsqueeze(1).float(), grid, mode="bilinear", align_corners=False)[:, 0, :, 0]


def grid_points(height: int, width: int, device: torch.device) -> Tensor:
    """The ``H * W`` cell centres of an ``H x W`` grid as ``(x, y)`` in [0, 1]."""
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(-1, 2)


def pixel_points(count: int, height: int, width: int, device: torch.device, batch: int = 1) -> Tensor:
    """``batch x count`` random pixel centres of an ``H x W`` grid as ``(x, y)`` in [0, 1], or all
    ``H * W`` of them (in order) when ``count`` covers them."""
    if height * width <= count:
        return grid_points(height, width, device).expand(batch, -1, -1)
    index = torch.randint(height * width, (batch, count), device=device)
    return torch.stack([((index % width).float() + 0.5) / width, ((index // width).float() + 0.5) / height], -1)


def uncertain_points(logits: Tensor, num_points: int, oversample_ratio: float, importance_ratio: float,
                     size: tuple[int, int]) -> Tensor:
    """``N x Hm x Wm`` logits -> ``N x P`` pixel centres of the ``size`` target grid, the
    ``importance_ratio`` share where ``|logit|`` is smallest among ``oversample_ratio * P``
    candidates, the rest uniform; every pixel when the grid has no more than ``P``."""
    n = logits.shape[0]
    h, w = size
    if h * w <= num_points:
        return grid_points(h, w, logits.device).expand(n, -1, -1)
    candidates = pixel_points(int(num_points * oversample_ratio), h, w, logits.device, n)
    uncertainty = -point_sample(logits.detach(), candidates).abs()
    important = int(importance_ratio * num_points)
    picked = uncertainty.topk(important, dim=1).indices
    chosen = candidates.gather(1, picked.unsqueeze(-1).expand(-1, -1, 2))
    return torch.cat([chosen, pixel_points(num_points - important, h, w, logits.device, n)], dim=1)


def dice_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """``N x P`` logits and {0, 1} targets -> ``N`` dice losses (``1 - (2|A B| + 1) / (|A| + |B| + 1)``)."""
    prob = logits.sigmoid()
    return 1 - (2 * (prob * targets).sum(-1) + 1) / (prob.sum(-1) + targets.sum(-1) + 1)


def pairwise_mask_costs(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``Q x P`` logits, ``N x P`` targets -> (``Q x N`` mean sigmoid cross-entropy, ``Q x N`` dice loss)."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    bce = (pos @ targets.T + neg @ (1 - targets).T) / logits.shape[1]
    prob = logits.sigmoid()
    dice = 1 - (2 * prob @ targets.T + 1) / (prob.sum(-1)[:, None] + targets.sum(-1)[None, :] + 1)
    return bce, dice


class MaskHungarianMatcher(HungarianMatcher):
    """Detection's matcher with the masks' cross-entropy and dice costs added (weights
    ``cost_mask``, ``cost_dice``), on ``num_points`` uniform points (every cell of a small grid)."""

    def __init__(self, cost_class: float, cost_bbox: float, cost_giou: float, focal_alpha: float,
                 focal_gamma: float, cost_mask: float, cost_dice: float, num_points: int):
        super().__init__(cost_class, cost_bbox, cost_giou, focal_alpha, focal_gamma)
        self.cost_mask, self.cost_dice, self.num_points = cost_mask, cost_dice, num_points

    def cost_blocks(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[Tensor]:
        blocks = super().cost_blocks(outputs, targets)
        return [cost + self.mask_cost(outputs["pred_masks"][b], t["masks"]) if len(t["labels"]) else cost
                for b, (cost, t) in enumerate(zip(blocks, targets))]

    def mask_cost(self, pred: Tensor, target: Tensor) -> Tensor:
        """``Q x Hm x Wm`` logits, ``N x S x S`` target masks -> ``Q x N`` weighted mask cost."""
        pred = pred.float()
        points = pixel_points(self.num_points, *target.shape[-2:], pred.device)[0]
        p = point_sample(pred, points.expand(len(pred), -1, -1))
        t = point_sample(target.to(pred.device).float(), points.expand(len(target), -1, -1))
        bce, dice = pairwise_mask_costs(p, t)
        return self.cost_mask * bce + self.cost_dice * dice


class MaskSetCriterion(SetCriterion):
    """Detection's set loss plus ``loss_mask`` (mean sigmoid cross-entropy over the sampled points)
    and ``loss_dice`` of every matched query's mask, each summed over masks and divided by the
    number of target boxes (as the box losses), for every decoder layer.

    Args (besides ``SetCriterion``'s; ``weight_dict`` also names ``loss_mask`` and ``loss_dice``):
        num_points, oversample_ratio, importance_ratio: the point sampling (module docstring).
    """

    loss_names = LOSSES + MASK_LOSSES

    def __init__(self, num_classes: int, matcher: MaskHungarianMatcher, weight_dict: dict[str, float],
                 focal_alpha: float, focal_gamma: float, aux_loss: bool, num_points: int,
                 oversample_ratio: float, importance_ratio: float):
        super().__init__(num_classes, matcher, weight_dict, focal_alpha, focal_gamma, aux_loss)
        self.num_points, self.oversample_ratio, self.importance_ratio = num_points, oversample_ratio, importance_ratio

    def _losses(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]],
                indices: list[tuple[Tensor, Tensor]], num_boxes: Tensor) -> dict[str, Tensor]:
        losses = super()._losses(outputs, targets, indices, num_boxes)
        masks = outputs["pred_masks"].float()
        device = masks.device
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)]).to(device)
        query_idx = torch.cat([src for src, _ in indices]).to(device)
        pred = masks[batch_idx, query_idx]  # M x Hm x Wm, M matched pairs
        if not len(pred):  # no targets: zero losses that keep the graph to the masks
            zero = masks.sum() * 0.0
            return {**losses, "loss_mask": zero, "loss_dice": zero}
        target = torch.cat([t["masks"][tgt.to(t["masks"].device)] for t, (_, tgt) in zip(targets, indices)])
        points = uncertain_points(pred, self.num_points, self.oversample_ratio, self.importance_ratio,
                                  tuple(target.shape[-2:]))
        p = point_sample(pred, points)
        with torch.no_grad():
            t = point_sample(target.to(device).float(), points)
        losses["loss_mask"] = F.binary_cross_entropy_with_logits(p, t, reduction="none").mean(1).sum() / num_boxes
        losses["loss_dice"] = dice_loss(p, t).sum() / num_boxes
        return losses
