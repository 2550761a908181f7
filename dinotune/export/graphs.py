"""The modules that are exported: a loaded run's model plus the part of its post-processing that is a
tensor computation, with tensor inputs and outputs only and a dynamic batch.

Every graph takes ``images``: ``B x C x S x S`` float32, already normalised (the runtime does the
resizing and normalisation in numpy, as the run's evaluation transform does), and returns float32
(an fp16 graph casts inside, so its inputs and outputs keep the same types).

- classification: ``logits`` ``B x K``.
- detection: ``orig_sizes`` ``B x 2`` float32 ``(h, w)`` of the original images as a second input;
  ``scores`` ``B x k``, ``labels`` ``B x k`` int64 (contiguous class indices), ``boxes`` ``B x k x 4``
  ``xyxy`` in original pixels, clipped to the image, best first. ``k`` is the run's
  ``inference.top_k`` (clamped to queries x classes) for the DETR head, 1 for the single-object
  heads. The score threshold is left to the caller (it would make ``k`` data-dependent).
- segmentation: ``logits`` ``B x K x S/s x S/s`` at the decoder's output stride ``s`` (the patch
  size for ``linear``, a quarter of it for a 4-level ``fpn``); the caller resizes them to the label
  size (bilinear, ``align_corners=False``) exactly as ``tasks/segment/inference.py`` does, so a
  label map equals the one PyTorch gives, whole-image or sliding-window.

DINOv2 interpolates its learned position table to the patch grid at every forward (bicubic);
``fixed_position_embeddings`` computes it once for the export size and hands the constant to the
graph, so no bicubic ``Resize`` is left in it. DINOv3's RoPE has no table to interpolate.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

from dinotune.backbone.model import DinoBackbone
from dinotune.ops import box_ops


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


class ClassifyGraph(nn.Module):
    """``images B x C x S x S -> logits B x K`` of a ``Classifier``."""

    output_names = ("logits",)

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images=images.to(_model_dtype(self.model))).float()


class DetrGraph(nn.Module):
    """``(images, orig_sizes) -> (scores, labels, boxes)`` of a ``DinoDetr``: ``PostProcess`` without
    its score threshold: top-``k`` over queries x classes of the sigmoid scores, the boxes of the
    picked queries from the ``S x S`` canvas back to original pixels (the canvas holds the image
    resized so its longer side is ``S``, padded right / bottom), clipped.

    Args:
        model: the detector.
        topk: detections per image (at most queries x classes).
        canvas_size: ``S``.
    """

    output_names = ("scores", "labels", "boxes")

    def __init__(self, model: nn.Module, topk: int, canvas_size: int):
        super().__init__()
        self.model = model
        self.topk = int(topk)
        self.canvas_size = float(canvas_size)

    def forward(self, images: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model(images.to(_model_dtype(self.model)))
        logits, boxes = out["pred_logits"].float(), out["pred_boxes"].float()
        k = logits.shape[-1]
        scores, index = logits.sigmoid().flatten(1).topk(self.topk, dim=1)  # sorted, best first
        labels = index % k
        picked = boxes.gather(1, (index // k).unsqueeze(-1).expand(-1, -1, 4))
        return scores, labels, _to_original(picked, orig_sizes, self.canvas_size)


class SingleObjectGraph(nn.Module):
    """``(images, orig_sizes) -> (scores, labels, boxes)`` of a ``SingleObjectDetector``, as
    ``SingleObjectPostProcess``: the arg-max class, its softmax score and the box, one per image
    (``k = 1``)."""

    output_names = ("scores", "labels", "boxes")

    def __init__(self, model: nn.Module, canvas_size: int):
        super().__init__()
        self.model = model
        self.canvas_size = float(canvas_size)

    def forward(self, images: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model(images.to(_model_dtype(self.model)))
        scores, labels = out["logits"].float().softmax(-1).max(-1)
        boxes = out["box"].float().clamp(0, 1).unsqueeze(1)
        return scores.unsqueeze(1), labels.unsqueeze(1), _to_original(boxes, orig_sizes, self.canvas_size)


def _to_original(boxes_cxcywh: Tensor, orig_sizes: Tensor, canvas_size: float) -> Tensor:
    """``B x k x 4`` normalised ``cxcywh`` on the canvas -> ``xyxy`` original pixels, clipped.
    The canvas holds the image scaled by ``S / max(h, w)`` (``detect/transforms.resize_pad``)."""
    xyxy = box_ops.cxcywh_to_xyxy(boxes_cxcywh) * canvas_size
    sizes = orig_sizes.float()
    xyxy = xyxy * (sizes.max(dim=1).values / canvas_size)[:, None, None]
    h, w = sizes[:, 0, None], sizes[:, 1, None]
    x0, y0, x1, y1 = xyxy.unbind(-1)
    zero = torch.zeros_like(x0)
    return torch.stack([torch.minimum(torch.maximum(x0, zero), w), torch.minimum(torch.maximum(y0, zero), h),
                        torch.minimum(torch.maximum(x1, zero), w), torch.minimum(torch.maximum(y1, zero), h)], -1)


class SegmentGraph(nn.Module):
    """``images B x C x S x S -> logits B x K x S/s x S/s`` of a ``Segmenter`` (stride ``s``)."""

    output_names = ("logits",)

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images.to(_model_dtype(self.model))).float()


@contextlib.contextmanager
def fixed_position_embeddings(backbone: DinoBackbone, height: int, width: int) -> Iterator[None]:
    """Within the block, DINOv2's position embeddings are the constant interpolated for
    ``height x width`` inputs (computed here once, exactly as transformers computes it at every
    forward); outside it, the model interpolates as before. DINOv3 (RoPE) is left as it is."""
    embeddings = backbone.hf_model().embeddings
    if not (hasattr(embeddings, "position_embeddings") and hasattr(embeddings, "interpolate_pos_encoding")):
        yield
        return
    p = backbone.patch_size
    dim = embeddings.position_embeddings.shape[-1]
    tokens = torch.zeros(1, 1 + (height // p) * (width // p), dim, dtype=embeddings.position_embeddings.dtype,
                         device=embeddings.position_embeddings.device)
    with torch.no_grad():
        table = embeddings.interpolate_pos_encoding(tokens, height, width).detach().clone()

    def fixed(embedded: Tensor, h: int, w: int) -> Tensor:
        return table.to(embedded.dtype)

    embeddings.interpolate_pos_encoding = fixed  # an instance attribute shadows the method
    try:
        yield
    finally:
        del embeddings.interpolate_pos_encoding
