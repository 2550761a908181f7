"""``full``: every backbone weight trains; a checkpoint holds the whole backbone."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from dinotune.adapters.base import Adapter
from dinotune.backbone.model import DinoBackbone
from dinotune.config import AdapterConfig

BACKBONE_WEIGHTS = "backbone.safetensors"


class FullAdapter(Adapter):
    """Full fine-tuning: all backbone parameters but those used only in pre-training (the mask
    token of masked-image modelling, which never gets a gradient here)."""

    kind = "full"
    trains_backbone = True
    uses_peft = False
    weight_files = (BACKBONE_WEIGHTS,)
    saves_backbone = True

    def apply(self, backbone: DinoBackbone, cfg: AdapterConfig) -> None:
        backbone.requires_grad_(True)
        for name, p in self.trainable_and_not(backbone)[1]:
            p.requires_grad_(False)

    def trainable(self, backbone: DinoBackbone) -> list[tuple[str, nn.Parameter]]:
        return self.trainable_and_not(backbone)[0]

    @staticmethod
    def trainable_and_not(backbone: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
        """Every parameter, split into those full fine-tuning trains and the family's pretraining-only
        ones (DINOv2's mask token: no gradient reaches it outside masked pretraining). A module that
        is no ``DinoBackbone`` (no family) trains all of its parameters."""
        family = getattr(backbone, "family", None)
        out: tuple[list, list] = ([], [])
        for name, p in backbone.named_parameters():
            out[int(family is not None and family.is_pretraining_only(name))].append((name, p))
        return out

    def save_weights(self, backbone: DinoBackbone, folder: Path) -> None:
        sd = {k: v.detach().contiguous().cpu() for k, v in backbone.hf_model().state_dict().items()}
        save_file(sd, str(folder / BACKBONE_WEIGHTS))

    def load_weights(self, backbone: DinoBackbone, folder: Path) -> None:
        backbone.hf_model().load_state_dict(load_file(str(folder / BACKBONE_WEIGHTS)), strict=True)
