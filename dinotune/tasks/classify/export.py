"""The exported classifier (``dinotune export``): ``images B x C x S x S -> logits B x K``.

The runtime (``runtime.py``) takes the softmax and the top-k in numpy."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from dinotune.models.graph import ExportGraph


class ClassifyGraph(ExportGraph):
    """``images -> logits`` of a ``Classifier``."""

    output_names = ("logits",)

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images=images.to(self.dtype)).float()


def build_graph(model: nn.Module, inference: Any) -> ClassifyGraph:
    """The graph of a classifier; the runtime keeps the run's ``top_k`` and ``batch_size``."""
    return ClassifyGraph(model, {"top_k": inference.top_k, "batch_size": inference.batch_size})
