"""The segmentation loss: per-pixel cross-entropy against labels with an ignore value.

Written around ``F.cross_entropy`` (which does the ignoring and the class weights) for two
reasons: logits come at the decoder's stride and are upsampled to the label size first, and
the sum is divided by a count the caller can make global (``count_reduce``), so several
processes compute what one would on the whole batch (each process's mean would weigh its
labelled pixels differently).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SegmentationLoss(nn.Module):
    """Cross-entropy over labelled pixels, weighted per class.

    Args:
        ignore_index: label value that contributes nothing (no loss, no gradient, no count).
        class_weights: ``K`` weights (empty: all 1); the normaliser is the weight sum over the
            labelled pixels, as ``F.cross_entropy``'s mean.
    """

    def __init__(self, ignore_index: int, class_weights: Sequence[float] = ()):
        super().__init__()
        self.ignore_index = ignore_index
        weight = torch.tensor(list(class_weights), dtype=torch.float32) if class_weights else None
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, logits: Tensor, masks: Tensor,
                count_reduce: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """``logits`` ``B x K x h x w`` (any stride; upsampled bilinearly to the labels), ``masks``
        ``B x H x W`` int64 labels -> a scalar. ``count_reduce`` turns this batch's (weighted)
        labelled-pixel count into the normaliser (None: the count itself, at least 1)."""
        if logits.shape[-2:] != masks.shape[-2:]:
            logits = F.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
        weight = self.weight.to(logits.device) if self.weight is not None else None
        total = F.cross_entropy(logits.float(), masks, weight=weight, ignore_index=self.ignore_index,
                                reduction="sum")
        labelled = masks != self.ignore_index
        if weight is not None:
            count = weight[masks[labelled]].sum()
        else:
            count = labelled.sum().to(torch.float32)
        count = count_reduce(count) if count_reduce is not None else count.clamp(min=1.0)
        return total / count
