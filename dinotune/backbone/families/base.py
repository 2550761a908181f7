"""``BackboneFamily``: everything dinotune knows about one family of transformers backbones.

A family names the transformers ``model_type``s it covers and says where its pieces live in their
modules: the blocks, the embeddings, the patch-embedding convolution, the final norm, the learned
tokens AdamW must not decay, how position embeddings are fixed for an export size, the transformers
image-classification class (if any) and the input statistics it was pre-trained with. Callers ask the
family (``dinotune.backbone.families.family_for``) and never spell a module path themselves, so a new
family is one file here plus one entry in ``FAMILIES``.

Names are matched wherever they sit: on the transformers model (``encoder.layer.3.mlp.fc1.weight``),
inside a ``DinoBackbone`` (``model.encoder.layer.3...``) or under PEFT's wrapper
(``base_model.model.encoder.layer.3.attention.q_proj.lora_A.default.weight``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from contextlib import AbstractContextManager
from types import MappingProxyType
from typing import ClassVar, NamedTuple

from torch import nn

# the ImageNet statistics both DINOv2 and DINOv3 (web images) were pre-trained with; one copy, read
# by the torch-free input description too
from dinotune.data.input_spec import IMAGENET_MEAN, IMAGENET_STD


class HFClassifier(NamedTuple):
    """A transformers image-classification class whose classifier reads concat(CLS, mean patch
    token) as dinotune's ``cls_mean`` pool does: its ``class_name`` in ``transformers`` and the
    ``base_attribute`` that holds its backbone model (``Dinov2ForImageClassification.dinov2``)."""

    class_name: str
    base_attribute: str


def hf_model_of(model: nn.Module) -> nn.Module:
    """The transformers model under a ``DinoBackbone`` and / or a PEFT wrapper (or ``model`` itself)."""
    if hasattr(model, "hf_model"):  # a DinoBackbone
        return model.hf_model()
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _name_pattern(path: str, numbered: bool) -> re.Pattern[str]:
    """``path`` (dotted) as a whole-component match anywhere in a dotted name; ``numbered``: followed
    by a block index, captured as group 1."""
    index = r"\.(\d+)(?:\.|$)" if numbered else r"(?:\.|$)"
    return re.compile(r"(?:^|\.)" + re.escape(path) + index)


class BackboneFamily:
    """One backbone family; subclasses set the class attributes below and override what differs.

    Attributes:
        name: short name, as in run folders and messages (``"dinov2"``).
        display_name: as users read it (``"DINOv2"``).
        model_types: the transformers ``config.model_type``s of the family.
        blocks_path: the ``nn.ModuleList`` of transformer blocks in the transformers model.
        embeddings_path: the module holding the patch embedding and the learned tokens.
        patch_embedding_path: the patch-embedding ``nn.Conv2d``.
        final_norm_path: the norm after the last block.
        no_decay: leaf names of learned tokens and position tables: parameters, but not weights
            AdamW should shrink.
        pretraining_only: leaf names of parameters only pre-training uses (the mask token of
            masked-image modelling): they never get a gradient when fine-tuning.
        classifiers: ``model_type`` -> its transformers image classifier (types without one absent).
        mean, std: the per-channel input statistics of the pre-training (RGB).
    """

    name: ClassVar[str]
    display_name: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    blocks_path: ClassVar[str]
    embeddings_path: ClassVar[str] = "embeddings"
    patch_embedding_path: ClassVar[str]
    final_norm_path: ClassVar[str]
    no_decay: ClassVar[tuple[str, ...]]
    pretraining_only: ClassVar[tuple[str, ...]] = ("mask_token",)
    classifiers: ClassVar[Mapping[str, HFClassifier]] = MappingProxyType({})
    mean: ClassVar[tuple[float, float, float]] = IMAGENET_MEAN
    std: ClassVar[tuple[float, float, float]] = IMAGENET_STD

    def __init__(self) -> None:
        self._block = _name_pattern(self.blocks_path, numbered=True)
        self._embeddings = _name_pattern(self.embeddings_path, numbered=False)

    # ---------------------------------------------------------------------------- identity
    def __repr__(self) -> str:
        return f"<backbone family {self.name}: {', '.join(self.model_types)}>"

    def __str__(self) -> str:
        return self.name

    def __eq__(self, other: object) -> bool:
        # equal to its name too, as ``backbone.family == "dinov3"`` reads (and read before families
        # were objects)
        if isinstance(other, str):
            return other == self.name
        return isinstance(other, BackboneFamily) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __copy__(self) -> BackboneFamily:
        return self  # stateless: a copied model keeps the one instance

    def __deepcopy__(self, memo: dict) -> BackboneFamily:
        return self

    # ------------------------------------------------------------------------------ names
    def block_index(self, name: str) -> int | None:
        """The 0-based block a parameter or module ``name`` belongs to (the block itself included),
        None outside the blocks."""
        match = self._block.search(name)
        return int(match.group(1)) if match else None

    def in_embeddings(self, name: str) -> bool:
        """Whether parameter or module ``name`` is part of the embeddings (patch embedding, class /
        register / mask tokens, position table)."""
        return self._embeddings.search(name) is not None

    def local_name(self, name: str) -> str | None:
        """``name`` after its block or embeddings prefix (``attention.q_proj.lora_A.default.weight``,
        ``cls_token``), None outside both."""
        for pattern in (self._block, self._embeddings):
            match = pattern.search(name)
            if match:
                return name[match.end():]
        return None

    def is_no_decay(self, name: str) -> bool:
        """Whether parameter ``name`` is a learned token or position table (see ``no_decay``)."""
        return name.rsplit(".", 1)[-1] in self.no_decay

    def is_pretraining_only(self, name: str) -> bool:
        """Whether parameter ``name`` is used in pre-training only (see ``pretraining_only``)."""
        return name.rsplit(".", 1)[-1] in self.pretraining_only

    # ---------------------------------------------------------------------------- modules
    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The transformer blocks of ``model`` (a ``DinoBackbone``, a PEFT or a transformers model),
        shallow to deep."""
        return list(hf_model_of(model).get_submodule(self.blocks_path))

    def patch_embedding(self, model: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
        """``(parent, attribute, conv)``: where the patch-embedding convolution of ``model`` (a
        ``DinoBackbone``, a PEFT or a transformers model) lives, so it can be read or replaced.
        Raises TypeError when there is no convolution there."""
        hf = hf_model_of(model)
        parent_path, _, attribute = self.patch_embedding_path.rpartition(".")
        try:
            parent = hf.get_submodule(parent_path)
        except AttributeError:
            parent = None
        conv = getattr(parent, attribute, None)
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{type(hf).__name__}: no patch-embedding convolution at {self.patch_embedding_path} "
                            f"(expected of a {self.display_name} model)")
        return parent, attribute, conv

    def final_norm(self, model: nn.Module) -> nn.Module:
        """The norm after the last block of ``model`` (a ``DinoBackbone``, a PEFT or a transformers model)."""
        return hf_model_of(model).get_submodule(self.final_norm_path)

    def fixed_position_embeddings(self, model: nn.Module, height: int, width: int) -> AbstractContextManager[None]:
        """A context within which ``model``'s position embeddings are constants for ``height x width``
        inputs (no resampling left in an exported graph); outside it the model is as before. Families
        without a position table to resample have nothing to fix: this default does nothing."""
        return contextlib.nullcontext()

    # ---------------------------------------------------------------------- transformers
    def classifier(self, model_type: str) -> HFClassifier | None:
        """The transformers image classifier of ``model_type``, None when transformers has none that
        reads the features as dinotune's heads do."""
        return self.classifiers.get(model_type)
