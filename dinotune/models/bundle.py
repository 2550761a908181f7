"""``ModelBundle``: what a task's ``build_model`` returns, as DETR's ``build`` returns
``(model, criterion, postprocessors)``. The engine trains ``model`` with the task's step (which
uses ``criterion``); evaluation and prediction read the rest. Nothing is kept on the task."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn


@dataclass
class ModelBundle:
    """A built model and everything that interprets its outputs.

    Attributes:
        model: a ``BackboneHead`` (``.backbone`` + ``.head``).
        criterion: ``(outputs, targets, ...) -> {"loss": scalar, ...}`` (task-specific signature).
        postprocess: raw outputs -> predictions in the data's own terms (boxes in original pixels,
            ...), or None where the task needs none.
        class_names: ``K`` names in label order.
        categories: detection / COCO-mask datasets: ``[{"id", "name"}]`` in label order.
        find_unused_parameters: DDP must look for parameters that get no gradient (a head whose
            outputs an option leaves out of the loss, e.g. DETR without auxiliary losses).
    """

    model: nn.Module
    criterion: Callable[..., dict[str, Any]]
    postprocess: Callable[..., Any] | None
    class_names: list[str]
    categories: list[dict[str, Any]] | None = None
    find_unused_parameters: bool = False
