"""Losses more than one head uses: the softmax focal loss (classification heads, single-object
detectors) and ``build_loss`` choosing it or cross-entropy by name."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class FocalLoss(nn.Module):
    """Multi-class focal loss ``-alpha (1 - p_t)^gamma log p_t`` (Lin et al. 2017), batch mean.

    Written here because torchvision's ``sigmoid_focal_loss`` is the per-class sigmoid form used by
    detectors; single-label classification needs the softmax form.
    """

    def __init__(self, gamma: float, label_smoothing: float = 0.0, alpha: float = 1.0,
                 reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.alpha = alpha  # a constant factor in the single-label form (single-object detectors use 0.25)
        self.reduction = reduction

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logp = F.log_softmax(logits.float(), dim=-1)
        logp_t = logp.gather(1, target[:, None]).squeeze(1)
        weight = (1 - logp_t.exp()).pow(self.gamma)
        nll = -logp_t
        if self.label_smoothing:
            nll = (1 - self.label_smoothing) * nll - self.label_smoothing * logp.mean(dim=-1)
        loss = self.alpha * weight * nll
        return loss.mean() if self.reduction == "mean" else loss.sum()


def build_loss(kind: str, label_smoothing: float, gamma: float) -> nn.Module:
    if kind == "ce":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    if kind == "focal":
        return FocalLoss(gamma=gamma, label_smoothing=label_smoothing)
    raise ValueError(f"unknown loss {kind!r}: choose ce or focal")
