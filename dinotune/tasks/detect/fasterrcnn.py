"""``--head fasterrcnn``: torchvision's Faster R-CNN (region proposal network + RoI heads) on the
DINOv2 patch map, with the simple feature pyramid as its FPN (ViTDet's recipe).

torchvision's detectors compute their losses inside ``forward`` from the targets (the RPN and RoI
heads sample anchors and proposals against the ground truth), so the model here takes the targets
too (``needs_targets``; the task passes them) and returns its losses as outputs; the criterion
only weighs and sums them. ``GeneralizedRCNNTransform`` is not used: dinotune's data pipeline has
already resized, padded and normalised every image to the ``S x S`` canvas (a multiple of the
patch), so the proposal network sees that canvas as the image (``image_sizes = [(S, S)] * B``).

Outputs (a dict, so the task can slice one image out of a batch):

- with targets: ``"losses"`` ``{name: tensor}``; in train mode scalars, in eval mode each a
  ``B`` vector holding the batch's value (torchvision samples proposals over the whole batch, so
  a per-image loss does not exist; the evaluation loss is then the mean of batch losses);
- in eval mode: ``"boxes"`` ``B x N x 4`` xyxy canvas pixels, ``"scores"`` ``B x N`` (``-1`` where
  an image has fewer than ``N`` detections), ``"labels"`` ``B x N`` int64 (0-based class index).

Losses are means over this process's images (torchvision's), not normalised by a box count
averaged over processes as DETR's are: with DDP the gradient is the mean of per-process means,
which is the usual Faster R-CNN behaviour, so ``count_reduce`` is accepted and not used.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign

from dinotune.backbone.model import DinoBackbone
from dinotune.models.pyramid import SimpleFeaturePyramid
from dinotune.models.wrapper import BackboneHead
from dinotune.ops import box_ops

__all__ = ["DinoFasterRCNN", "FasterRCNNHead", "FasterRCNNLoss", "FasterRCNNPostProcess", "rcnn_targets",
           "rcnn_outputs", "anchor_sizes", "build_fasterrcnn", "detect_pass", "sampling"]


def anchor_sizes(strides: Sequence[float], scales: Sequence[float]) -> tuple[tuple[float, ...], ...]:
    """Anchor sides per pyramid level: each of ``scales`` times the level's stride (FPN's rule, an
    anchor 8 strides wide at every level)."""
    return tuple(tuple(float(s * st) for s in scales) for st in strides)


def rcnn_targets(targets: Sequence[dict[str, Any]], size: int) -> list[dict[str, Tensor]]:
    """dinotune targets (``boxes`` cxcywh normalised to the ``S`` canvas, ``labels`` 0-based) ->
    torchvision's (``boxes`` xyxy canvas pixels, ``labels`` 1-based: 0 is background)."""
    out = []
    for t in targets:
        boxes = box_ops.denormalize(box_ops.cxcywh_to_xyxy(t["boxes"].float()), size, size)
        out.append({"boxes": boxes.reshape(-1, 4), "labels": t["labels"].long() + 1})
    return out


@contextlib.contextmanager
def sampling(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Train-mode behaviour of ``modules`` themselves (their losses and proposal sampling), for an
    evaluation loss: only their own ``training`` flag is set, so layers inside them (batch norm
    in torchvision's v2 box head) stay in eval mode. A fixed seed makes the loss reproducible
    and leaves the global random stream untouched."""
    was = [m.training for m in modules]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        try:
            for m in modules:
                m.training = True
            yield
        finally:
            for m, w in zip(modules, was):
                m.training = w


class FasterRCNNHead(nn.Module):
    """Pyramid + RPN + RoI heads: ``B x C x h x w`` patch map -> proposals -> detections / losses.

    Args:
        in_dim: backbone width ``C``.
        num_classes: ``K`` object classes (the box predictor has ``K + 1``, background first).
        hidden_dim: channels of every pyramid level (FPN's 256).
        pyramid_scales: levels as scale factors of the patch map.
        patch_size: the backbone's patch size (the levels' strides).
        anchor_scales: anchor sides in strides of each level; aspect_ratios: their h / w ratios.
        rpn_batch: anchors sampled per image for the RPN loss; roi_batch: proposals per image for
            the box-head loss.
        score_threshold: detections scoring below this are dropped before NMS.
        detections_per_image: detections kept per image.
    """

    def __init__(self, in_dim: int, num_classes: int, hidden_dim: int, pyramid_scales: Sequence[float],
                 patch_size: int, anchor_scales: Sequence[float], aspect_ratios: Sequence[float],
                 rpn_batch: int, roi_batch: int, score_threshold: float, detections_per_image: int):
        super().__init__()
        self.num_classes = num_classes
        self.pyramid = SimpleFeaturePyramid(in_dim, hidden_dim, pyramid_scales, patch_size)
        self.level_names = [str(i) for i in range(len(self.pyramid.scales))]
        sizes = anchor_sizes(self.pyramid.strides, anchor_scales)
        anchors = AnchorGenerator(sizes, (tuple(float(r) for r in aspect_ratios),) * len(sizes))
        # torchvision's FasterRCNN defaults for everything not exposed as an option
        self.rpn = RegionProposalNetwork(
            anchors, RPNHead(hidden_dim, anchors.num_anchors_per_location()[0]),
            fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=rpn_batch, positive_fraction=0.5,
            pre_nms_top_n={"training": 2000, "testing": 1000}, post_nms_top_n={"training": 2000, "testing": 1000},
            nms_thresh=0.7)
        pool = MultiScaleRoIAlign(self.level_names, output_size=7, sampling_ratio=2)
        representation = 1024
        self.roi_heads = RoIHeads(
            pool, TwoMLPHead(hidden_dim * 7 * 7, representation), FastRCNNPredictor(representation, num_classes + 1),
            fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=roi_batch, positive_fraction=0.25,
            bbox_reg_weights=None, score_thresh=score_threshold, nms_thresh=0.5,
            detections_per_img=detections_per_image)

    def forward(self, patch_map: Tensor, canvas: Tensor, targets: list[dict[str, Tensor]] | None = None) -> dict:
        """``patch_map`` ``B x C x h x w``, ``canvas`` the ``B x 3 x S x S`` images (their size),
        ``targets`` torchvision-style -> the outputs (module docstring)."""
        features = OrderedDict(zip(self.level_names, self.pyramid(patch_map)))
        return rcnn_outputs(self.rpn, self.roi_heads, features, canvas, targets, self.training)


def detect_pass(rpn: RegionProposalNetwork, roi_heads: RoIHeads, images: ImageList, features: dict[str, Tensor],
            targets: list[dict[str, Tensor]] | None) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
    """The proposal network then the RoI heads: (per-image detections, losses)."""
    proposals, rpn_losses = rpn(images, features, targets)
    detections, roi_losses = roi_heads(features, proposals, images.image_sizes, targets)
    return detections, {**rpn_losses, **roi_losses}


def rcnn_outputs(rpn: RegionProposalNetwork, roi_heads: RoIHeads, features: dict[str, Tensor], canvas: Tensor,
                 targets: list[dict[str, Tensor]] | None, training: bool) -> dict:
    """torchvision's proposal network and RoI heads on pyramid ``features`` of the ``B x 3 x S x S``
    ``canvas`` (taken as the image: no resizing, no offset) -> the outputs (module docstring)."""
    b, size = canvas.shape[0], tuple(canvas.shape[-2:])
    images = ImageList(canvas, [size] * b)
    if training:
        if targets is None:
            raise ValueError("Faster R-CNN computes its losses in forward: pass the targets in train mode")
        return {"losses": detect_pass(rpn, roi_heads, images, features, targets)[1]}
    out: dict[str, Any] = {}
    if targets is not None:
        with sampling([rpn, roi_heads]):
            losses = detect_pass(rpn, roi_heads, images, features, targets)[1]
        out["losses"] = {k: v.detach().reshape(1).expand(b) for k, v in losses.items()}
    detections = detect_pass(rpn, roi_heads, images, features, None)[0]
    n = max(1, max(len(d["scores"]) for d in detections))
    boxes = canvas.new_zeros(b, n, 4, dtype=torch.float32)
    scores = canvas.new_full((b, n), -1.0, dtype=torch.float32)
    labels = torch.zeros(b, n, dtype=torch.int64, device=canvas.device)
    for i, d in enumerate(detections):
        k = len(d["scores"])
        boxes[i, :k], scores[i, :k], labels[i, :k] = d["boxes"].float(), d["scores"].float(), d["labels"] - 1
    return {**out, "boxes": boxes, "scores": scores, "labels": labels}


class DinoFasterRCNN(BackboneHead):
    """``.backbone`` (``DinoBackbone``) + ``.head`` (``FasterRCNNHead``), as the engine expects.

    ``needs_targets``: the task calls ``model(images, targets)`` (dinotune-style targets) whenever
    it has them; prediction calls ``model(images)`` in eval mode."""

    needs_targets = True

    def forward(self, images: Tensor, targets: Sequence[dict[str, Any]] | None = None) -> dict:
        size = images.shape[-1]
        patch_map = self.to_head(self.backbone_features(images).patch_map)
        return self.head(patch_map, images, rcnn_targets(targets, size) if targets is not None else None)


class FasterRCNNLoss:
    """``(outputs, targets, count_reduce=None) -> {"loss", "loss_objectness", "loss_rpn_box_reg",
    "loss_classifier", "loss_box_reg"}``: the weighted sum of the losses the model computed (the
    targets were already used inside it). Eval-mode losses are ``B`` vectors, averaged here."""

    def __init__(self, weights: dict[str, float] | None = None):
        self.weights = dict(weights or {})

    def __call__(self, outputs: dict, targets: Sequence[dict[str, Any]] | None = None,
                 count_reduce: Callable[[float], float] | None = None) -> dict[str, Tensor]:
        if "losses" not in outputs:
            raise ValueError("Faster R-CNN outputs carry no losses: call the model with the targets "
                             "(model(images, targets))")
        parts = {k: v.float().mean() for k, v in outputs["losses"].items()}
        parts["loss"] = sum(self.weights.get(k, 1.0) * v for k, v in parts.items())
        return parts


class FasterRCNNPostProcess:
    """Eval outputs -> per image ``{"scores", "labels" (0-based), "boxes" xyxy original pixels}``,
    best first: canvas pixels divided by ``scale``, clipped to ``orig_size`` (the padding is at
    the right / bottom, so there is no offset)."""

    @torch.no_grad()
    def __call__(self, outputs: dict, scales: Sequence[float] | Tensor, orig_sizes: Tensor) -> list[dict[str, Tensor]]:
        boxes, scores, labels = outputs["boxes"], outputs["scores"], outputs["labels"]
        b = boxes.shape[0]
        scales = torch.as_tensor(scales, dtype=torch.float32, device=boxes.device).reshape(b)
        orig_sizes = torch.as_tensor(orig_sizes, device=boxes.device).reshape(b, 2).float()
        out = []
        for i in range(b):
            keep = scores[i] >= 0
            s, order = scores[i][keep].sort(descending=True)
            bx = boxes[i][keep][order] / scales[i]
            h, w = orig_sizes[i].tolist()
            bx = torch.stack([bx[:, 0].clamp(0, w), bx[:, 1].clamp(0, h), bx[:, 2].clamp(0, w),
                              bx[:, 3].clamp(0, h)], dim=1)
            out.append({"scores": s, "labels": labels[i][keep][order], "boxes": bx})
        return out


def build_fasterrcnn(backbone: DinoBackbone, num_classes: int, cfg: Any, top_k: int) -> DinoFasterRCNN:
    """The Faster R-CNN detector on ``backbone`` with the sizes of ``cfg`` (``DetectModelConfig``)."""
    head = FasterRCNNHead(backbone.embed_dim, num_classes, cfg.hidden_dim, list(cfg.pyramid_scales),
                          backbone.patch_size, list(cfg.rcnn_anchor_scales), list(cfg.rcnn_aspect_ratios),
                          cfg.rcnn_rpn_batch, cfg.rcnn_roi_batch, cfg.rcnn_score_threshold, top_k)
    return DinoFasterRCNN(backbone, head)
