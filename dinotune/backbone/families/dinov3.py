"""DINOv3 (transformers' ``DINOv3ViTModel``).

Blocks at ``model.layer.N``, the patch convolution at ``embeddings.patch_embeddings``, the final
norm ``norm``. Positions are rotary (RoPE), computed for the grid at hand at every forward: there is
no table to fix for an export (the base class's no-op), and no position table to exempt from weight
decay. transformers has no DINOv3 image-classification class (5.x), so no classifier.

The mean / std are ImageNet's, those of the web-image (LVD-1689M) weights; the satellite (SAT-493M)
weights were pre-trained with other statistics (see their model card), which this default does not cover.
"""

from __future__ import annotations

from dinotune.backbone.families.base import BackboneFamily


class Dinov3Family(BackboneFamily):
    name = "dinov3"
    display_name = "DINOv3"
    model_types = ("dinov3_vit",)
    blocks_path = "model.layer"
    patch_embedding_path = "embeddings.patch_embeddings"
    final_norm_path = "norm"
    no_decay = ("cls_token", "mask_token", "register_tokens")


DINOV3 = Dinov3Family()
