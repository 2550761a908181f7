"""Official DINOv2 checkpoints (torch-hub ``.pth``, fused ``qkv``) -> Hugging Face DINOv2 weights
(official DINOv3 checkpoints are told apart by their tensors and go to ``convert_dinov3``).

The official layout (facebookresearch/dinov2, ``DinoVisionTransformer``) names its tensors
``cls_token``, ``pos_embed``, ``register_tokens``, ``mask_token``, ``patch_embed.proj.*``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2 | mlp.w12,mlp.w3,ls2.gamma}``
and ``norm.*``. transformers has no converter that runs at load time, so this file holds one.
The architecture (width, depth, heads, SwiGLU, registers, grid) is read off the tensor shapes.

The file is not trusted: it is unpickled with ``weights_only=True`` after its zip directory is checked
(torch.save never compresses, so no entry may unpack to more than the file holds), every tensor must
hold the values its shape declares (a ``torch.zeros(1).expand(16384, 16384)`` saves as 4 bytes) and
be finite, and the model's shapes are compared with the file's on the meta device before the model
is built, so the memory a model takes is the data the file holds.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import torch
from torch import Tensor
from transformers import PretrainedConfig

from dinotune.backbone.convert_dinov3 import (
    convert_dinov3_state_dict,
    is_dinov3_state_dict,
    official_dinov3_config,
    read_depth,
    read_patch,
    read_width,
    shape_text,
    size_of,
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
    dim, depth = read_width(sd), read_depth(sd)
    patch = read_patch(sd, dim)
    n_pos = size_of(sd, "pos_embed", 1, 3) - 1
    grid = int(round(n_pos**0.5))
    if n_pos < 1 or grid * grid != n_pos:
        raise CheckpointFormatError(f"pos_embed holds {n_pos} patch positions, not a square grid")
    heads = num_heads or dim // HEAD_DIM
    if heads < 1 or dim % heads:
        raise CheckpointFormatError(f"width {dim} does not split into {HEAD_DIM}-dim heads (DINOv2's)")
    swiglu = "blocks.0.mlp.w12.weight" in sd
    regs = size_of(sd, "register_tokens", 1, 3, least=0) if "register_tokens" in sd else 0
    ls = "blocks.0.ls1.gamma" in sd
    cfg = make_config(
        dim,
        depth,
        heads,
        swiglu=swiglu,
        num_register_tokens=regs,
        image_size=grid * patch,
        patch_size=patch,
        layerscale_value=1.0 if ls else 0.0,
    )
    if swiglu:
        hidden = size_of(sd, "blocks.0.mlp.w12.weight", 0, 2) // 2
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
    check_torch_archive(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle / zip errors come in many types
        raise CheckpointFormatError(f"{path}: cannot be read as a torch checkpoint ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointFormatError(f"{path}: holds a {type(raw).__name__}, not a state dict")
    sd = {k: v for k, v in _strip_prefixes(raw).items() if isinstance(v, Tensor)}
    try:
        check_stored(sd)
    except CheckpointFormatError as exc:
        raise CheckpointFormatError(f"{path}: {exc}") from None
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
        _check_fits(cfg, hf_sd)
    except CheckpointFormatError as exc:  # shape problems: say which file they are in
        raise CheckpointFormatError(f"{path}: {exc}") from None
    except KeyError as exc:
        raise CheckpointFormatError(f"{path}: missing tensor {exc.args[0]}") from None
    except RuntimeError as exc:  # a reshape or split of a tensor of another size
        raise CheckpointFormatError(f"{path}: its tensors do not fit together ({str(exc).splitlines()[0]})") from None
    model = AutoModel.from_config(cfg)  # as large as the tensors the file holds (checked above)
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


# --------------------------------------------------------------------- the file holds what it says
def check_torch_archive(path: Path) -> None:
    """Refuse a torch zip archive whose entries would unpack to more than the file holds.

    ``torch.save`` stores its entries uncompressed, but ``torch.load`` inflates a deflated one in full
    before anything else is checked: a 200 KB file could unpack to 200 MB of zeros, 20 MB to 20 GB.
    The legacy (non-zip) format reads each storage as stored, so it is left to ``torch.load``."""
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return  # torch.load says what is wrong with it
    packed = max((e for e in entries if e.compress_type != zipfile.ZIP_STORED), key=lambda e: e.file_size,
                 default=None)
    if packed is not None:
        raise CheckpointFormatError(
            f"{path}: entry {packed.filename} is compressed ({packed.compress_size:,} bytes that unpack to "
            f"{packed.file_size:,}); torch.save never compresses, so the file was altered after it was saved")
    total, size = sum(e.file_size for e in entries), path.stat().st_size
    if total > size:
        raise CheckpointFormatError(f"{path}: its zip directory declares {total:,} bytes of entries in a file of "
                                    f"{size:,} bytes")


def check_stored(sd: dict[str, Tensor]) -> None:
    """Every tensor holds the values its shape declares, and they are finite.

    A tensor saved as ``torch.zeros(1).expand(...)`` (stride 0) or with overlapping strides, or many
    tensors viewing one storage, declare more values than the file stores: a model built from those
    shapes would take memory the file never held (a 3 KB file declaring a 16384-wide model)."""
    declared, stored, storages, views = 0, 0, set(), set()
    for name, t in sd.items():
        if t.layout != torch.strided or t.device.type != "cpu":  # sparse: any shape from a few values
            raise CheckpointFormatError(f"{name} is a {str(t.layout).removeprefix('torch.')} tensor on "
                                        f"{t.device.type}, not a dense one")
        size = t.element_size()
        held = t.untyped_storage().nbytes() - t.storage_offset() * size
        if t.numel() * size > held:
            raise CheckpointFormatError(
                f"{name} declares {shape_text(t)} ({t.numel():,} values) but the file stores "
                f"{max(held, 0) // size:,} for it (an expanded or overlapping tensor); no model is built from "
                "shapes the file does not hold")
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if view not in views:  # the same tensor under two names (tied weights) counts once
            views.add(view)
            declared += t.numel() * size
        if t.untyped_storage().data_ptr() not in storages:
            storages.add(t.untyped_storage().data_ptr())
            stored += t.untyped_storage().nbytes()
    if declared > stored:
        raise CheckpointFormatError(
            f"its tensors declare {declared:,} bytes of values but the file stores {stored:,} (tensors viewing "
            "one storage); no model is built from shapes the file does not hold")
    for name, t in sd.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointFormatError(f"{name} holds NaN or infinite values")


def _check_fits(cfg: PretrainedConfig, hf_sd: dict[str, Tensor]) -> None:
    """The converted tensors have exactly the model's names and shapes, compared on the meta device
    (no memory) before the model is built from ``cfg``."""
    from transformers import AutoModel

    with torch.device("meta"):
        skeleton = AutoModel.from_config(cfg)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    missing = [k for k in expected if k not in hf_sd]
    unexpected = [k for k in hf_sd if k not in expected]
    if missing or unexpected:
        raise CheckpointFormatError(
            f"converted weights do not fit (missing {missing[:5]}, unexpected {unexpected[:5]})")
    for k, shape in expected.items():
        if tuple(hf_sd[k].shape) != shape:
            raise CheckpointFormatError(
                f"converted weights do not fit: size mismatch for {k}: the file gives "
                f"{shape_text(hf_sd[k])}, a model of its declared shape needs {' x '.join(map(str, shape))}")
