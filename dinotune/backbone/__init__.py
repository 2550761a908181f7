"""DINOv2 / DINOv3 backbones: loading (hub, local folder, official .pth, random) and features for heads."""

from dinotune.backbone.families import BackboneFamily, family_for
from dinotune.backbone.loading import BackboneLoadError, load_backbone_model, load_dinov2
from dinotune.backbone.model import DinoBackbone, Features, final_norm, patch_embedding, to_map

__all__ = ["BackboneFamily", "BackboneLoadError", "DinoBackbone", "Features", "family_for", "final_norm", "load_backbone_model", "load_dinov2",
           "patch_embedding", "to_map"]
