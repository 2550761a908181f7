"""The tensor part of the post-processing (``MaskPostProcess.dense``, also the exported graph):
detection's top-k over ``queries x classes`` with each picked query's mask logits beside its box.
Everything after it (masks to the original pixels, thresholds, RLE) is numpy, in ``masks.py``, the
same for the PyTorch path and the torch-free runtime."""

from __future__ import annotations

from torch import Tensor

from dinotune.tasks.detect.postprocess import PostProcess

__all__ = ["MaskPostProcess"]


class MaskPostProcess(PostProcess):
    """``PostProcess`` (``topk``, ``score_threshold``, ``canvas_size``) with masks: ``dense`` also
    gives ``masks`` ``B x k x Hm x Wm`` float32 logits on the canvas grid, the picked queries' own
    (``pred_masks`` ``B x Q x Hm x Wm`` in the outputs), and ``forward`` a ``masks`` key per image."""

    fields = PostProcess.fields + ("masks",)

    def extras(self, outputs: dict[str, Tensor], query: Tensor) -> tuple[Tensor, ...]:
        masks = outputs["pred_masks"].float()
        h, w = masks.shape[-2:]
        return (masks.gather(1, query[:, :, None, None].expand(-1, -1, h, w)),)
