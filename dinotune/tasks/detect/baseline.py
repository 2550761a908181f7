"""``--baseline``: a plain torchvision Faster R-CNN (ResNet-50 FPN v2 or MobileNet-v3 FPN) trained by
the same engine on the same data as the DINOv2 detectors, to compare against (the LoRA ViT
project's Detectron2 baseline).

The engine trains ``.backbone`` + ``.head`` models; here the whole torchvision detector is the head
(always trained, saved in ``head.safetensors``) and ``.backbone`` is the frozen, never-run
``random:tiny`` placeholder the config names (``BASELINE_PLACEHOLDER``), so checkpoints, the
fingerprint and adapters (``none``) keep working unchanged. The torchvision detector's own
transform is bypassed as for the DINOv2 head (dinotune's pipeline has already resized and
normalised the ``S x S`` canvas with ImageNet statistics, which both backbones expect).

Initial weights (``--baseline-weights``): empty = random; ``DEFAULT`` = torchvision's COCO weights
(downloaded once into torch's cache; the class predictor is replaced for the run's classes); or a
path to a ``.pth`` state dict of the same torchvision model (read with ``weights_only=True``;
tensors whose shapes differ, such as another class count's predictor, are skipped and named).
The builder reads them again when a trained run is loaded (the checkpoint then replaces them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from dinotune.backbone.convert import check_torch_archive
from dinotune.backbone.model import DinoBackbone
from dinotune.errors import ConfigError
from dinotune.models.wrapper import BackboneHead
from dinotune.tasks.detect.fasterrcnn import rcnn_outputs, rcnn_targets
from dinotune.utils import info, warn

BASELINES = ("fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn")


def _torchvision_model(name: str, num_classes: int, top_k: int, score_threshold: float, rpn_batch: int,
                       roi_batch: int) -> nn.Module:
    """The torchvision detector as torchvision builds it untrained (batch norm, every layer
    trainable), whatever weights it then starts from, so a run's architecture never depends on
    whether they could be read. ``num_classes`` includes the background."""
    from torchvision.models import detection

    return getattr(detection, name)(weights=None, weights_backbone=None, num_classes=num_classes,
                                     box_detections_per_img=top_k, box_score_thresh=score_threshold,
                                     rpn_batch_size_per_image=rpn_batch, box_batch_size_per_image=roi_batch)


def _download(name: str) -> dict[str, Tensor]:
    """torchvision's DEFAULT COCO weights of ``name`` (torch's hub cache once downloaded)."""
    from torchvision.models import get_model_weights

    weights = get_model_weights(name).DEFAULT
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError, OSError, HTTP errors: all mean "not downloadable here"
        raise ConfigError(
            f"--baseline-weights DEFAULT: could not download torchvision's {name} weights ({weights.url}): "
            f"{type(exc).__name__}: {exc}. Download them when online (torch caches them in "
            f"{torch.hub.get_dir()}/checkpoints), pass a .pth state dict, or leave --baseline-weights empty "
            "for random weights") from exc


def _read(path: str) -> dict[str, Tensor]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"--baseline-weights {path}: no such file; give a .pth state dict of the torchvision "
                          "model, DEFAULT for torchvision's weights, or nothing for random weights")
    check_torch_archive(file)  # a deflated entry would be inflated in full by torch.load
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors come in many types
        raise ConfigError(f"--baseline-weights {path}: cannot be read as a torch state dict ({exc})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # torchvision reference-script checkpoints
        state = state["model"]
    if not isinstance(state, dict):
        raise ConfigError(f"--baseline-weights {path}: holds a {type(state).__name__}, not a state dict")
    return state


def load_matching(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Copy the tensors of ``state`` whose name and shape match ``model``'s; name what was skipped."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ConfigError(f"--baseline-weights {source}: no tensor matches the model's names and shapes; is it "
                          "a state dict of the same torchvision detector?")
    skipped = sorted(set(state) - set(usable))
    model.load_state_dict(usable, strict=False)
    info(f"baseline weights from {source}: {len(usable)} tensors loaded"
         + (f", {len(skipped)} skipped ({', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''})"
            if skipped else ""))
    if len(usable) < len(own) // 2:
        warn(f"--baseline-weights {source}: only {len(usable)} of the model's {len(own)} tensors were loaded")


class BaselineFasterRCNN(BackboneHead):
    """``.backbone``: the unused placeholder; ``.head``: the torchvision Faster R-CNN. Same
    inputs / outputs as ``DinoFasterRCNN`` (``needs_targets``)."""

    needs_targets = True

    def forward(self, images: Tensor, targets: Sequence[dict[str, Any]] | None = None) -> dict:
        det = self.head
        tv_targets = rcnn_targets(targets, images.shape[-1]) if targets is not None else None
        return rcnn_outputs(det.rpn, det.roi_heads, det.backbone(images), images, tv_targets, self.training)


def build_baseline(placeholder: DinoBackbone, num_classes: int, name: str, weights: str, top_k: int,
                   score_threshold: float, rpn_batch: int = 256, roi_batch: int = 512) -> BaselineFasterRCNN:
    """The ``name`` torchvision detector for ``num_classes`` classes, with ``weights`` (see the
    module docstring); ``top_k`` detections per image scoring at least ``score_threshold``, and
    ``rpn_batch`` / ``roi_batch`` sampled anchors / proposals per image (as the DINOv2 head's)."""
    if name not in BASELINES:
        raise ConfigError(f"--baseline {name!r}: choose {', '.join(BASELINES)}")
    model = _torchvision_model(name, num_classes + 1, top_k, score_threshold, rpn_batch, roi_batch)
    if weights:
        load_matching(model, _download(name) if weights == "DEFAULT" else _read(weights), weights)
    for p in placeholder.parameters():
        p.requires_grad_(False)
    return BaselineFasterRCNN(placeholder, model)
