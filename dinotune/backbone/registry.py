"""The DINOv2 family: architecture sizes, hub ids, and Hugging Face configs for each."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import Dinov2Config, Dinov2WithRegistersConfig, PretrainedConfig

PATCH_SIZE = 14


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

HUB_IDS: list[str] = [
    "facebook/dinov2-small",
    "facebook/dinov2-base",
    "facebook/dinov2-large",
    "facebook/dinov2-giant",
    "facebook/dinov2-with-registers-small",
    "facebook/dinov2-with-registers-base",
    "facebook/dinov2-with-registers-large",
    "facebook/dinov2-with-registers-giant",
]

RANDOM_SPECS: list[str] = [f"random:{s}" for s in ARCHS] + [f"random:{s}-reg4" for s in ARCHS]

DINOV2_MODEL_TYPES = ("dinov2", "dinov2_with_registers")


def model_choices_text() -> str:
    return (
        "a hub id (" + ", ".join(HUB_IDS) + "), a local Hugging Face folder, an official DINOv2 "
        ".pth checkpoint (e.g. dinov2_vits14_pretrain.pth), or one of " + ", ".join(RANDOM_SPECS)
    )


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


def arch_config(name: str) -> PretrainedConfig:
    """Config for ``small``, ``base-reg4`` and the like (the part after ``random:``)."""
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
