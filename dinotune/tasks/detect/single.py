"""The seeds' single-object detectors: one class and one box per image, from the CLS token.

``simple``: linear class and box heads on the CLS token, cross-entropy + L1.
``improved``: CLS + mean patch token, MLP heads with dropout, sigmoid box output, focal loss +
smooth L1 with the box loss weighted (2x by default), trained in two stages (frozen, then
unfrozen). The target of each image is its largest non-crowd object. Boxes are ``cxcywh``
normalised to the padded canvas, like every detection target here.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinotune.backbone.model import DinoBackbone
from dinotune.tasks.classify.losses import FocalLoss
from dinotune.tasks.classify.model import backbone_grad_context

SingleKind = Literal["simple", "improved"]


class SingleObjectHead(nn.Module):
    """``Features`` -> ``{"logits": B x K, "box": B x 4}`` (cxcywh, normalised)."""

    def __init__(self, kind: SingleKind, embed_dim: int, num_classes: int, hidden: int = 256,
                 dropout: float = 0.3):
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

    def forward(self, features) -> dict[str, Tensor]:
        x = features.cls if self.kind == "simple" else torch.cat([features.cls, features.patch_mean], -1)
        return {"logits": self.classifier(x), "box": self.box(x)}


class SingleObjectDetector(nn.Module):
    def __init__(self, backbone: DinoBackbone, head: SingleObjectHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """``B x 3 x S x S`` -> ``{"logits": B x K, "box": B x 4}``."""
        with backbone_grad_context(self.backbone):
            features = self.backbone(images)
        return self.head(features)


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
    """``simple``: CE + L1. ``improved``: focal (alpha 0.25, gamma 2) + ``box_weight`` x smooth L1."""

    def __init__(self, kind: SingleKind, box_weight: float = 2.0, focal_gamma: float = 2.0,
                 focal_alpha: float = 0.25):
        super().__init__()
        self.kind = kind
        self.box_weight = box_weight if kind == "improved" else 1.0
        self.focal = FocalLoss(gamma=focal_gamma, alpha=focal_alpha)

    def forward(self, outputs: dict[str, Tensor], targets: list[dict[str, Any]]) -> dict[str, Tensor]:
        labels, boxes, present = largest_objects(targets)
        logits, pred = outputs["logits"].float()[present], outputs["box"].float()[present]
        labels, boxes = labels[present], boxes[present]
        if not len(labels):  # a batch of empty images: a zero that keeps the graph
            zero = outputs["logits"].sum() * 0.0
            return {"loss": zero, "loss_class": zero.detach(), "loss_box": zero.detach()}
        if self.kind == "simple":
            cls_loss = F.cross_entropy(logits, labels)
            box_loss = F.l1_loss(pred, boxes)
        else:
            cls_loss = self.focal(logits, labels)
            box_loss = F.smooth_l1_loss(pred, boxes)
        return {"loss": cls_loss + self.box_weight * box_loss, "loss_class": cls_loss.detach(),
                "loss_box": box_loss.detach()}
