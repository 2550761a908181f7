"""DINOv2 backbones: loading (hub, local folder, official .pth, random) and features for heads."""

from dinotune.backbone.loading import BackboneLoadError, load_dinov2
from dinotune.backbone.model import DinoBackbone, Features, to_map

__all__ = ["BackboneLoadError", "DinoBackbone", "Features", "load_dinov2", "to_map"]
