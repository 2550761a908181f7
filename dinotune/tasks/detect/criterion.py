"""The DETR set loss: match queries to targets, then sigmoid-focal classification plus L1 and GIoU
box losses on the matched pairs (Deformable DETR's recipe), for the last decoder layer and,
with suffixes ``_0``, ``_1``, ..., for every earlier layer in ``aux_outputs``.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from dinotune.ops import box_ops
from dinotune.tasks.detect.matcher import HungarianMatcher

LOSSES = ("loss_ce", "loss_bbox", "loss_giou")
_LAYER_SUFFIX = re.compile(r"_\d+$")  # "loss_giou_3" -> "loss_giou"


def base_name(loss_name: str) -> str:
    """The loss name without its decoder-layer suffix (``loss_ce_2`` -> ``loss_ce``)."""
    return _LAYER_SUFFIX.sub("", loss_name)


class SetCriterion(nn.Module):
    """Hungarian-matched detection losses; ``forward`` gives them unweighted, ``total`` weights them.

    Args:
        num_classes: ``K``, the width of ``pred_logits`` (no "no object" class: sigmoid focal).
        matcher: assigns queries to targets, run again for every decoder layer.
        weight_dict: weight of each loss by base name; exactly the keys ``loss_ce``,
            ``loss_bbox``, ``loss_giou`` (write 0 to switch one off).
        focal_alpha / focal_gamma: the sigmoid-focal-loss parameters.
        aux_loss: also compute the losses of every entry of ``outputs["aux_outputs"]``.
    """

    loss_names: tuple[str, ...] = LOSSES  # a subclass adding losses (masks) extends it

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 focal_alpha: float, focal_gamma: float, aux_loss: bool):
        super().__init__()
        unknown = sorted(set(weight_dict) - set(self.loss_names))
        if unknown:
            raise ValueError(f"unknown loss name(s) {unknown} in weight_dict: known losses are {list(self.loss_names)}")
        missing = [name for name in self.loss_names if name not in weight_dict]
        if missing:
            raise ValueError(f"weight_dict lacks {missing}: give every loss a weight (0 switches it off)")
        self.num_classes, self.matcher = num_classes, matcher
        self.weight_dict = {k: float(v) for k, v in weight_dict.items()}
        self.focal_alpha, self.focal_gamma, self.aux_loss = focal_alpha, focal_gamma, aux_loss

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]],
                count_reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
        """Unweighted float32 scalar losses.

        Args:
            outputs: ``pred_logits`` ``B x Q x K``, ``pred_boxes`` ``B x Q x 4`` (cxcywh in [0, 1]),
                optionally ``aux_outputs``: list of dicts with the same two keys.
            targets: ``B`` dicts with ``labels`` (``N_i`` int64) and ``boxes`` (``N_i x 4`` cxcywh).
            count_reduce: turns this batch's box count (a float tensor) into the number to divide
                by. Under several processes this is the count summed over all of them and divided
                by their number (DETR's ``num_boxes``), so that DDP's gradient average equals one
                process with the whole batch; None: this batch's own count, at least 1.

        Returns:
            ``loss_ce``, ``loss_bbox``, ``loss_giou`` and, with ``aux_loss``, the same three
            suffixed ``_i`` for ``aux_outputs[i]``. Every loss is a sum divided by the number of
            target boxes, so images with many boxes weigh more.
        """
        logits = outputs["pred_logits"]
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"pred_logits has {logits.shape[-1]} classes, the criterion {self.num_classes}")
        labels = torch.cat([t["labels"].reshape(-1) for t in targets]) if targets else torch.empty(0)
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
            raise ValueError(f"target labels must lie in 0..{self.num_classes - 1}, got {labels.unique().tolist()}")
        count = torch.tensor(float(labels.numel()), device=logits.device)
        num_boxes = count_reduce(count) if count_reduce is not None else count.clamp(min=1.0)
        # the losses run in float32 even inside a bf16 / fp16 autocast region: focal logs and
        # GIoU divisions lose too much in half precision
        with torch.autocast(device_type=logits.device.type, enabled=False):
            losses = self._layer_losses(outputs, targets, num_boxes)
            if self.aux_loss:
                for i, aux in enumerate(outputs.get("aux_outputs", [])):
                    layer = self._layer_losses(aux, targets, num_boxes)
                    losses.update({f"{name}_{i}": value for name, value in layer.items()})
        return losses

    def _layer_losses(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]],
                      num_boxes: Tensor) -> dict[str, Tensor]:
        """The losses of one decoder layer, matched on that layer's own predictions."""
        return self._losses(outputs, targets, self.matcher(outputs, targets), num_boxes)

    def _losses(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]],
                indices: list[tuple[Tensor, Tensor]], num_boxes: Tensor) -> dict[str, Tensor]:
        """The class and box losses of one layer's predictions under the matching ``indices``."""
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        device = logits.device
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)]).to(device)
        query_idx = torch.cat([src for src, _ in indices]).to(device)
        tgt_labels = torch.cat([t["labels"][tgt.to(t["labels"].device)] for t, (_, tgt) in zip(targets, indices)])
        tgt_boxes = torch.cat([t["boxes"][tgt.to(t["boxes"].device)] for t, (_, tgt) in zip(targets, indices)])
        tgt_labels, tgt_boxes = tgt_labels.to(device), tgt_boxes.to(device).float()

        # unmatched queries keep an all-zero row: they are pushed to background for every class
        onehot = torch.zeros_like(logits)
        onehot[batch_idx, query_idx, tgt_labels] = 1.0
        loss_ce = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma, reduction="sum") / num_boxes

        # with no targets these index 0 x 4 tensors: the sums are 0 but keep the graph to the boxes
        src_boxes = boxes[batch_idx, query_idx]
        loss_bbox = F.l1_loss(src_boxes, tgt_boxes, reduction="sum") / num_boxes
        # torchvision's GIoU loss pairs a[i] with b[i] (no N x N matrix) and guards zero areas
        loss_giou = generalized_box_iou_loss(box_ops.cxcywh_to_xyxy(src_boxes), box_ops.cxcywh_to_xyxy(tgt_boxes),
                                             reduction="sum") / num_boxes
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def training_losses(self, outputs: dict, targets: list[dict[str, Tensor]],
                        count_reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
        """``{"loss": the weighted total, "loss_ce", "loss_bbox", "loss_giou", ...}``: the total to
        back-propagate and the last layer's unweighted parts (detached) for the logs; the
        auxiliary layers only add to the total."""
        losses = self(outputs, targets, count_reduce)
        return {"loss": self.total(losses), **{k: losses[k].detach() for k in self.loss_names}}

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        """``sum(weight_dict[base_name(name)] * loss)``; a name without a weight raises ``KeyError``."""
        if not losses:
            raise ValueError("no losses to weight")
        terms = []
        for name, value in losses.items():
            base = base_name(name)
            if base not in self.weight_dict:
                raise KeyError(f"loss {name!r} (base name {base!r}) has no weight: "
                               f"weight_dict has {sorted(self.weight_dict)}")
            terms.append(self.weight_dict[base] * value)
        return torch.stack(terms).sum()
