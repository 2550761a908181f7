"""The exported backbone of a pretraining run (``dinotune export``): ``images B x C x S x S ->
embedding B x D``, the class token after the final norm (what ``dinotune embed`` writes)."""

from __future__ import annotations

from torch import Tensor, nn

from dinotune.models.graph import ExportGraph


class EmbeddingGraph(ExportGraph):
    """``images -> embedding`` of a ``Pretrainer``'s backbone."""

    output_names = ("embedding",)

    def forward(self, images: Tensor) -> Tensor:
        return self.model.backbone(images.to(self.dtype)).cls.float()


def build_graph(model: nn.Module, batch_size: int) -> EmbeddingGraph:
    return EmbeddingGraph(model, {"batch_size": batch_size})
