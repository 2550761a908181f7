"""``ExportGraph``: a trained model plus the tensor part of its task's post-processing, with tensor
inputs and outputs only, as ``dinotune export`` writes it (ONNX, TorchScript).

Each task builds its own (``tasks/<name>/export.py``), reusing the post-processing module its
evaluation runs (as detr's ``PostProcess`` serves evaluation and export alike), so the deployed
graph and the evaluated model cannot drift apart. The exporter asks a graph only what this class
declares: its input and output names (the batch axis of each is dynamic), example inputs, and the
settings the task's ``RuntimeTask`` applies after it.

Every graph takes ``images``: ``B x C x S x S`` float32, already normalised (the runtime resizes and
normalises in numpy, as the run's evaluation transform does), and returns float32 tensors (an
fp16 graph casts inside, so its inputs and outputs keep their types).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class ExportGraph(nn.Module):
    """Base of the task graphs.

    Args:
        model: the trained model (adapters merged), in eval mode.
        postprocess: what the runtime needs after the graph (``dinotune_export.json``'s
            ``postprocess``: the run's inference section and task-specific settings).
    """

    input_names: ClassVar[tuple[str, ...]] = ("images",)
    output_names: ClassVar[tuple[str, ...]]

    def __init__(self, model: nn.Module, postprocess: dict[str, Any]):
        super().__init__()
        self.model = model
        self.postprocess = dict(postprocess)

    @property
    def dtype(self) -> torch.dtype:
        """The model's parameter dtype (inputs are cast to it inside the graph)."""
        return next(self.model.parameters()).dtype

    def example_inputs(self, channels: int, size: int, batch: int = 2) -> tuple[Tensor, ...]:
        """A random normalised batch of ``batch`` ``channels x size x size`` images, one tensor per
        input name. Two images by default, not one: an exporter may take a batch of 1 for a constant."""
        g = torch.Generator().manual_seed(0)
        return (torch.randn(batch, channels, size, size, generator=g),)
