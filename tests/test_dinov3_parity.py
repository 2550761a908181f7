"""DINOv3 parity with an independent implementation: timm's Eva (``rope_type='dinov3'``).

A ``random:dinov3-*`` backbone (transformers' ``DINOv3ViTModel``) gets random values in every
tensor (LayerScale, norms, biases and tokens included, so a dropped or swapped tensor shows), its
state dict is re-keyed into timm's layout (``hf_to_timm`` below), and dinotune's features (CLS and
patch tokens after the final norm, registers split off) must equal timm's ``forward_features`` to
1e-4. RoPE needs no interpolation at any size; the sizes include a non-square one, on which a
height / width mix-up in the RoPE coordinates would show (checked to show, below).

Conventions compared (both sides read for this): RoPE periods ``base ** (4k / head_dim)`` with
base 100 (HF ``rope_theta``, timm ``rope_temperature``); patch-centre coordinates in [-1, 1]
normalised per axis ('separate'), rows first ('ij'), rotated by halves (``rotate_half``), applied
to patch tokens only; the training-time rescale (``pos_embed_rescale``) is off in eval mode on
both sides. The official ``.pth`` layout is checked against timm's own converter
(``checkpoint_filter_fn``), then loaded by dinotune.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import Tensor, nn

timm = pytest.importorskip("timm")
if "vit_small_patch16_dinov3" not in timm.list_models("*dinov3*"):
    pytest.skip("this timm has no DINOv3 models (timm >= 1.0.20)", allow_module_level=True)
from timm.layers import LayerNorm  # noqa: E402
from timm.models.eva import Eva, checkpoint_filter_fn  # noqa: E402
from transformers import AutoModel  # noqa: E402

from dinotune.backbone import DinoBackbone, load_backbone_model  # noqa: E402
from dinotune.backbone.registry import DINOV3_ARCHS, arch_config  # noqa: E402
from dinotune.errors import CheckpointFormatError  # noqa: E402
from tests.conftest import randomize_parameters  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-4
# registry size -> timm's registered model of that architecture (qkvb: q / v biases present)
TIMM_NAMES = {
    "small": "vit_small_patch16_dinov3_qkvb",
    "small-plus": "vit_small_plus_patch16_dinov3_qkvb",
    "base": "vit_base_patch16_dinov3_qkvb",
    "large": "vit_large_patch16_dinov3_qkvb",
    "huge-plus": "vit_huge_plus_patch16_dinov3_qkvb",
    "7b": "vit_7b_patch16_dinov3",
}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def hf_to_timm(sd: dict[str, Tensor], cfg) -> dict[str, Tensor]:
    """transformers ``DINOv3ViTModel`` keys -> timm ``Eva`` (dinov3) keys.

    * q / k / v projections are fused into ``attn.qkv`` (rows q, k, v); the q and v biases are
      ``attn.q_bias`` / ``attn.v_bias``; the key bias is a zero buffer in timm and absent in HF
      (``key_bias=False``), both as official DINOv3's masked key bias.
    * LayerScale ``layer_scale{1,2}.lambda1`` -> ``gamma_{1,2}``; registers -> ``reg_token``.
    * MLP: ``up_proj`` / ``down_proj`` -> ``fc1`` / ``fc2``; gated: ``gate_proj`` (the SiLU'd half)
      -> ``fc1_g``, ``up_proj`` -> ``fc1_x``, ``down_proj`` -> ``fc2``.
    * HF's ``mask_token`` (masked pre-training only) has no timm counterpart.
    Every HF tensor must be consumed.
    """
    sd = dict(sd)
    out = {
        "cls_token": sd.pop("embeddings.cls_token"),
        "patch_embed.proj.weight": sd.pop("embeddings.patch_embeddings.weight"),
        "patch_embed.proj.bias": sd.pop("embeddings.patch_embeddings.bias"),
        "norm.weight": sd.pop("norm.weight"),
        "norm.bias": sd.pop("norm.bias"),
    }
    sd.pop("embeddings.mask_token")
    registers = sd.pop("embeddings.register_tokens")
    if registers.shape[1]:
        out["reg_token"] = registers
    mlp = ({"gate_proj": "fc1_g", "up_proj": "fc1_x", "down_proj": "fc2"} if cfg.use_gated_mlp
           else {"up_proj": "fc1", "down_proj": "fc2"})
    for i in range(cfg.num_hidden_layers):
        src, dst = f"model.layer.{i}.", f"blocks.{i}."
        out[f"{dst}attn.qkv.weight"] = torch.cat([sd.pop(f"{src}attention.{x}_proj.weight") for x in "qkv"])
        if cfg.query_bias:
            out[f"{dst}attn.q_bias"] = sd.pop(f"{src}attention.q_proj.bias")
            out[f"{dst}attn.v_bias"] = sd.pop(f"{src}attention.v_proj.bias")
        pairs = [("attention.o_proj", "attn.proj"), ("norm1", "norm1"), ("norm2", "norm2")]
        pairs += [(f"mlp.{a}", f"mlp.{b}") for a, b in mlp.items()]
        for a, b in pairs:
            for part in ("weight", "bias"):
                out[f"{dst}{b}.{part}"] = sd.pop(f"{src}{a}.{part}")
        out[f"{dst}gamma_1"] = sd.pop(f"{src}layer_scale1.lambda1")
        out[f"{dst}gamma_2"] = sd.pop(f"{src}layer_scale2.lambda1")
    assert not sd, f"HF tensors left unmapped: {sorted(sd)}"
    return out


def _timm_like(cfg, **overrides) -> nn.Module:
    """A timm Eva built like timm's ``vit_*_patch16_dinov3`` entries, sized as ``cfg``."""
    args = dict(
        img_size=224, patch_size=cfg.patch_size, embed_dim=cfg.hidden_size, depth=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads, qkv_bias=cfg.query_bias, mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
        swiglu_mlp=cfg.use_gated_mlp, swiglu_align_to=8 if cfg.use_gated_mlp else 0, init_values=1e-5,
        rope_type="dinov3", rope_temperature=cfg.rope_theta, rope_rotate_half=True, use_rot_pos_emb=True,
        use_abs_pos_emb=False, num_reg_tokens=cfg.num_register_tokens, use_fc_norm=False,
        norm_layer=partial(LayerNorm, eps=cfg.layer_norm_eps), dynamic_img_size=True, num_classes=0,
        global_pool="token",
    )
    args.update(overrides)
    return Eva(**args).eval()


def _pixels(h: int, w: int, seed: int = 7, batch: int = 2) -> Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _check_parity(backbone: DinoBackbone, timm_model: nn.Module, sizes) -> None:
    n_prefix = 1 + backbone.num_register_tokens
    p = backbone.patch_size
    for h, w in sizes:
        x = _pixels(h, w)
        with torch.no_grad():
            ref = timm_model.forward_features(x)  # [cls, registers, patches] after the final norm
            f = backbone(x, layers=[0, -1])
        assert ref.shape == (2, n_prefix + (h // p) * (w // p), backbone.embed_dim)
        assert f.grid == (h // p, w // p)
        # a non-trivial model: tokens differ between images and from token to token
        assert ref[:, 0].std() > 0.1 and (ref[0] - ref[1]).abs().max() > 0.1
        torch.testing.assert_close(f.cls, ref[:, 0], atol=ATOL, rtol=0)
        torch.testing.assert_close(f.patch_tokens, ref[:, n_prefix:], atol=ATOL, rtol=0)
        torch.testing.assert_close(f.layers_patch[-1], ref[:, n_prefix:], atol=ATOL, rtol=0)


def _random_backbone(spec: str, seed: int) -> DinoBackbone:
    backbone = DinoBackbone.from_spec(spec).eval()
    randomize_parameters(backbone.model, seed)
    return backbone


# --------------------------------------------------------------------------------------------
# parity
# --------------------------------------------------------------------------------------------
def test_tiny_matches_timm_square_and_non_square():
    backbone = _random_backbone("random:dinov3-tiny", seed=1)
    cfg = backbone.config
    timm_model = _timm_like(cfg)
    timm_model.load_state_dict(hf_to_timm(backbone.model.state_dict(), cfg), strict=True)
    _check_parity(backbone, timm_model, [(64, 64), (32, 80), (80, 48)])

    # the non-square sizes would catch a RoPE axis mix-up: timm with x / y swapped is far off
    swapped = _timm_like(cfg, rope_grid_indexing="xy")
    swapped.load_state_dict(timm_model.state_dict(), strict=True)
    x = _pixels(32, 80)
    with torch.no_grad():
        gap = (swapped.forward_features(x) - timm_model.forward_features(x)).abs().max()
    assert gap > 100 * ATOL


def _tiny_gated_backbone(seed: int) -> DinoBackbone:
    """The 7B layout (SwiGLU, no q / v bias) at a tiny size: 2 heads of 32, 2 registers."""
    from dinotune.backbone.registry import make_dinov3_config

    cfg = make_dinov3_config(64, 2, 2, 176, gated_mlp=True, qkv_bias=False, num_register_tokens=2)
    backbone = DinoBackbone(AutoModel.from_config(cfg).eval())
    randomize_parameters(backbone.model, seed)
    return backbone


def test_gated_without_qv_bias_matches_timm():
    backbone = _tiny_gated_backbone(seed=2)
    cfg = backbone.config
    timm_model = _timm_like(cfg)
    assert timm_model.blocks[0].mlp.fc1_g.out_features == 176
    timm_model.load_state_dict(hf_to_timm(backbone.model.state_dict(), cfg), strict=True)
    _check_parity(backbone, timm_model, [(48, 32)])


def test_small_plus_matches_timms_registered_model():
    """The registry's small-plus against timm's own ``vit_small_plus_patch16_dinov3_qkvb``."""
    backbone = _random_backbone("random:dinov3-small-plus", seed=3)
    timm_model = timm.create_model(TIMM_NAMES["small-plus"], pretrained=False, num_classes=0).eval()
    timm_model.load_state_dict(hf_to_timm(backbone.model.state_dict(), backbone.config), strict=True)
    _check_parity(backbone, timm_model, [(32, 48)])


@pytest.mark.parametrize("size", sorted(TIMM_NAMES))
def test_registry_architectures_equal_timms(size):
    """Every released size (7B included) has timm's tensor shapes, built on the meta device."""
    cfg = arch_config(f"dinov3-{size}")
    with torch.device("meta"):
        ours = hf_to_timm(AutoModel.from_config(cfg).state_dict(), cfg)
        theirs = timm.create_model(TIMM_NAMES[size], pretrained=False, num_classes=0).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert set(DINOV3_ARCHS) == set(TIMM_NAMES) | {"tiny"}


# --------------------------------------------------------------------------------------------
# official .pth checkpoints
# --------------------------------------------------------------------------------------------
def hf_to_official(sd: dict[str, Tensor], cfg) -> dict[str, Tensor]:
    """transformers keys -> facebookresearch/dinov3 ``DinoVisionTransformer`` keys (with the
    ``bias_mask`` of ``mask_k_bias`` and a zero key bias, the RoPE periods, a 1 x C mask token)."""
    out = {
        "cls_token": sd["embeddings.cls_token"],
        "storage_tokens": sd["embeddings.register_tokens"],
        "mask_token": sd["embeddings.mask_token"].reshape(1, -1),
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
        "rope_embed.periods": cfg.rope_theta ** (
            4 * torch.arange(cfg.hidden_size // cfg.num_attention_heads // 4) / (cfg.hidden_size // cfg.num_attention_heads)),
    }
    mlp = {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"} if cfg.use_gated_mlp else {"up_proj": "fc1", "down_proj": "fc2"}
    for i in range(cfg.num_hidden_layers):
        src, dst = f"model.layer.{i}.", f"blocks.{i}."
        out[f"{dst}attn.qkv.weight"] = torch.cat([sd[f"{src}attention.{x}_proj.weight"] for x in "qkv"])
        if cfg.query_bias:
            q_bias = sd[f"{src}attention.q_proj.bias"]
            zeros, ones = torch.zeros_like(q_bias), torch.ones_like(q_bias)
            out[f"{dst}attn.qkv.bias"] = torch.cat([q_bias, zeros, sd[f"{src}attention.v_proj.bias"]])
            out[f"{dst}attn.qkv.bias_mask"] = torch.cat([ones, zeros, ones])
        pairs = [("attention.o_proj", "attn.proj"), ("norm1", "norm1"), ("norm2", "norm2")]
        pairs += [(f"mlp.{a}", f"mlp.{b}") for a, b in mlp.items()]
        for a, b in pairs:
            for part in ("weight", "bias"):
                out[f"{dst}{b}.{part}"] = sd[f"{src}{a}.{part}"]
        out[f"{dst}ls1.gamma"] = sd[f"{src}layer_scale1.lambda1"]
        out[f"{dst}ls2.gamma"] = sd[f"{src}layer_scale2.lambda1"]
    return {k: v.clone() for k, v in out.items()}


@pytest.mark.parametrize("layout", ["tiny", "gated-no-qv-bias"])
def test_official_pth_loads_and_matches_timm(layout, tmp_path):
    backbone = _random_backbone("random:dinov3-tiny", seed=4) if layout == "tiny" else _tiny_gated_backbone(seed=4)
    cfg = backbone.config
    official = hf_to_official(backbone.model.state_dict(), cfg)
    # the layout is the one timm's own official-checkpoint converter reads: it gives our mapping
    timm_model = _timm_like(cfg)
    expected = hf_to_timm(backbone.model.state_dict(), cfg)
    converted = checkpoint_filter_fn(official, timm_model)
    assert converted.keys() == expected.keys()
    for k in expected:
        assert torch.equal(converted[k], expected[k]), k
    timm_model.load_state_dict(converted, strict=True)

    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-00000000.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in official.items()}}, path)  # a training checkpoint
    loaded = DinoBackbone.from_spec(str(path)).eval()
    assert loaded.family == "dinov3" and loaded.num_register_tokens == cfg.num_register_tokens
    for key in ("use_gated_mlp", "intermediate_size", "query_bias", "value_bias", "key_bias", "hidden_act",
                "num_attention_heads"):  # the head count is read off the RoPE periods
        assert getattr(loaded.config, key) == getattr(cfg, key), key
    _check_parity(loaded, timm_model, [(32, 48)])


def test_official_pth_problems_name_the_file(tmp_path):
    backbone = _random_backbone("random:dinov3-tiny", seed=5)
    official = hf_to_official(backbone.model.state_dict(), backbone.config)
    cases = {
        "untied": {**official, "cls_norm.weight": torch.ones(64), "cls_norm.bias": torch.zeros(64)},
        "extra": {**official, "blocks.0.attn.extra.weight": torch.ones(3)},
        "rope": {**official, "rope_embed.periods": official["rope_embed.periods"] * 3},
        "missing": {k: v for k, v in official.items() if k != "blocks.1.ls2.gamma"},
    }
    matches = {"untied": "untie_cls_and_patch_norms", "extra": "blocks.0.attn.extra.weight",
               "rope": "RoPE base", "missing": "blocks.1.ls2.gamma"}
    for name, sd in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(sd, path)
        with pytest.raises(CheckpointFormatError, match=matches[name]) as exc:
            load_backbone_model(str(path))
        assert str(path) in str(exc.value)
