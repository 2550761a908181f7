"""``none``: the backbone stays frozen and only the head trains (a linear or MLP probe)."""

from __future__ import annotations

from torch import nn

from dinotune.adapters.base import Adapter
from dinotune.backbone.model import DinoBackbone
from dinotune.config import AdapterConfig


class FrozenAdapter(Adapter):
    """No adapter: every backbone weight, a widened patch embedding included, stays as loaded (the
    widened layer starts from the pretrained kernels, so features may be cached)."""

    kind = "none"
    trains_backbone = False
    uses_peft = False
    weight_files = ()

    def apply(self, backbone: DinoBackbone, cfg: AdapterConfig) -> None:
        backbone.requires_grad_(False)

    def trainable(self, backbone: DinoBackbone) -> list[tuple[str, nn.Parameter]]:
        return []
