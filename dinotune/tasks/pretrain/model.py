"""The pretraining model: the backbone (the student) and ``PretrainHead``: the DINO / iBOT head,
the teacher's weights and, for distillation, the projection onto the teacher's width."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dinotune.backbone.model import DinoBackbone
from dinotune.models.wrapper import BackboneHead
from dinotune.tasks.pretrain.heads import DINOHead
from dinotune.tasks.pretrain.teacher import TeacherWeights


class PretrainHead(nn.Module):
    """``dino``: the DINO head shared by the class token and the masked patches (iBOT with a shared
    head, DINOv2's default); ``project``: student width -> teacher width for distillation (the
    identity at the start when the widths agree), else None; ``teacher``: set by ``track``."""

    def __init__(self, width: int, prototypes: int, hidden: int, bottleneck: int, distill_width: int = 0):
        super().__init__()
        self.dino = DINOHead(width, prototypes, hidden, bottleneck) if not distill_width else None
        self.project = nn.Linear(width, distill_width) if distill_width else None
        if self.project is not None and distill_width == width:
            with torch.no_grad():
                self.project.weight.copy_(torch.eye(width))
                self.project.bias.zero_()
        self.teacher: TeacherWeights | None = None


class Pretrainer(BackboneHead):
    """Backbone + ``PretrainHead``. ``forward(crops, local_crops, masks)`` is the student's pass:

    - ``crops``: ``2B x C x G x G`` global crops (crop-major: every image's first crop, then its second),
      with ``masks`` (``2B x N`` bool) replacing patches by the mask token;
    - ``local_crops``: ``LB x C x l x l`` or an empty tensor.

    Returns ``{"cls": 2B x D class tokens, "global": 2B x K, "local": LB x K (or None), "patch":
    M x K logits of the M masked patches}``; with distillation ``{"cls": B x D', "patches": B x N x D'}``
    of ``crops`` projected onto the teacher's width."""

    head: PretrainHead

    def __init__(self, backbone: DinoBackbone, head: PretrainHead):
        super().__init__(backbone, head)

    def forward(self, crops: Tensor, local_crops: Tensor | None = None, masks: Tensor | None = None) -> dict[str, Any]:
        feats = self.backbone(crops, masks=masks)
        if self.head.project is not None:
            return {"cls": self.head.project(feats.cls), "patches": self.head.project(feats.patch_tokens),
                    "grid": feats.grid}
        dino = self.head.dino
        out: dict[str, Any] = {"cls": feats.cls, "global": dino(feats.cls), "local": None}
        out["patch"] = dino(feats.patch_tokens[masks]) if masks is not None else feats.cls.new_zeros((0, 1))
        if local_crops is not None and local_crops.numel():
            out["local"] = dino(self.backbone(local_crops).cls)
        return out
