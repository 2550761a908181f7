"""``Classifier``: backbone features -> pooled vector -> head logits."""

from __future__ import annotations

from torch import Tensor, nn

from dinotune.backbone.model import DinoBackbone
from dinotune.models.wrapper import BackboneHead
from dinotune.tasks.classify.heads import Pool, layers_needed, pool_features


class Classifier(BackboneHead):
    def __init__(self, backbone: DinoBackbone, head: nn.Module, pool: Pool):
        super().__init__(backbone, head)
        self.pool = pool

    def features(self, images: Tensor) -> Tensor:
        """``B x 3 x H x W`` normalised images -> ``B x D`` pooled features."""
        return pool_features(self.backbone_features(images, layers_needed(self.pool)), self.pool)

    def forward(self, images: Tensor | None = None, features: Tensor | None = None) -> Tensor:
        """Logits ``B x K`` from images, or from cached ``B x D`` features (backbone skipped)."""
        if features is None:
            if images is None:
                raise ValueError("Classifier needs images or features")
            features = self.features(images)
        return self.head(self.to_head(features))
