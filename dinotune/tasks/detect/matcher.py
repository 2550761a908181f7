"""Hungarian matching of DETR queries to ground-truth boxes (Carion et al. 2020; costs as in
Deformable DETR, Zhu et al. 2021).

Each image is matched on its own ``Q x N_i`` cost block built from ITS predictions only; matching
image ``b`` against another image's queries is a silent bug (the loss still goes down, the model
just learns the wrong thing), and the tests pin it.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from dinotune.ops import box_ops


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets minimising a weighted cost.

    ``cost = cost_class * focal + cost_bbox * L1(cxcywh) + cost_giou * (-GIoU(xyxy))``, where the
    focal term is the sigmoid-focal loss of calling the query positive for the target's class minus
    that of calling it negative (so a query confident in the right class is cheap).

    Args:
        cost_class: weight of the focal classification cost.
        cost_bbox: weight of the L1 distance between normalised ``cxcywh`` boxes.
        cost_giou: weight of the negative generalized IoU.
        focal_alpha / focal_gamma: the focal-loss parameters (keep them equal to the criterion's).
    """

    def __init__(self, cost_class: float, cost_bbox: float, cost_giou: float, focal_alpha: float,
                 focal_gamma: float):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs are 0: at least one of cost_class / cost_bbox / cost_giou must be > 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def cost_matrix(self, logits: Tensor, boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """``Q x N`` float32 cost of one image: ``logits`` ``Q x K``, ``boxes`` ``Q x 4`` cxcywh,
        ``tgt_labels`` ``N`` int64, ``tgt_boxes`` ``N x 4`` cxcywh."""
        # float32 whatever the autocast dtype: bf16 logs / cdist are too coarse to rank queries
        prob = logits.float().sigmoid()[:, tgt_labels]  # Q x N, only the target classes matter
        boxes, tgt_boxes = boxes.float(), tgt_boxes.float()
        a, g = self.focal_alpha, self.focal_gamma
        neg = (1 - a) * prob.pow(g) * -(1 - prob + 1e-8).log()
        pos = a * (1 - prob).pow(g) * -(prob + 1e-8).log()
        cost = self.cost_class * (pos - neg)
        cost = cost + self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
        giou = box_ops.generalized_box_iou(box_ops.cxcywh_to_xyxy(boxes), box_ops.cxcywh_to_xyxy(tgt_boxes))
        return cost - self.cost_giou * giou

    def cost_blocks(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[Tensor]:
        """Each image's ``Q x N_i`` cost (a subclass adding costs, e.g. masks, extends this)."""
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        return [self.cost_matrix(logits[b], boxes[b], t["labels"].to(logits.device), t["boxes"].to(logits.device))
                for b, t in enumerate(targets)]

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Match every image of the batch.

        Args:
            outputs: ``pred_logits`` ``B x Q x K`` (raw, sigmoid-focal) and ``pred_boxes``
                ``B x Q x 4`` (normalised cxcywh); other keys are ignored.
            targets: ``B`` dicts with ``labels`` (``N_i`` int64) and ``boxes`` (``N_i x 4`` cxcywh).

        Returns:
            ``B`` pairs ``(pred_idx, tgt_idx)``, both int64 of length ``min(Q, N_i)`` on the CPU,
            as ``linear_sum_assignment`` returns them: ``pred_idx`` ascending, ``tgt_idx[j]`` the
            target matched to query ``pred_idx[j]``. Images without targets give two empty tensors.
        """
        logits = outputs["pred_logits"]
        if len(targets) != logits.shape[0]:
            raise ValueError(f"{len(targets)} target dicts for a batch of {logits.shape[0]} predictions")
        blocks = self.cost_blocks(outputs, targets)
        # one device -> host copy for the whole batch instead of one sync per image
        flat = torch.cat([c.flatten() for c in blocks]).cpu() if blocks else torch.empty(0)
        if not torch.isfinite(flat).all():
            raise ValueError("non-finite matching cost: the predictions hold NaN / inf (diverged training?)")
        indices = []
        for c, chunk in zip(blocks, flat.split([c.numel() for c in blocks])):
            if c.shape[1] == 0:
                indices.append((torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)))
                continue
            rows, cols = linear_sum_assignment(chunk.view(c.shape).numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
