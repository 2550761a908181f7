"""Official DINOv3 checkpoints (facebookresearch/dinov3 ``.pth``) -> Hugging Face DINOv3 weights.

The official layout (``DinoVisionTransformer``) names its tensors ``cls_token``, ``storage_tokens``
(the registers), ``mask_token`` (``1 x C``), ``patch_embed.proj.*``, ``rope_embed.periods``,
``blocks.{i}.{norm1, attn.qkv (+ bias_mask), attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2 |
mlp.w1, mlp.w2, mlp.w3, ls2.gamma}`` and ``norm.*``. There is no position table: RoPE.

transformers' own conversion script runs offline only; this one runs at load time. Width, depth,
MLP kind and width, biases and registers are read off the tensor shapes; the head count off the
RoPE periods (``head_dim / 4`` of them).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor
from transformers import DINOv3ViTConfig

from dinotune.backbone.registry import DINOV3_ARCHS, make_dinov3_config
from dinotune.errors import CheckpointFormatError

ROPE_BASE = 100.0  # every released DINOv3 (pos_embed_rope_base)
_DROP = (".bias_mask", "local_cls_norm.")  # the key-bias mask; a norm used only in pre-training


def is_dinov3_state_dict(sd: dict[str, Tensor]) -> bool:
    """Official DINOv3 tensors (storage tokens or RoPE periods, no position table)."""
    return "storage_tokens" in sd or "rope_embed.periods" in sd or (
        "cls_token" in sd and "pos_embed" not in sd and "blocks.0.attn.qkv.weight" in sd
    )


# ------------------------------------------------------ shape readers (the DINOv2 converter's too)
def shape_text(t: Tensor) -> str:
    return " x ".join(str(n) for n in t.shape) if t.dim() else "a single value"


def size_of(sd: dict[str, Tensor], key: str, axis: int, ndim: int, least: int = 1) -> int:
    """``sd[key].shape[axis]``, refusing a tensor of another rank or a size under ``least`` there."""
    t = sd[key]
    if t.dim() != ndim:
        raise CheckpointFormatError(f"{key} has shape {shape_text(t)}, not {ndim} dimensions")
    if t.shape[axis] < least:
        raise CheckpointFormatError(f"{key} has shape {shape_text(t)}: a width of 0")
    return t.shape[axis]


def read_width(sd: dict[str, Tensor]) -> int:
    """The model width, off ``cls_token`` (``1 x 1 x C``)."""
    if sd["cls_token"].shape[:2] != (1, 1):
        raise CheckpointFormatError(f"cls_token has shape {shape_text(sd['cls_token'])}, not 1 x 1 x width")
    return size_of(sd, "cls_token", 2, 3)


def read_depth(sd: dict[str, Tensor]) -> int:
    """The number of blocks, ``blocks.0.*`` to ``blocks.{N-1}.*`` with none missing."""
    found = {m.group(1) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not found:
        raise CheckpointFormatError("no blocks.N.* tensors (the transformer blocks)")
    present = {int(i) if len(i) < 7 else -1 for i in found}  # -1: an index no model has
    depth = len(found)
    gap = next((i for i in range(depth) if i not in present), None)
    if gap is not None:
        raise CheckpointFormatError(f"{depth} blocks but no blocks.{gap}.* tensors (blocks are numbered 0 to N-1)")
    return depth


def read_patch(sd: dict[str, Tensor], dim: int) -> int:
    """The patch size, off ``patch_embed.proj.weight`` (``C x channels x p x p``)."""
    w = sd["patch_embed.proj.weight"]
    if w.dim() != 4 or w.shape[0] != dim or min(w.shape) < 1 or w.shape[2] != w.shape[3]:
        raise CheckpointFormatError(f"patch_embed.proj.weight has shape {shape_text(w)}, not {dim} x channels x "
                                    "patch x patch (a square patch of at least 1 pixel)")
    return w.shape[-1]


def _num_heads(sd: dict[str, Tensor], dim: int, depth: int) -> int:
    periods = sd.get("rope_embed.periods")
    if periods is not None:  # RoPE: head_dim / 4 periods per axis pair
        n = periods.numel()
        if n == 0:
            raise CheckpointFormatError("rope_embed.periods is empty (RoPE keeps head_dim / 4 periods)")
        if dim % (4 * n):
            raise CheckpointFormatError(f"rope_embed.periods holds {n} values, so heads of {4 * n} dims (4 per "
                                        f"period), which a width of {dim} does not split into")
        return dim // (4 * n)
    for a in DINOV3_ARCHS.values():  # no periods: a released size, else 64-dim heads
        if (a.hidden_size, a.num_layers) == (dim, depth):
            return a.num_heads
    return max(1, dim // 64)


def _check_rope(sd: dict[str, Tensor], head_dim: int) -> None:
    periods = sd.get("rope_embed.periods")
    if periods is None:
        return
    d = periods.numel()
    expect = ROPE_BASE ** (2.0 * torch.arange(d, dtype=torch.float64) / (head_dim // 2))
    # the released checkpoints store the periods in bfloat16: 2^-8 relative precision
    if not torch.allclose(periods.reshape(-1).double(), expect, rtol=1e-2, atol=0):
        raise CheckpointFormatError(
            f"rope_embed.periods do not follow RoPE base {ROPE_BASE:g} (min / max periods are not "
            "supported by transformers' DINOv3)"
        )


def official_dinov3_config(sd: dict[str, Tensor]) -> DINOv3ViTConfig:
    """Infer the Hugging Face DINOv3 config from an official state dict's shapes."""
    if "cls_norm.weight" in sd:
        raise CheckpointFormatError(
            "separate class-token norm (untie_cls_and_patch_norms) has no transformers equivalent"
        )
    dim, depth = read_width(sd), read_depth(sd)
    heads = _num_heads(sd, dim, depth)
    if heads < 1 or dim % heads:
        raise CheckpointFormatError(f"width {dim} does not split into {heads} heads")
    _check_rope(sd, dim // heads)
    gated = "blocks.0.mlp.w1.weight" in sd
    width = size_of(sd, "blocks.0.mlp.w1.weight" if gated else "blocks.0.mlp.fc1.weight", 0, 2)
    qkv_bias = "blocks.0.attn.qkv.bias" in sd
    cfg = make_dinov3_config(
        dim, depth, heads, width,
        gated_mlp=gated,
        qkv_bias=qkv_bias,
        num_register_tokens=size_of(sd, "storage_tokens", 1, 3, least=0) if "storage_tokens" in sd else 0,
        patch_size=read_patch(sd, dim),
    )
    # without a bias mask the key bias is a real parameter (it is not softmax-invariant under RoPE)
    cfg.key_bias = qkv_bias and "blocks.0.attn.qkv.bias_mask" not in sd
    cfg.proj_bias = "blocks.0.attn.proj.bias" in sd
    cfg.mlp_bias = "blocks.0.mlp.w3.bias" in sd if gated else "blocks.0.mlp.fc2.bias" in sd
    if "blocks.0.ls1.gamma" not in sd:
        raise CheckpointFormatError("no LayerScale (blocks.0.ls1.gamma): not a DINOv3 checkpoint")
    return cfg


def convert_dinov3_state_dict(sd: dict[str, Tensor], cfg: DINOv3ViTConfig) -> dict[str, Tensor]:
    """Re-key (and split ``qkv``) an official DINOv3 state dict into transformers' names.

    Raises KeyError naming a missing tensor, CheckpointFormatError for tensors left unconverted.
    """
    dim = cfg.hidden_size
    out: dict[str, Tensor] = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": sd.get("mask_token", torch.zeros(1, dim)).reshape(1, 1, dim),
        "embeddings.register_tokens": sd.get("storage_tokens", torch.zeros(1, 0, dim)),
        "embeddings.patch_embeddings.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.bias": sd["patch_embed.proj.bias"],
        "norm.weight": sd["norm.weight"],
        "norm.bias": sd["norm.bias"],
    }
    used = {"cls_token", "mask_token", "storage_tokens", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias", "rope_embed.periods"}
    mlp = (("w1", "gate_proj"), ("w2", "up_proj"), ("w3", "down_proj")) if cfg.use_gated_mlp \
        else (("fc1", "up_proj"), ("fc2", "down_proj"))
    for i in range(cfg.num_hidden_layers):
        src, dst = f"blocks.{i}.", f"model.layer.{i}."
        pairs = [("norm1", "norm1"), ("norm2", "norm2"), ("attn.proj", "attention.o_proj")]
        pairs += [(f"mlp.{a}", f"mlp.{b}") for a, b in mlp]
        for a, b in pairs:
            for part in ("weight", "bias"):
                if part == "weight" or f"{src}{a}.bias" in sd:
                    out[f"{dst}{b}.{part}"] = sd[f"{src}{a}.{part}"]
                    used.add(f"{src}{a}.{part}")
        q, k, v = sd[f"{src}attn.qkv.weight"].chunk(3, dim=0)
        out.update({f"{dst}attention.q_proj.weight": q, f"{dst}attention.k_proj.weight": k,
                    f"{dst}attention.v_proj.weight": v})
        used.add(f"{src}attn.qkv.weight")
        if f"{src}attn.qkv.bias" in sd:
            qb, kb, vb = sd[f"{src}attn.qkv.bias"].chunk(3, dim=0)
            out[f"{dst}attention.q_proj.bias"] = qb
            out[f"{dst}attention.v_proj.bias"] = vb
            if cfg.key_bias:
                out[f"{dst}attention.k_proj.bias"] = kb
            used.add(f"{src}attn.qkv.bias")
        for n in (1, 2):
            out[f"{dst}layer_scale{n}.lambda1"] = sd[f"{src}ls{n}.gamma"]
            used.add(f"{src}ls{n}.gamma")
    left = sorted(k for k in sd if k not in used and not any(d in k for d in _DROP))
    if left:
        raise CheckpointFormatError(f"tensors with no place in a DINOv3 model: {', '.join(left[:5])}")
    return out
