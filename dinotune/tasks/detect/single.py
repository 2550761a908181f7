"""Single-object detectors: one class and one box per image, from the CLS token.

``simple``: linear class and box heads on the CLS token, cross-entropy + L1.
``improved``: CLS + mean patch token, MLP heads with dropout, sigmoid box output, focal loss +
smooth L1 with the box loss weighted (2x by default), trained in two stages (frozen, then
unfrozen). The target of each image is its largest non-crowd object. Boxes are ``cxcywh``
normalised to the padded canvas, like every detection target here.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinotune.backbone.model import Features
from dinotune.models.losses import FocalLoss
from dinotune.models.wrapper import BackboneHead
from dinotune.tasks.detect.postprocess import per_image, to_original

SingleKind = Literal["simple", "improved"]


class SingleObjectHead(nn.Module):
    """``Features`` -> ``{"logits": B x K, "box": B x 4}`` (cxcywh, normalised).

    Args:
        kind: ``simple`` (linear heads on the CLS token) or ``improved`` (MLPs on CLS + mean patch).
        embed_dim: the backbone width ``C``.
        num_classes: ``K``.
        hidden: hidden width of the ``improved`` MLPs.
        dropout: dropout inside the ``improved`` MLPs.
    """

    def __init__(self, kind: SingleKind, embed_dim: int, num_classes: int, hidden: int, dropout: float):
        super().__init__()
        self.kind = kind
        if kind == "simple":
            self.classifier = nn.Linear(embed_dim, num_classes)
            self.box = nn.Linear(embed_dim, 4)
        elif kind == "improved":
            in_dim = 2 * embed_dim
            self.classifier = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes))
            self.box = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, hidden // 2),
                nn.ReLU(), nn.Linear(hidden // 2, 4), nn.Sigmoid())
        else:
            raise ValueError(f"unknown single-object head {kind!r}: choose simple or improved")

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """``x``: ``B x C`` (simple: CLS) or ``B x 2C`` (improved: CLS + mean patch)."""
        return {"logits": self.classifier(x), "box": self.box(x)}

    def pooled(self, features: Features) -> Tensor:
        """The head's input vector from the backbone features."""
        return features.cls if self.kind == "simple" else torch.cat([features.cls, features.patch_mean], -1)


class SingleObjectDetector(BackboneHead):
    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``B x 3 x S x S`` -> ``{"logits": B x K, "box": B x 4}``."""
        return self.head(self.to_head(self.head.pooled(self.backbone_features(images))))


def largest_objects(targets: list[dict[str, Any]]) -> tuple[Tensor, Tensor, Tensor]:
    """Per image the largest target box: ``labels B``, ``boxes B x 4`` (cxcywh) and a ``B`` bool
    mask of images that have any object (the others get label -1 and a zero box)."""
    labels, boxes, present = [], [], []
    for t in targets:
        b = t["boxes"]
        if len(b):
            i = int((b[:, 2] * b[:, 3]).argmax())
            labels.append(t["labels"][i])
            boxes.append(b[i])
            present.append(True)
        else:
            labels.append(torch.tensor(-1, device=b.device))
            boxes.append(b.new_zeros(4))
            present.append(False)
    return torch.stack(labels), torch.stack(boxes), torch.tensor(present, device=boxes[0].device)


class SingleObjectLoss(nn.Module):
    """``simple``: CE + L1. ``improved``: focal + ``box_weight`` x smooth L1.

    Both terms are means over the images that have an object; ``count_reduce`` (see
    ``SetCriterion``) turns this process's count into the one to divide by, so several processes
    compute what one would with the whole batch.
    """

    def __init__(self, kind: SingleKind, box_weight: float, focal_gamma: float, focal_alpha: float):
        super().__init__()
        self.kind = kind
        self.box_weight = box_weight if kind == "improved" else 1.0
        self.focal = FocalLoss(gamma=focal_gamma, alpha=focal_alpha, reduction="sum")

    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Any]],
                count_reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
        """``{"loss", "loss_class", "loss_box"}`` (the two parts detached, for the logs)."""
        labels, boxes, present = largest_objects(targets)
        logits, pred = outputs["logits"].float()[present], outputs["box"].float()[present]
        labels, boxes = labels[present], boxes[present]
        count = torch.tensor(float(len(labels)), device=logits.device)
        count = count_reduce(count) if count_reduce is not None else count.clamp(min=1.0)
        if not len(labels):  # a batch of empty images: a zero that keeps the graph
            zero = outputs["logits"].sum() * 0.0
            return {"loss": zero, "loss_class": zero.detach(), "loss_box": zero.detach()}
        if self.kind == "simple":
            cls_loss = F.cross_entropy(logits, labels, reduction="sum") / count
            box_loss = F.l1_loss(pred, boxes, reduction="sum") / (4 * count)
        else:
            cls_loss = self.focal(logits, labels) / count
            box_loss = F.smooth_l1_loss(pred, boxes, reduction="sum") / (4 * count)
        return {"loss": cls_loss + self.box_weight * box_loss, "loss_class": cls_loss.detach(),
                "loss_box": box_loss.detach()}


class SingleObjectPostProcess(nn.Module):
    """Outputs -> one detection per image in original pixels (the arg-max class, its softmax score).

    Args:
        canvas_size: ``S``, the side of the padded canvas the boxes are normalised by.
    """

    def __init__(self, canvas_size: int):
        super().__init__()
        self.canvas_size = canvas_size

    def dense(self, outputs: dict[str, Tensor], orig_sizes: Tensor, scales: Tensor | None = None,
              canvas_size: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The tensor part (the exported graph's too): ``scores`` B x 1 (the arg-max class's softmax
        score), ``labels`` B x 1, ``boxes`` B x 1 x 4 ``xyxy`` original pixels, clipped
        (``canvas_size``: another canvas side than the training one, for an export at another size)."""
        scores, labels = outputs["logits"].float().softmax(-1).max(-1)
        boxes = outputs["box"].float().clamp(0, 1).unsqueeze(1)
        size = float(canvas_size or self.canvas_size)
        return scores.unsqueeze(1), labels.unsqueeze(1), to_original(boxes, orig_sizes, size, scales)

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], scales: Tensor, orig_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Per image ``{"scores": 1, "labels": 1, "boxes": 1 x 4 xyxy}`` (as ``PostProcess``)."""
        b = outputs["logits"].shape[0]
        device = outputs["logits"].device
        scales = torch.as_tensor(scales, dtype=torch.float32, device=device).reshape(b)
        orig_sizes = torch.as_tensor(orig_sizes, device=device).reshape(b, 2).float()
        scores, labels, boxes = self.dense(outputs, orig_sizes, scales)
        return [per_image(scores[i], labels[i], boxes[i], 0.0) for i in range(b)]
