"""The detectors ``--head`` chooses, behind one interface.

Each entry builds, for a backbone and a class count, the three pieces the task uses without
asking which detector it has (as DETR's ``build`` returns model, criterion and postprocessors):

- the model: ``images B x 3 x S x S -> outputs`` (a dict of tensors, possibly nested);
- the criterion: ``(outputs, targets, count_reduce=None) -> {"loss", parts...}``;
- the post-processing: ``(outputs, scales, orig_sizes) -> [{"scores", "labels", "boxes"}]`` per
  image, boxes ``xyxy`` in original pixels, best first;

and names the metric its runs are judged by, and whether it is a single-object detector (one
class and box per image, judged also by the single-object metrics; the others by COCO's alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from dinotune.backbone.model import DinoBackbone
from dinotune.config import DetectConfig
from dinotune.models.bundle import ModelBundle
from dinotune.tasks.detect.baseline import build_baseline
from dinotune.tasks.detect.criterion import SetCriterion
from dinotune.tasks.detect.detr import build_detr
from dinotune.tasks.detect.fasterrcnn import FasterRCNNLoss, FasterRCNNPostProcess, build_fasterrcnn
from dinotune.tasks.detect.matcher import HungarianMatcher
from dinotune.tasks.detect.postprocess import PostProcess
from dinotune.tasks.detect.single import (
    SingleObjectDetector,
    SingleObjectHead,
    SingleObjectLoss,
    SingleObjectPostProcess,
)

__all__ = ["Detector", "DETECTORS", "build_detector"]


@dataclass(frozen=True)
class Detector:
    """A detector kind: the metric that picks its best checkpoint, its builder, and whether it
    predicts one object per image (then its evaluation adds the single-object metrics, which on a
    detector of many objects would read as its accuracy)."""

    monitor: str
    build: Callable[[DinoBackbone, int, DetectConfig, list[str], list[dict]], ModelBundle]
    single_object: bool = False


def _build_detr(backbone: DinoBackbone, num_classes: int, cfg: DetectConfig, names: list[str],
                categories: list[dict]) -> ModelBundle:
    lo, inf = cfg.loss, cfg.inference
    matcher = HungarianMatcher(cost_class=lo.class_weight, cost_bbox=lo.bbox_weight, cost_giou=lo.giou_weight,
                               focal_alpha=lo.focal_alpha, focal_gamma=lo.focal_gamma)
    weights = {"loss_ce": lo.class_weight, "loss_bbox": lo.bbox_weight, "loss_giou": lo.giou_weight}
    criterion = SetCriterion(num_classes, matcher, weights, focal_alpha=lo.focal_alpha,
                             focal_gamma=lo.focal_gamma, aux_loss=lo.aux_loss)
    postprocess = PostProcess(topk=inf.top_k, score_threshold=inf.score_threshold,
                              canvas_size=cfg.backbone.image_size)
    # without auxiliary losses the earlier decoder layers' class / box heads get no gradient
    return ModelBundle(build_detr(backbone, num_classes, cfg.model), criterion.training_losses, postprocess,
                       names, categories, find_unused_parameters=not lo.aux_loss)


def _build_single(backbone: DinoBackbone, num_classes: int, cfg: DetectConfig, names: list[str],
                  categories: list[dict]) -> ModelBundle:
    m, lo = cfg.model, cfg.loss
    head = SingleObjectHead(m.head, backbone.embed_dim, num_classes, m.single_hidden, m.single_dropout)
    criterion = SingleObjectLoss(m.head, box_weight=lo.box_loss_weight, focal_gamma=lo.focal_gamma,
                                 focal_alpha=lo.focal_alpha)
    return ModelBundle(SingleObjectDetector(backbone, head), criterion,
                       SingleObjectPostProcess(cfg.backbone.image_size), names, categories)


def _build_fasterrcnn(backbone: DinoBackbone, num_classes: int, cfg: DetectConfig, names: list[str],
                      categories: list[dict]) -> ModelBundle:
    # the model computes its losses from the targets it is given (see fasterrcnn.py); a --baseline
    # is a whole torchvision Faster R-CNN beside the unused placeholder backbone (see baseline.py)
    m = cfg.model
    model = (build_baseline(backbone, num_classes, m.baseline, m.baseline_weights, cfg.inference.top_k,
                            m.rcnn_score_threshold, m.rcnn_rpn_batch, m.rcnn_roi_batch) if m.baseline != "none"
             else build_fasterrcnn(backbone, num_classes, m, cfg.inference.top_k))
    return ModelBundle(model, FasterRCNNLoss(), FasterRCNNPostProcess(), names, categories)


# single-object runs are judged by mAP@0.5 of each image's one detection against its largest object
DETECTORS: dict[str, Detector] = {
    "detr": Detector("AP", _build_detr),
    "simple": Detector("map50", _build_single, single_object=True),
    "improved": Detector("map50", _build_single, single_object=True),
    "fasterrcnn": Detector("AP", _build_fasterrcnn),
}


def build_detector(cfg: DetectConfig) -> Detector:
    """The detector ``cfg.model.head`` names."""
    try:
        return DETECTORS[cfg.model.head]
    except KeyError:
        raise ValueError(f"unknown detection head {cfg.model.head!r}: choose {', '.join(DETECTORS)}") from None
