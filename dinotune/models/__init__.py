"""Model pieces shared by several tasks: the backbone + head wrapper, the feature pyramid and
resampling stages, and losses more than one head uses. Nothing here knows a task."""

from dinotune.models.bundle import ModelBundle
from dinotune.models.wrapper import BackboneHead, backbone_grad_context

__all__ = ["BackboneHead", "ModelBundle", "backbone_grad_context"]
