"""``--head maskrcnn``: torchvision's Mask R-CNN heads (RPN, box RoI head, mask RoI head) on the
DINOv2 simple feature pyramid: detection's Faster R-CNN (``tasks/detect/fasterrcnn.py``, whose
module docstring says how the canvas, the targets and the losses are handled) with the mask branch
torchvision's ``maskrcnn_resnet50_fpn`` uses.

The mask head predicts a 28 x 28 probability map per detection box; as ``GeneralizedRCNNTransform``
is not used, the maps are pasted here (``paste_masks_in_image``) onto a grid covering the canvas at
half its resolution (a 518-pixel canvas: 259 x 259 per detection) and turned into logits, so the
outputs meet the package contract (``pred_masks``-like logits over the canvas) and the numpy
post-processing of the DETR head applies unchanged.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Sequence

import torch
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.ops import MultiScaleRoIAlign

from dinotune.backbone.model import DinoBackbone
from dinotune.models.bundle import ModelBundle
from dinotune.tasks.detect.fasterrcnn import (
    DinoFasterRCNN,
    FasterRCNNHead,
    FasterRCNNLoss,
    FasterRCNNPostProcess,
    detect_pass,
    rcnn_targets,
    sampling,
)

# Mask R-CNN pools mask features at twice the box head's 7 x 7 (torchvision's maskrcnn_resnet50_fpn)
MASK_ROI_SIZE = 2 * 7
MASK_GRID_FACTOR = 0.5  # the pasted masks' grid side, as a share of the canvas side
_EPS = 1e-6


class MaskRCNNHead(FasterRCNNHead):
    """``FasterRCNNHead`` whose RoI heads also predict masks (torchvision's four-conv mask head and
    its deconvolution predictor, on 14 x 14 RoIAlign features of every pyramid level).

    Outputs: as Faster R-CNN's (``losses`` with ``loss_mask`` added; in eval mode ``boxes``,
    ``scores``, ``labels``), plus in eval mode ``masks`` ``B x N x G x G`` logits over the canvas
    (``G = round(S * MASK_GRID_FACTOR)``, ``-1 / eps``-like where an image has fewer detections).
    """

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int, pyramid_scales: Sequence[float],
                 patch_size: int, anchor_scales: Sequence[float], aspect_ratios: Sequence[float],
                 rpn_batch: int, roi_batch: int, score_threshold: float, detections_per_image: int):
        super().__init__(in_dim, num_classes, hidden_dim, pyramid_scales, patch_size, anchor_scales, aspect_ratios,
                         rpn_batch, roi_batch, score_threshold, detections_per_image)
        self.roi_heads.mask_roi_pool = MultiScaleRoIAlign(self.level_names, output_size=MASK_ROI_SIZE, sampling_ratio=2)
        self.roi_heads.mask_head = MaskRCNNHeads(hidden_dim, [256, 256, 256, 256], 1)
        self.roi_heads.mask_predictor = MaskRCNNPredictor(256, 256, self.num_classes + 1)

    def forward(self, patch_map: Tensor, canvas: Tensor, targets: list[dict[str, Tensor]] | None = None) -> dict:
        features = OrderedDict(zip(self.level_names, self.pyramid(patch_map)))
        b, size = canvas.shape[0], tuple(canvas.shape[-2:])
        images = ImageList(canvas, [size] * b)
        if self.training:
            if targets is None:
                raise ValueError("Mask R-CNN computes its losses in forward: pass the targets in train mode")
            return {"losses": detect_pass(self.rpn, self.roi_heads, images, features, targets)[1]}
        out: dict[str, Any] = {}
        if targets is not None:
            with sampling([self.rpn, self.roi_heads]):
                losses = detect_pass(self.rpn, self.roi_heads, images, features, targets)[1]
            out["losses"] = {k: v.detach().reshape(1).expand(b) for k, v in losses.items()}
        detections = detect_pass(self.rpn, self.roi_heads, images, features, None)[0]
        return {**out, **_padded(detections, canvas)}


def _padded(detections: list[dict[str, Tensor]], canvas: Tensor) -> dict[str, Tensor]:
    """torchvision's per-image detections -> ``boxes`` / ``scores`` / ``labels`` / ``masks``
    batched and padded to the most detections of an image (score ``-1`` marks padding)."""
    b, size = canvas.shape[0], canvas.shape[-1]
    grid = max(1, round(size * MASK_GRID_FACTOR))
    n = max(1, max(len(d["scores"]) for d in detections))
    boxes = canvas.new_zeros(b, n, 4, dtype=torch.float32)
    scores = canvas.new_full((b, n), -1.0, dtype=torch.float32)
    labels = torch.zeros(b, n, dtype=torch.int64, device=canvas.device)
    masks = canvas.new_full((b, n, grid, grid), -20.0, dtype=torch.float32)
    for i, d in enumerate(detections):
        k = len(d["scores"])
        boxes[i, :k], scores[i, :k], labels[i, :k] = d["boxes"].float(), d["scores"].float(), d["labels"] - 1
        if k:
            pasted = paste_masks_in_image(d["masks"].float(), d["boxes"].float() * grid / size, (grid, grid))
            p = pasted[:, 0].clamp(_EPS, 1 - _EPS)
            masks[i, :k] = torch.log(p / (1 - p))
    return {"boxes": boxes, "scores": scores, "labels": labels, "masks": masks}


class DinoMaskRCNN(DinoFasterRCNN):
    """``.backbone`` + ``.head`` (``MaskRCNNHead``); targets gain their canvas ``masks``."""

    def forward(self, images: Tensor, targets: Sequence[dict[str, Any]] | None = None) -> dict:
        size = images.shape[-1]
        patch_map = self.to_head(self.backbone_features(images).patch_map)
        rcnn = None
        if targets is not None:
            rcnn = [{**t, "masks": src["masks"].to(t["boxes"].device)}
                    for t, src in zip(rcnn_targets(targets, size), targets)]
        return self.head(patch_map, images, rcnn)


class MaskRCNNPostProcess(FasterRCNNPostProcess):
    """Eval outputs -> per image Faster R-CNN's ``{"scores", "labels", "boxes"}`` plus ``"masks"``
    ``k x G x G`` logits over the canvas, in the same (best-first) order."""

    @torch.no_grad()
    def __call__(self, outputs: dict, scales: Sequence[float] | Tensor, orig_sizes: Tensor) -> list[dict[str, Tensor]]:
        dets = super().__call__(outputs, scales, orig_sizes)
        for det, scores, masks in zip(dets, outputs["scores"], outputs["masks"]):
            keep = scores >= 0
            det["masks"] = masks[keep][scores[keep].sort(descending=True).indices]  # the boxes' own sort
        return dets


def build_maskrcnn_bundle(backbone: DinoBackbone, num_classes: int, cfg: Any, names: list[str],
                          categories: list[dict]) -> ModelBundle:
    """Mask R-CNN on ``backbone`` with the sizes of ``cfg`` (an ``InstanceConfig``), its loss
    (the sum of the losses torchvision computed in forward) and post-processing."""
    m = cfg.model
    head = MaskRCNNHead(backbone.embed_dim, num_classes, m.hidden_dim, list(m.pyramid_scales), backbone.patch_size,
                        list(m.rcnn_anchor_scales), list(m.rcnn_aspect_ratios), m.rcnn_rpn_batch, m.rcnn_roi_batch,
                        m.rcnn_score_threshold, cfg.inference.top_k)
    return ModelBundle(DinoMaskRCNN(backbone, head), FasterRCNNLoss(), MaskRCNNPostProcess(), names, categories)
