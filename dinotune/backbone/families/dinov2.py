"""DINOv2, with or without registers (transformers' ``Dinov2Model``, ``Dinov2WithRegistersModel``).

Blocks at ``encoder.layer.N``, the patch convolution at ``embeddings.patch_embeddings.projection``,
the final norm ``layernorm``. The position table is learned for one grid (37 x 37 for the released
models) and resampled (bicubic) to the patch grid at every forward; an export fixes it for one size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import MappingProxyType

import torch
from torch import Tensor, nn

from dinotune.backbone.families.base import BackboneFamily, HFClassifier, hf_model_of


class Dinov2Family(BackboneFamily):
    name = "dinov2"
    display_name = "DINOv2"
    model_types = ("dinov2", "dinov2_with_registers")
    blocks_path = "encoder.layer"
    patch_embedding_path = "embeddings.patch_embeddings.projection"
    final_norm_path = "layernorm"
    no_decay = ("cls_token", "mask_token", "register_tokens", "position_embeddings")
    # Checked in transformers 5.x: both classifiers are one nn.Linear on concat(CLS, mean patch
    # token) of the last layer after the final norm, registers excluded.
    classifiers = MappingProxyType({
        "dinov2": HFClassifier("Dinov2ForImageClassification", "dinov2"),
        "dinov2_with_registers": HFClassifier("Dinov2WithRegistersForImageClassification", "dinov2_with_registers"),
    })

    @contextlib.contextmanager
    def fixed_position_embeddings(self, model: nn.Module, height: int, width: int) -> Iterator[None]:
        """Within the block, the position embeddings of ``model`` (a ``DinoBackbone``, a PEFT or a
        transformers model) are the ``1 x (1 + h * w) x C`` constant transformers interpolates for
        ``height x width`` inputs (computed here once, by transformers' own method); outside it, the
        model interpolates at every forward as before."""
        embeddings = hf_model_of(model).get_submodule(self.embeddings_path)
        table = embeddings.position_embeddings
        patch_h, patch_w = embeddings.patch_embeddings.patch_size
        # interpolate_pos_encoding reads only the token count and width of its first argument
        tokens = torch.zeros(1, 1 + (height // patch_h) * (width // patch_w), table.shape[-1],
                             dtype=table.dtype, device=table.device)
        with torch.no_grad():
            fixed_table = embeddings.interpolate_pos_encoding(tokens, height, width).detach().clone()

        def fixed(embedded: Tensor, h: int, w: int) -> Tensor:
            return fixed_table.to(embedded.dtype)

        embeddings.interpolate_pos_encoding = fixed  # an instance attribute shadows the method
        try:
            yield
        finally:
            del embeddings.interpolate_pos_encoding


DINOV2 = Dinov2Family()
