"""Official DINOv2 checkpoints (torch-hub ``.pth``, fused ``qkv``) -> Hugging Face DINOv2 weights
(official DINOv3 checkpoints are told apart by their tensors and go to ``convert_dinov3``).

The official layout (facebookresearch/dinov2, ``DinoVisionTransformer``) names its tensors
``cls_token``, ``pos_embed``, ``register_tokens``, ``mask_token``, ``patch_embed.proj.*``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2 | mlp.w12,mlp.w3,ls2.gamma}``
and ``norm.*``. transformers has no converter that runs at load time, so this file holds one.
The architecture (width, depth, heads, SwiGLU, registers, grid) is read off the tensor shapes.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor
from transformers import PretrainedConfig

from dinotune.backbone.convert_dinov3 import (
    convert_dinov3_state_dict,
    is_dinov3_state_dict,
    official_dinov3_config,
)
from dinotune.backbone.registry import make_config
from dinotune.errors import CheckpointFormatError

HEAD_DIM = 64  # every released DINOv2 uses 64-dim attention heads (6/12/16/24 heads)



def _strip_prefixes(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    # Checkpoints saved from training code wrap the weights ("teacher", "model", DDP "module.",
    # and the chunked-blocks layout "blocks.<chunk>.<i>").
    for wrapper in ("teacher", "model", "state_dict"):
        if wrapper in sd and isinstance(sd[wrapper], dict):
            sd = sd[wrapper]
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^(module\.|backbone\.)+", "", k)
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)
        out[k] = v
    return out


def official_config(sd: dict[str, Tensor], num_heads: int | None = None) -> PretrainedConfig:
    """Infer the Hugging Face config from an official state dict's shapes."""
    dim = sd["cls_token"].shape[-1]
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    patch = sd["patch_embed.proj.weight"].shape[-1]
    n_pos = sd["pos_embed"].shape[1] - 1
    grid = int(round(n_pos**0.5))
    if grid * grid != n_pos:
        raise CheckpointFormatError(f"pos_embed holds {n_pos} patch positions, not a square grid")
    swiglu = "blocks.0.mlp.w12.weight" in sd
    regs = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    ls = "blocks.0.ls1.gamma" in sd
    cfg = make_config(
        dim,
        depth,
        num_heads or dim // HEAD_DIM,
        swiglu=swiglu,
        num_register_tokens=regs,
        image_size=grid * patch,
        patch_size=patch,
        layerscale_value=1.0 if ls else 0.0,
    )
    if swiglu:
        hidden = sd["blocks.0.mlp.w12.weight"].shape[0] // 2
        expect = (int(dim * 4 * 2 / 3) + 7) // 8 * 8
        if hidden != expect:
            raise CheckpointFormatError(f"SwiGLU width {hidden} differs from DINOv2's {expect}")
    return cfg


def convert_official_state_dict(sd: dict[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """Re-key (and split ``qkv`` / ``w12``) an official state dict into transformers' names."""
    out: dict[str, Tensor] = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    dim = sd["cls_token"].shape[-1]
    out["embeddings.mask_token"] = sd.get("mask_token", torch.zeros(1, dim)).reshape(1, dim)
    if "register_tokens" in sd:
        out["embeddings.register_tokens"] = sd["register_tokens"]
    for i in range(num_layers):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for part in ("weight", "bias"):
            q, k, v = sd[f"{src}attn.qkv.{part}"].chunk(3, dim=0)
            out[f"{dst}attention.q_proj.{part}"] = q
            out[f"{dst}attention.k_proj.{part}"] = k
            out[f"{dst}attention.v_proj.{part}"] = v
            out[f"{dst}attention.o_proj.{part}"] = sd[f"{src}attn.proj.{part}"]
            out[f"{dst}norm1.{part}"] = sd[f"{src}norm1.{part}"]
            out[f"{dst}norm2.{part}"] = sd[f"{src}norm2.{part}"]
            if f"{src}mlp.w12.{part}" in sd:
                # official SwiGLU: x1, x2 = w12(x).chunk(2); w3(silu(x1) * x2)
                gate, up = sd[f"{src}mlp.w12.{part}"].chunk(2, dim=0)
                out[f"{dst}mlp.gate_proj.{part}"] = gate
                out[f"{dst}mlp.up_proj.{part}"] = up
                out[f"{dst}mlp.down_proj.{part}"] = sd[f"{src}mlp.w3.{part}"]
            else:
                out[f"{dst}mlp.fc1.{part}"] = sd[f"{src}mlp.fc1.{part}"]
                out[f"{dst}mlp.fc2.{part}"] = sd[f"{src}mlp.fc2.{part}"]
        if f"{src}ls1.gamma" in sd:
            out[f"{dst}layer_scale1.lambda1"] = sd[f"{src}ls1.gamma"]
            out[f"{dst}layer_scale2.lambda1"] = sd[f"{src}ls2.gamma"]
    return out


def load_official_checkpoint(path: str | Path) -> torch.nn.Module:
    """Build a transformers DINOv2 or DINOv3 model from an official ``.pth`` file (weights only)."""
    from transformers import AutoModel

    path = Path(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors come in many types
        raise CheckpointFormatError(f"{path}: cannot be read as a torch checkpoint ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointFormatError(f"{path}: holds a {type(raw).__name__}, not a state dict")
    sd = _strip_prefixes(raw)
    dinov3 = is_dinov3_state_dict(sd)
    needed = ("cls_token", "patch_embed.proj.weight", "norm.weight") + (() if dinov3 else ("pos_embed",))
    missing = [k for k in needed if k not in sd]
    if missing or not any(k.endswith("attn.qkv.weight") for k in sd):
        raise CheckpointFormatError(
            f"{path}: not an official DINOv2 checkpoint, nor a DINOv3 one (missing "
            f"{', '.join(missing) or 'blocks.*.attn.qkv'}); Hugging Face folders are passed as a directory instead"
        )
    try:
        if dinov3:
            cfg = official_dinov3_config(sd)
            hf_sd = convert_dinov3_state_dict(sd, cfg)
        else:
            cfg = official_config(sd)
            hf_sd = convert_official_state_dict(sd, cfg.num_hidden_layers)
    except CheckpointFormatError as exc:  # shape problems: say which file they are in
        raise CheckpointFormatError(f"{path}: {exc}") from None
    except KeyError as exc:
        raise CheckpointFormatError(f"{path}: missing tensor {exc.args[0]}") from None
    model = AutoModel.from_config(cfg)
    try:
        result = model.load_state_dict(hf_sd, strict=False)
    except RuntimeError as exc:  # size mismatches raise even with strict=False
        raise CheckpointFormatError(f"{path}: converted weights do not fit ({exc})") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointFormatError(
            f"{path}: converted weights do not fit (missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )
    model.config._name_or_path = str(path)
    return model.eval()
