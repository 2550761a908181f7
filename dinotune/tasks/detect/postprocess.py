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

__all__ = ["PostProcess", "per_image", "to_coco_results", "to_original"]


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

    # the per-image keys of ``forward``, in the order ``dense`` returns them
    fields: tuple[str, ...] = ("scores", "labels", "boxes")

    def dense(self, outputs: dict[str, Tensor], orig_sizes: Tensor, scales: Tensor | None = None,
              canvas_size: int | None = None) -> tuple[Tensor, ...]:
        """The tensor part, which the exported graph is made of too (``export.py``): ``outputs``
        (``pred_logits`` B x Q x K, ``pred_boxes`` B x Q x 4 normalised ``cxcywh``), ``orig_sizes``
        B x 2 ``(h, w)``, ``scales`` B canvas pixels per original pixel (default ``S / max(h, w)``,
        the factor of ``transforms.resize_pad``) -> ``scores`` B x k', ``labels`` B x k' int64
        (contiguous), ``boxes`` B x k' x 4 ``xyxy`` original pixels clipped to the image, best first
        (``k' = min(topk, Q * K)``), without the score threshold (it would make ``k'`` vary); then
        whatever ``extras`` picks for the same queries."""
        size = canvas_size if canvas_size is not None else self.canvas_size
        if size is None:
            raise ValueError("PostProcess needs canvas_size (the padded canvas side S), in __init__ or forward")
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        b, q, k = logits.shape
        scores, index = logits.sigmoid().reshape(b, q * k).topk(min(self.topk, q * k), dim=1)  # sorted, best first
        query = index // k  # B x k', the query of each pick
        picked = boxes.gather(1, query.unsqueeze(-1).expand(-1, -1, 4))  # B x k' x 4
        return (scores, index % k, to_original(picked, orig_sizes, float(size), scales), *self.extras(outputs, query))

    def extras(self, outputs: dict[str, Tensor], query: Tensor) -> tuple[Tensor, ...]:
        """More per-detection outputs (``B x k' x ...``) for the picked ``query`` indices (``B x k'``),
        after ``fields``' first three: none here (a task built on detection adds its masks)."""
        return ()

    @torch.no_grad()
    def forward(self, outputs: dict[str, Tensor], scales: Tensor, orig_sizes: Tensor,
                canvas_size: int | None = None) -> list[dict[str, Tensor]]:
        """``outputs`` (``pred_logits`` B x Q x K, ``pred_boxes`` B x Q x 4), ``scales`` B (canvas
        pixels per original pixel), ``orig_sizes`` B x 2 ``(h, w)`` -> per image ``{"scores": K',
        "labels": K' int64 (contiguous), "boxes": K' x 4 xyxy original pixels}`` (and the keys of
        ``fields`` beyond them), best first, those scoring at least ``score_threshold``."""
        boxes = outputs["pred_boxes"]
        b = boxes.shape[0]
        scales = torch.as_tensor(scales, dtype=torch.float32, device=boxes.device).reshape(b)
        orig_sizes = torch.as_tensor(orig_sizes, device=boxes.device).reshape(b, 2).float()
        parts = self.dense(outputs, orig_sizes, scales, canvas_size)
        out = []
        for i in range(b):
            keep = parts[0][i] >= self.score_threshold
            det = {name: t[i][keep] for name, t in zip(self.fields, parts)}
            det["labels"] = det["labels"].to(torch.int64)
            out.append(det)
        return out


def to_original(boxes: Tensor, orig_sizes: Tensor, canvas_size: float, scales: Tensor | None = None) -> Tensor:
    """``B x k x 4`` normalised ``cxcywh`` boxes on the ``S x S`` canvas -> ``xyxy`` original pixels
    clipped to each image: times ``S`` (canvas pixels), divided by the image's scale (canvas pixels
    per original pixel; default ``S / max(h, w)``). Padding sits at the right / bottom only, so
    there is no offset to subtract."""
    sizes = orig_sizes.float()
    if scales is None:
        scales = canvas_size / sizes.max(dim=1).values
    xyxy = box_ops.cxcywh_to_xyxy(boxes) * canvas_size / scales[:, None, None]
    h, w = sizes[:, 0, None], sizes[:, 1, None]
    zero = torch.zeros_like(xyxy[..., 0])
    x0, y0, x1, y1 = xyxy.unbind(-1)
    # minimum / maximum rather than clamp with tensor bounds: both export to every ONNX opset
    return torch.stack([torch.minimum(torch.maximum(x0, zero), w), torch.minimum(torch.maximum(y0, zero), h),
                        torch.minimum(torch.maximum(x1, zero), w), torch.minimum(torch.maximum(y1, zero), h)], -1)


def per_image(scores: Tensor, labels: Tensor, boxes: Tensor, threshold: float) -> dict[str, Tensor]:
    """One image's ``{"scores", "labels" (int64), "boxes"}``, those scoring at least ``threshold``."""
    keep = scores >= threshold
    return {"scores": scores[keep], "labels": labels[keep].to(torch.int64), "boxes": boxes[keep]}


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
