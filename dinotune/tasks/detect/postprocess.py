"""DETR outputs -> detections in original image pixels, and those -> COCO results.

Model boxes are ``cxcywh`` normalised by the side ``S`` of the padded ``S x S`` canvas (see the
package docstring), so the way back to the original image is: times ``S`` (canvas pixels), divided
by the target's ``scale`` (canvas pixels per original pixel), clipped to ``orig_size``. Padding sits
at the right / bottom only, so there is no offset to subtract. COCO results carry ``xywh`` boxes in
original pixels and the ORIGINAL ``category_id`` (``categories[label]["id"]``), never a label index
or a normalised box.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from dinotune.ops import box_ops

__all__ = ["PostProcess", "to_coco_results"]


class PostProcess(nn.Module):
    """Top-k over all ``queries x classes`` sigmoid scores (as Deformable DETR), boxes to pixels.

    Args:
        topk: detections kept per image before thresholding (clamped to ``Q * K``).
        score_threshold: then keep those with ``score >= score_threshold`` (0.0 keeps all
            ``topk``, which is what COCO mAP wants).
        canvas_size: ``S``; may instead be given to ``forward``, which wins when both are.
    """

    def __init__(self, topk: int, score_threshold: float, canvas_size: int | None = None):
        super().__init__()
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.topk = int(topk)
        self.score_threshold = float(score_threshold)
        self.canvas_size = canvas_size

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], scales: Tensor, orig_sizes: Tensor,
                canvas_size: int | None = None) -> list[dict[str, Tensor]]:
        """``outputs`` (``pred_logits`` B x Q x K, ``pred_boxes`` B x Q x 4), ``scales`` B (canvas
        pixels per original pixel), ``orig_sizes`` B x 2 ``(h, w)`` -> per image ``{"scores": K',
        "labels": K' int64 (contiguous), "boxes": K' x 4 xyxy original pixels}``, best first."""
        size = canvas_size if canvas_size is not None else self.canvas_size
        if size is None:
            raise ValueError("PostProcess needs canvas_size (the padded canvas side S), in __init__ or forward")
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        b, q, k = logits.shape
        scales = torch.as_tensor(scales, dtype=torch.float32, device=boxes.device).reshape(b)
        orig_sizes = torch.as_tensor(orig_sizes, device=boxes.device).reshape(b, 2).float()

        prob = logits.float().sigmoid().reshape(b, q * k)
        scores, index = prob.topk(min(self.topk, q * k), dim=1)  # sorted, best first
        labels = index % k
        query = index // k
        picked = boxes.float().gather(1, query[..., None].expand(-1, -1, 4))  # B x k' x 4
        xyxy = box_ops.denormalize(box_ops.cxcywh_to_xyxy(picked.reshape(-1, 4)).reshape(picked.shape),
                                   float(size), float(size))
        xyxy = xyxy / scales[:, None, None]

        results = []
        for i in range(b):
            h, w = float(orig_sizes[i, 0]), float(orig_sizes[i, 1])
            keep = scores[i] >= self.score_threshold
            results.append({
                "scores": scores[i][keep],
                "labels": labels[i][keep].to(torch.int64),
                "boxes": box_ops.clip(xyxy[i][keep], w, h),
            })
        return results


def to_coco_results(detections: Sequence[dict[str, Tensor]], image_ids: Sequence[int] | Tensor,
                    categories: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-image detections (from ``PostProcess``) -> COCO result dicts ``{"image_id",
    "category_id" (original id), "bbox" [x, y, w, h] original pixels rounded to 2 decimals,
    "score"}``.

    Raises:
        ValueError: ``detections`` and ``image_ids`` differ in length, or a label has no category.
    """
    image_ids = [int(i) for i in image_ids]
    if len(image_ids) != len(detections):
        raise ValueError(f"{len(detections)} detections but {len(image_ids)} image ids")
    cat_ids = [int(c["id"]) for c in categories]
    out: list[dict[str, Any]] = []
    for image_id, det in zip(image_ids, detections):
        labels = det["labels"].tolist()
        if labels and (min(labels) < 0 or max(labels) >= len(cat_ids)):
            raise ValueError(f"labels must lie in [0, {len(cat_ids)}) (one per category), got {labels}")
        xywh = box_ops.xyxy_to_xywh(det["boxes"].detach().to("cpu", torch.float64)).tolist()
        for label, box, score in zip(labels, xywh, det["scores"].tolist()):
            out.append({
                "image_id": image_id,
                "category_id": cat_ids[label],
                "bbox": [round(v, 2) for v in box],
                "score": float(score),
            })
    return out
