"""The backbone families: architecture sizes, hub ids, patch sizes and Hugging Face configs.

Two families share one interface (``DinoBackbone``):

* DINOv2 (``dinov2`` / ``dinov2_with_registers``): 14-px patches, learned position embeddings
  (interpolated to other grids), registers in the ``-reg4`` variants.
* DINOv3 (``dinov3_vit``): 16-px patches, RoPE (no position table to interpolate), 4 register
  ("storage") tokens in every released size, gated (SwiGLU) MLPs in the ``plus`` and 7B sizes.

This file is the only place a patch size is written as a number; everything else reads it off the
model (``DinoBackbone.patch_size``).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import Dinov2Config, Dinov2WithRegistersConfig, DINOv3ViTConfig, PretrainedConfig

from dinotune.backbone.families import DINOV2, DINOV3, FAMILIES

DINOV2_PATCH_SIZE = 14
DINOV3_PATCH_SIZE = 16
PATCH_SIZE = DINOV2_PATCH_SIZE  # the default of ``make_config`` (DINOv2 configs)

# Which model types make a family is the family's to say (``backbone/families``).
DINOV2_MODEL_TYPES = DINOV2.model_types
DINOV3_MODEL_TYPES = DINOV3.model_types
DINOV3_PREFIX = "dinov3-"  # random:dinov3-<size>


def family_of(model_type: str) -> str | None:
    """``"dinov2"``, ``"dinov3"`` or None for a transformers ``model_type`` (``family_for`` gives the
    family itself, and refuses an unknown type)."""
    family = next((f for f in FAMILIES if model_type in f.model_types), None)
    return family.name if family else None


# ------------------------------------------------------------------------------------- DINOv2
@dataclass(frozen=True)
class Arch:
    hidden_size: int
    num_layers: int
    num_heads: int
    swiglu: bool = False
    image_size: int = 518  # the official checkpoints' position-embedding grid is 37 x 37


ARCHS: dict[str, Arch] = {
    # A few-layer model for tests and CPU demos; not a released DINOv2 size.
    "tiny": Arch(hidden_size=64, num_layers=4, num_heads=4, image_size=224),
    "small": Arch(384, 12, 6),
    "base": Arch(768, 12, 12),
    "large": Arch(1024, 24, 16),
    "giant": Arch(1536, 40, 24, swiglu=True),
}


# ------------------------------------------------------------------------------------- DINOv3
@dataclass(frozen=True)
class Dinov3Arch:
    """A DINOv3 ViT as facebookresearch/dinov3 ``hub/backbones.py`` builds it (LayerNorm eps 1e-5,
    RoPE base 100 with 'separate' coordinate normalisation and training-time rescale 2, the key
    bias masked to zero, LayerScale, 4 storage tokens)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int  # the MLP width; gated: the width of each of gate / up
    gated_mlp: bool = False  # SwiGLU (gate_proj, up_proj, down_proj) instead of GELU (up, down)
    qkv_bias: bool = True  # query and value biases (7B has none)
    num_register_tokens: int = 4


DINOV3_ARCHS: dict[str, Dinov3Arch] = {
    # A few-layer model for tests and CPU demos; not a released DINOv3 size.
    "tiny": Dinov3Arch(64, 4, 4, 256),
    "small": Dinov3Arch(384, 12, 6, 1536),
    "small-plus": Dinov3Arch(384, 12, 6, 1536, gated_mlp=True),  # ffn ratio 6 * 2/3
    "base": Dinov3Arch(768, 12, 12, 3072),
    "large": Dinov3Arch(1024, 24, 16, 4096),
    "huge-plus": Dinov3Arch(1280, 32, 20, 5120, gated_mlp=True),  # ffn ratio 6 * 2/3
    "7b": Dinov3Arch(4096, 40, 32, 8192, gated_mlp=True, qkv_bias=False),  # ffn ratio 3 * 2/3
}


# ------------------------------------------------------------------------------- hub and specs
HUB_FAMILIES: dict[str, list[str]] = {
    "DINOv2": [f"facebook/dinov2-{s}" for s in ("small", "base", "large", "giant")],
    "DINOv2 with registers": [f"facebook/dinov2-with-registers-{s}" for s in ("small", "base", "large", "giant")],
    "DINOv3 LVD-1689M (web images; gated: accept the licence on the model page)": [
        f"facebook/dinov3-{s}-pretrain-lvd1689m"
        for s in ("vits16", "vits16plus", "vitb16", "vitl16", "vith16plus", "vit7b16")
    ],
    "DINOv3 SAT-493M (satellite images; gated)": [
        f"facebook/dinov3-{s}-pretrain-sat493m" for s in ("vitl16", "vit7b16")
    ],
}
HUB_IDS: list[str] = [h for ids in HUB_FAMILIES.values() for h in ids]

# The random: architecture each hub id has (what `dinotune models` describes it with).
HUB_ARCH: dict[str, str] = {
    **{f"facebook/dinov2-{s}": s for s in ("small", "base", "large", "giant")},
    **{f"facebook/dinov2-with-registers-{s}": f"{s}-reg4" for s in ("small", "base", "large", "giant")},
    **{f"facebook/dinov3-{h}-pretrain-{d}": f"{DINOV3_PREFIX}{s}"
       for h, s in (("vits16", "small"), ("vits16plus", "small-plus"), ("vitb16", "base"),
                    ("vitl16", "large"), ("vith16plus", "huge-plus"), ("vit7b16", "7b"))
       for d in ("lvd1689m", "sat493m")},
}

RANDOM_FAMILIES: dict[str, list[str]] = {
    "DINOv2": [f"random:{s}" for s in ARCHS],
    "DINOv2 with registers": [f"random:{s}-reg4" for s in ARCHS],
    "DINOv3": [f"random:{DINOV3_PREFIX}{s}" for s in DINOV3_ARCHS],
}
RANDOM_SPECS: list[str] = [s for specs in RANDOM_FAMILIES.values() for s in specs]


def model_choices_text() -> str:
    return (
        "a hub id (" + ", ".join(HUB_IDS) + "), a local Hugging Face folder (DINOv2 or DINOv3), "
        "an official DINOv2 / DINOv3 .pth checkpoint (e.g. dinov2_vits14_pretrain.pth), or one of "
        + ", ".join(RANDOM_SPECS)
    )


def random_choices_for(spec: str) -> str:
    """``random:{tiny|small|...}`` of the family a hub id or spec belongs to (offline hints)."""
    if "dinov3" in spec.lower():
        return f"random:{DINOV3_PREFIX}{{{'|'.join(DINOV3_ARCHS)}}}"
    return f"random:{{{'|'.join(ARCHS)}}}"


def arch_summary(name: str) -> str:
    """One line describing a ``random:`` architecture (the part after ``random:``)."""
    cfg = arch_config(name)
    if cfg.model_type in DINOV3_MODEL_TYPES:
        mlp = "gated SwiGLU" if cfg.use_gated_mlp else "GELU"
        extra = f"{mlp} MLP {cfg.intermediate_size}, {cfg.num_register_tokens} registers, RoPE"
    else:
        mlp = "SwiGLU" if cfg.use_swiglu_ffn else "GELU"
        regs = getattr(cfg, "num_register_tokens", 0) or 0
        extra = f"{mlp} MLP" + (f", {regs} registers" if regs else "")
    return (f"width {cfg.hidden_size}, {cfg.num_hidden_layers} blocks, {cfg.num_attention_heads} heads, "
            f"patch {cfg.patch_size}, {extra}")


# ------------------------------------------------------------------------------------ configs
def make_config(
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    *,
    swiglu: bool = False,
    num_register_tokens: int = 0,
    image_size: int = 518,
    patch_size: int = PATCH_SIZE,
    layerscale_value: float = 1.0,
) -> PretrainedConfig:
    """A Hugging Face DINOv2 config; with registers it is the ``dinov2_with_registers`` type."""
    common = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        mlp_ratio=4,
        use_swiglu_ffn=swiglu,
        image_size=image_size,
        patch_size=patch_size,
        layerscale_value=layerscale_value,
        layer_norm_eps=1e-6,
    )
    if num_register_tokens:
        return Dinov2WithRegistersConfig(num_register_tokens=num_register_tokens, **common)
    return Dinov2Config(**common)


def make_dinov3_config(
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    *,
    gated_mlp: bool = False,
    qkv_bias: bool = True,
    num_register_tokens: int = 4,
    patch_size: int = DINOV3_PATCH_SIZE,
    rope_theta: float = 100.0,
) -> DINOv3ViTConfig:
    """A Hugging Face DINOv3 config with the released models' settings (as on the hub).

    ``layerscale_value`` is only LayerScale's initial value: 1.0 as in the hub configs (the
    official training init 1e-5 would make a random model's blocks near-identity).
    """
    return DINOv3ViTConfig(
        patch_size=patch_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        hidden_act="silu" if gated_mlp else "gelu",
        use_gated_mlp=gated_mlp,
        query_bias=qkv_bias,
        key_bias=False,  # official DINOv3 masks the key bias to zero (mask_k_bias)
        value_bias=qkv_bias,
        proj_bias=True,
        mlp_bias=True,
        layerscale_value=1.0,
        layer_norm_eps=1e-5,
        rope_theta=rope_theta,
        pos_embed_rescale=2.0,  # training-time RoPE coordinate rescale in [1/2, 2], as pre-trained
        num_register_tokens=num_register_tokens,
        image_size=224,
    )


def arch_config(name: str) -> PretrainedConfig:
    """Config for ``small``, ``base-reg4``, ``dinov3-small-plus`` and the like (the part after
    ``random:``). Raises KeyError for an unknown name."""
    if name.startswith(DINOV3_PREFIX):
        a = DINOV3_ARCHS[name[len(DINOV3_PREFIX):]]
        return make_dinov3_config(
            a.hidden_size, a.num_layers, a.num_heads, a.intermediate_size,
            gated_mlp=a.gated_mlp, qkv_bias=a.qkv_bias, num_register_tokens=a.num_register_tokens,
        )
    size, _, reg = name.partition("-")
    if size not in ARCHS or reg not in ("", "reg4", "reg"):
        raise KeyError(name)
    a = ARCHS[size]
    return make_config(
        a.hidden_size,
        a.num_layers,
        a.num_heads,
        swiglu=a.swiglu,
        num_register_tokens=4 if reg else 0,
        image_size=a.image_size,
    )
