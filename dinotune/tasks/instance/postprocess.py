"""The tensor part of the post-processing (``MaskPostProcess.dense``, also the exported graph):
detection's top-k over ``queries x classes`` with each picked query's mask logits beside its box.
Everything after it (masks to the original pixels, thresholds, RLE) is numpy, in ``masks.py``, the
same for the PyTorch path and the torch-free runtime."""

from __future__ import annotations

import torch
from torch import Tensor

from dinotune.tasks.detect.postprocess import PostProcess, to_original

__all__ = ["MaskPostProcess"]


class MaskPostProcess(PostProcess):
    """``PostProcess`` (``topk``, ``score_threshold``, ``canvas_size``) with masks."""

    def dense(self, outputs: dict[str, Tensor], orig_sizes: Tensor, scales: Tensor | None = None,
              canvas_size: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``outputs`` (``pred_logits`` B x Q x K, ``pred_boxes`` B x Q x 4, ``pred_masks``
        B x Q x Hm x Wm), ``orig_sizes`` B x 2 ``(h, w)`` -> ``scores`` B x k, ``labels`` B x k
        (contiguous), ``boxes`` B x k x 4 ``xyxy`` original pixels, ``masks`` B x k x Hm x Wm float32
        logits on the canvas grid, best first, without the score threshold (see ``PostProcess.dense``)."""
        size = canvas_size if canvas_size is not None else self.canvas_size
        if size is None:
            raise ValueError("MaskPostProcess needs canvas_size (the padded canvas side S), in __init__ or forward")
        logits, boxes, masks = outputs["pred_logits"].float(), outputs["pred_boxes"].float(), outputs["pred_masks"]
        b, q, k = logits.shape
        scores, index = logits.sigmoid().reshape(b, q * k).topk(min(self.topk, q * k), dim=1)
        query = index // k
        picked = boxes.gather(1, query.unsqueeze(-1).expand(-1, -1, 4))
        h, w = masks.shape[-2:]
        picked_masks = masks.float().gather(1, query[:, :, None, None].expand(-1, -1, h, w))
        return scores, index % k, to_original(picked, orig_sizes, float(size), scales), picked_masks

    def forward(self, outputs: dict[str, Tensor], scales: Tensor, orig_sizes: Tensor,
                canvas_size: int | None = None) -> list[dict[str, Tensor]]:
        """Per image ``{"scores": k', "labels": k', "boxes": k' x 4, "masks": k' x Hm x Wm logits}``,
        best first, those scoring at least ``score_threshold``."""
        with torch.no_grad():
            boxes = outputs["pred_boxes"]
            b = boxes.shape[0]
            scales = torch.as_tensor(scales, dtype=torch.float32, device=boxes.device).reshape(b)
            orig_sizes = torch.as_tensor(orig_sizes, device=boxes.device).reshape(b, 2).float()
            scores, labels, xyxy, masks = self.dense(outputs, orig_sizes, scales, canvas_size)
            out = []
            for i in range(b):
                keep = scores[i] >= self.score_threshold
                out.append({"scores": scores[i][keep], "labels": labels[i][keep].to(torch.int64),
                            "boxes": xyxy[i][keep], "masks": masks[i][keep]})
            return out
