"""Box maths in one place, used by data loading, the matcher, the loss, metrics and drawing alike.

Formats: ``xyxy`` (x0, y0, x1, y1), ``xywh`` (COCO: x0, y0, width, height) and ``cxcywh``
(centre and size, what DETR-style heads predict, usually normalised to [0, 1] by the image
size). Conversions and IoU / GIoU come from ``torchvision.ops``; this module adds the
normalisation and validity helpers torchvision lacks.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_area, box_convert, box_iou, generalized_box_iou

__all__ = [
    "box_area", "box_iou", "generalized_box_iou", "cxcywh_to_xyxy", "xyxy_to_cxcywh",
    "xyxy_to_xywh", "xywh_to_xyxy", "normalize", "denormalize", "clip", "valid_mask", "pairwise_iou_matched",
]


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    return box_convert(boxes, "xyxy", "cxcywh")


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    return box_convert(boxes, "xyxy", "xywh")


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    return box_convert(boxes, "xywh", "xyxy")


def normalize(boxes: Tensor, width: float, height: float) -> Tensor:
    """Pixel boxes (any 4-number format laid out x, y, x|w, y|h) divided by the image size."""
    scale = boxes.new_tensor([width, height, width, height])
    return boxes / scale


def denormalize(boxes: Tensor, width: float | Tensor, height: float | Tensor) -> Tensor:
    """Normalised boxes back to pixels; ``width`` / ``height`` may be ``B`` tensors for ``B x N x 4``."""
    if isinstance(width, Tensor) and width.ndim == 1:
        scale = torch.stack([width, height, width, height], dim=-1).to(boxes)[:, None, :]
    else:
        scale = boxes.new_tensor([width, height, width, height])
    return boxes * scale


def clip(boxes_xyxy: Tensor, width: float, height: float) -> Tensor:
    """Clamp ``xyxy`` boxes into the ``width x height`` image."""
    x = boxes_xyxy[..., 0::2].clamp(0, width)
    y = boxes_xyxy[..., 1::2].clamp(0, height)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def valid_mask(boxes_xyxy: Tensor, min_size: float = 1e-3) -> Tensor:
    """``N`` bools: boxes with positive width and height (after clipping, degenerate ones are not)."""
    return (boxes_xyxy[:, 2] - boxes_xyxy[:, 0] > min_size) & (boxes_xyxy[:, 3] - boxes_xyxy[:, 1] > min_size)


def pairwise_iou_matched(a_xyxy: Tensor, b_xyxy: Tensor) -> Tensor:
    """IoU of ``a[i]`` with ``b[i]`` (``N`` values), by areas and intersections, not by masks."""
    lt = torch.maximum(a_xyxy[:, :2], b_xyxy[:, :2])
    rb = torch.minimum(a_xyxy[:, 2:], b_xyxy[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    union = box_area(a_xyxy) + box_area(b_xyxy) - inter
    return inter / union.clamp(min=1e-12)
