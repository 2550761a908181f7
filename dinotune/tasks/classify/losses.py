"""Classification losses: cross-entropy with label smoothing, and softmax focal loss."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class FocalLoss(nn.Module):
    """Multi-class focal loss ``-alpha (1 - p_t)^gamma log p_t`` (Lin et al. 2017), batch mean.

    Written here because torchvision's ``sigmoid_focal_loss`` is the per-class sigmoid form used by
    detectors; single-label classification needs the softmax form.
    """

    def __init__(self, gamma: float = 2.0, label_smoothing: float = 0.0, alpha: float = 1.0):
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.alpha = alpha  # a constant factor in the single-label form (the seeds use 0.25)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logp = F.log_softmax(logits.float(), dim=-1)
        logp_t = logp.gather(1, target[:, None]).squeeze(1)
        weight = (1 - logp_t.exp()).pow(self.gamma)
        nll = -logp_t
        if self.label_smoothing:
            nll = (1 - self.label_smoothing) * nll - self.label_smoothing * logp.mean(dim=-1)
        return self.alpha * (weight * nll).mean()


def build_loss(kind: str, label_smoothing: float = 0.0, gamma: float = 2.0) -> nn.Module:
    if kind == "ce":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    if kind == "focal":
        return FocalLoss(gamma=gamma, label_smoothing=label_smoothing)
    raise ValueError(f"unknown loss {kind!r}: choose ce or focal")
