"""The exported instance segmenter: ``(images, orig_sizes) -> (scores, labels, boxes, masks)``.

Detection's graph (``tasks/detect/export.py``) with a fourth output: ``masks`` ``B x k x Hm x Wm``
float32 logits of the top-k detections on the grid covering the ``S x S`` canvas. Bringing them to
the original pixels is numpy (``masks.py``), which the PyTorch path runs too; ``postprocess``
records ``mask_threshold`` beside detection's ``top_k`` and ``min_score``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dinotune.errors import ExportError
from dinotune.tasks.detect.export import DetectGraph


class InstanceGraph(DetectGraph):
    output_names = ("scores", "labels", "boxes", "masks")


def build_graph(model: nn.Module, post: Any, cfg: Any, num_classes: int, image_size: int) -> InstanceGraph:
    """The graph at ``image_size`` of an instance segmenter trained with ``cfg`` (post-processing ``post``)."""
    if not hasattr(post, "dense"):
        raise ExportError("--head maskrcnn runs cannot be exported yet (proposals, NMS and per-image loops): use "
                          "`dinotune predict` / `dinotune serve` on the run folder")
    inf = cfg.inference
    settings = {"head": cfg.model.head, "score_threshold": inf.score_threshold, "draw_threshold": inf.draw_threshold,
                "category_ids": inf.category_ids, "batch_size": inf.batch_size,
                "top_k": min(post.topk, cfg.model.num_queries * num_classes), "min_score": inf.score_threshold,
                "mask_threshold": inf.mask_threshold}
    return InstanceGraph(model, post, image_size, settings)
