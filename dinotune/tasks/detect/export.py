"""The exported detector (``dinotune export``): ``(images, orig_sizes) -> (scores, labels, boxes)``.

The graph is the model followed by the tensor part of the post-processing evaluation runs
(``PostProcess.dense`` for the DETR-style head, ``SingleObjectPostProcess.dense`` for the
single-object heads): inputs ``images`` ``B x C x S x S`` and ``orig_sizes`` ``B x 2`` float32
``(h, w)`` of the original images; outputs ``scores`` ``B x k``, ``labels`` ``B x k`` int64 (class
indices), ``boxes`` ``B x k x 4`` ``xyxy`` in original pixels, clipped, best first. ``k`` is the
run's ``top_k`` (at most queries x classes) for DETR, 1 for the single-object heads. The score
threshold is left to the runtime (it would make ``k`` data-dependent): ``postprocess["min_score"]``
is the run's own, ``top_k`` the graph's ``k``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from dinotune.errors import ExportError
from dinotune.models.graph import ExportGraph


class DetectGraph(ExportGraph):
    """``(images, orig_sizes) -> (scores, labels, boxes)`` of a detector whose post-processing has
    a ``dense(outputs, orig_sizes)`` tensor part."""

    input_names = ("images", "orig_sizes")
    output_names = ("scores", "labels", "boxes")

    def __init__(self, model: nn.Module, post: nn.Module, canvas_size: int, postprocess: dict[str, Any]):
        super().__init__(model, postprocess)
        self.post = post
        self.canvas_size = int(canvas_size)

    def forward(self, images: Tensor, orig_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model(images.to(self.dtype))
        return self.post.dense({k: v.float() for k, v in out.items() if torch.is_tensor(v)}, orig_sizes.float(),
                               canvas_size=self.canvas_size)

    def example_inputs(self, channels: int, size: int, batch: int = 2) -> tuple[Tensor, ...]:
        """Images, and original sizes of both orientations (landscape and portrait)."""
        (images,) = super().example_inputs(channels, size, batch)
        sizes = torch.tensor([[size * 0.75, size], [size * 2.0, size * 1.5]] * batch, dtype=torch.float32)[:batch]
        return images, sizes


def build_graph(model: nn.Module, post: Any, cfg: Any, num_classes: int, image_size: int) -> DetectGraph:
    """The graph at ``image_size`` (the canvas side ``S``) of a detector trained with ``cfg`` whose
    evaluation post-processing is ``post``."""
    inf = cfg.inference
    if not hasattr(post, "dense"):  # Faster R-CNN: proposals, NMS and per-image loops
        raise ExportError("--head fasterrcnn runs (and --baseline runs) cannot be exported yet: use "
                          "`dinotune predict` / `dinotune serve` on the run folder")
    settings = {"head": cfg.model.head, "score_threshold": inf.score_threshold, "draw_threshold": inf.draw_threshold,
                "category_ids": inf.category_ids, "batch_size": inf.batch_size}
    if hasattr(post, "topk"):  # the DETR head's top-k over queries x classes, and its own threshold
        settings.update(top_k=min(post.topk, cfg.model.num_queries * num_classes), min_score=inf.score_threshold)
    else:  # single-object heads: one detection per image
        settings.update(top_k=1, min_score=0.0)
    return DetectGraph(model, post, image_size, settings)
