"""The backbone families dinotune fine-tunes, and ``family_for``: the family of a model or model type.

Adding a family (a future DINOv4): one file here with a ``BackboneFamily`` subclass (where its
blocks, embeddings, patch convolution and final norm live; its learned tokens; position embeddings
for export; its transformers classifier; its input statistics) and one entry in ``FAMILIES``; its
sizes and hub ids go to ``backbone/registry.py``.
"""

from __future__ import annotations

from typing import Any

from dinotune.backbone.families.base import BackboneFamily, HFClassifier, hf_model_of
from dinotune.backbone.families.dinov2 import DINOV2
from dinotune.backbone.families.dinov3 import DINOV3
from dinotune.errors import BackboneLoadError

FAMILIES: tuple[BackboneFamily, ...] = (DINOV2, DINOV3)
_BY_MODEL_TYPE: dict[str, BackboneFamily] = {t: f for f in FAMILIES for t in f.model_types}
MODEL_TYPES: tuple[str, ...] = tuple(_BY_MODEL_TYPE)


def model_type_of(model: Any) -> str:
    """The transformers ``model_type`` of a model type, a config, or a model (transformers, PEFT
    or ``DinoBackbone``: each exposes its ``config``)."""
    if isinstance(model, str):
        return model
    config = model if hasattr(model, "model_type") else getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str):
        raise TypeError(f"{type(model).__name__} has no transformers model_type (neither a config nor a model)")
    return model_type


def family_for(model: Any) -> BackboneFamily:
    """The family of ``model``: a transformers ``model_type`` (``"dinov3_vit"``), a config, or a model
    (transformers, PEFT-wrapped or a ``DinoBackbone``). An unknown type raises BackboneLoadError
    naming the families and their types."""
    model_type = model_type_of(model)
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None:
        names = " or ".join(f.display_name for f in FAMILIES)
        known = "; ".join(f"{f.display_name}: {', '.join(f.model_types)}" for f in FAMILIES)
        raise BackboneLoadError(f"a {model_type!r} model, not {names} (model types {known})")
    return family


__all__ = ["DINOV2", "DINOV3", "FAMILIES", "MODEL_TYPES", "BackboneFamily", "HFClassifier", "family_for",
           "hf_model_of", "model_type_of"]
