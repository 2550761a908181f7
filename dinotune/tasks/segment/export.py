"""The exported segmenter (``dinotune export``): ``images B x C x S x S -> logits B x K x S/s x S/s``
at the decoder's output stride ``s`` (the patch size for ``linear``, a quarter of it for a 4-level
``fpn``).

The runtime (``runtime.py``) resizes the logits to the label size (bilinear, ``align_corners=False``)
exactly as ``inference.py`` does, so a label map equals PyTorch's, whole-image or sliding-window.
``postprocess`` holds ``inference`` (whole / slide), ``slide_stride``, ``output_stride``,
``window_batch``, ``batch_size`` and ``ignore_index``."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from dinotune.models.graph import ExportGraph


class SegmentGraph(ExportGraph):
    """``images -> logits`` of a ``Segmenter``."""

    output_names = ("logits",)

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images.to(self.dtype)).float()


def build_graph(model: nn.Module, cfg: Any, ignore_index: int) -> SegmentGraph:
    """The graph of a segmenter trained with ``cfg`` (labels ``ignore_index`` drawn clear)."""
    post = {"inference": cfg.model.inference, "slide_stride": cfg.model.slide_stride,
            "output_stride": model.output_stride, "window_batch": cfg.inference.window_batch,
            "batch_size": cfg.inference.batch_size, "ignore_index": ignore_index}
    return SegmentGraph(model, post)
