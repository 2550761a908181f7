"""``Adapter``: what one adapter kind does to the backbone, for training, checkpoints and export.

Each kind (``none``, ``lora``, ``dora``, ``full``) is one object in ``ADAPTERS`` (``table.py``);
callers look it up by ``AdapterConfig.kind`` and never compare kind names themselves.

A patch embedding widened for N-band input (``backbone/channels.py``) is new, so every kind but
``none`` trains it, and every kind whose weight files do not hold the whole backbone saves it beside
them (``input_embedding.safetensors``); that part is shared here.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from safetensors.torch import load_file, save_file
from torch import nn

from dinotune.backbone.channels import (
    INPUT_EMBEDDING_WEIGHTS,
    adapted_embedding,
    input_embedding_state,
    load_input_embedding_state,
)
from dinotune.backbone.model import DinoBackbone
from dinotune.config import AdapterConfig
from dinotune.errors import CheckpointError


class Adapter:
    """One adapter kind. Subclasses set the attributes and implement ``apply`` and ``trainable``;
    ``save_weights`` / ``load_weights`` / ``merge`` default to nothing.

    Attributes:
        kind: its ``AdapterConfig.kind`` (``--adapter``).
        trains_backbone: whether training updates backbone weights (its own adapter weights or all
            of them); False: a head-only probe on a frozen backbone.
        uses_peft: whether it wraps the backbone in a PEFT model (LoRA-style settings such as rank,
            alpha and targets apply only then).
        weight_files: the files a checkpoint holds for it besides the head's (and, for N-band runs,
            ``input_embedding.safetensors`` unless ``saves_backbone``).
        saves_backbone: whether its weight file holds the whole backbone, the widened patch
            embedding included.
    """

    kind: str
    trains_backbone: ClassVar[bool]
    uses_peft: ClassVar[bool]
    weight_files: ClassVar[tuple[str, ...]]
    saves_backbone: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"<adapter {self.kind}>"

    @property
    def merges(self) -> bool:
        """Whether ``merge`` folds it into the base weights (an export of a merged run is plain
        DINOv2 / DINOv3 again): the PEFT kinds."""
        return self.uses_peft

    def apply(self, backbone: DinoBackbone, cfg: AdapterConfig) -> None:
        """Adapt ``backbone`` in place and set ``requires_grad`` on exactly the trainable weights."""
        raise NotImplementedError

    def trainable(self, backbone: DinoBackbone) -> list[tuple[str, nn.Parameter]]:
        """The backbone parameters an optimizer should update (names within ``backbone``)."""
        raise NotImplementedError

    def save_weights(self, backbone: DinoBackbone, folder: Path) -> None:
        """Write this kind's ``weight_files`` into ``folder``."""

    def load_weights(self, backbone: DinoBackbone, folder: Path) -> None:
        """Load what ``save_weights`` wrote onto a backbone already adapted for this kind."""

    def merge(self, backbone: DinoBackbone) -> None:
        """Fold the adapter into the base weights (same outputs, no adapter left)."""

    def save(self, backbone: DinoBackbone, folder: Path) -> None:
        """``save_weights``, and a widened patch embedding (N-band input) beside them unless the
        weight files hold it already."""
        self.save_weights(backbone, folder)
        embedding = input_embedding_state(backbone)
        if embedding and not self.saves_backbone:
            save_file(embedding, str(folder / INPUT_EMBEDDING_WEIGHTS))

    def load(self, backbone: DinoBackbone, folder: Path) -> None:
        """Load what ``save`` wrote onto a backbone already adapted for this kind (and widened to the
        run's bands: ``backbone/channels.py``). A missing or misfit widened embedding raises
        CheckpointError naming the file."""
        self.load_weights(backbone, folder)
        if self.saves_backbone:
            return
        path = folder / INPUT_EMBEDDING_WEIGHTS
        if path.is_file():
            try:
                load_input_embedding_state(backbone, load_file(str(path)), str(path))
            except ValueError as exc:
                raise CheckpointError(str(exc)) from None
        elif adapted_embedding(backbone) is not None:
            raise CheckpointError(f"{path} is missing: the model takes N-band input, and its widened patch "
                                  "embedding is saved there")
