"""Adapters on the backbone: none (frozen), LoRA / DoRA through PEFT, or full fine-tuning.

Adapters touch the backbone module only; heads are always fully trainable and live elsewhere.
Saved adapters use PEFT's own file names (``adapter_model.safetensors`` + ``adapter_config.json``)
so they also load with plain ``PeftModel.from_pretrained(Dinov2Model...)``.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dinotune.backbone.channels import (
    INPUT_EMBEDDING_WEIGHTS,
    adapted_embedding,
    input_embedding_state,
    load_input_embedding_state,
)
from dinotune.backbone.model import DinoBackbone
from dinotune.config import AdapterConfig, ConfigError
from dinotune.errors import CheckpointError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
BACKBONE_WEIGHTS = "backbone.safetensors"

_BLOCK = re.compile(r"(?:^|\.)layer\.(\d+)\.")


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _alias_matches(name: str, alias: str) -> bool:
    # transformers 5 names both families' blocks alike: ``<prefix>.layer.N.attention.{q,k,v,o}_proj``
    # (DINOv2 prefix ``encoder``, DINOv3 ``model``) and ``.mlp.{fc1,fc2}`` (DINOv2) /
    # ``.mlp.{up_proj,down_proj}`` (DINOv3) / ``.mlp.{gate_proj,up_proj,down_proj}`` (SwiGLU, both)
    leaf = name.rsplit(".", 1)[-1]
    if alias == "attention":  # every projection of the attention (q/k/v/o, or 4.x query/key/value/dense)
        return ".attention." in name
    if alias == "qkv":
        return ".attention." in name and leaf in ("q_proj", "k_proj", "v_proj", "query", "key", "value")
    if alias == "mlp":
        return ".mlp." in name
    return leaf == alias or name == alias or name.endswith("." + alias)


def resolve_targets(backbone: DinoBackbone, targets: list[str], last_n_blocks: int = 0) -> list[str]:
    """Full names of the ``nn.Linear`` modules to adapt.

    ``targets`` holds aliases (``attention``, ``qkv``, ``mlp``) or module names (``q_proj``,
    ``fc1``, ``up_proj``), matched against the installed transformers' own module names, so the
    same aliases work on DINOv2 and DINOv3; a name the backbone lacks is refused with the names it
    has. ``last_n_blocks`` keeps the matches in the last N blocks.
    """
    names = [n for n in _linear_names(backbone.hf_model()) if _BLOCK.search(n)]
    first_block = backbone.num_layers - last_n_blocks if last_n_blocks else 0
    if last_n_blocks < 0 or last_n_blocks > backbone.num_layers:
        raise ConfigError(
            f"adapter.last_n_blocks={last_n_blocks} outside 0..{backbone.num_layers} "
            f"(the backbone has {backbone.num_layers} blocks)"
        )
    chosen = []
    for alias in targets:
        hits = [n for n in names if _alias_matches(n, alias)]
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise ConfigError(
                f"adapter target {alias!r} matches no linear layer; use attention, qkv, mlp or one "
                f"of {', '.join(leaves)}"
            )
        chosen += [n for n in hits if int(_BLOCK.search(n).group(1)) >= first_block]
    return sorted(set(chosen), key=names.index)


def apply_adapter(backbone: DinoBackbone, cfg: AdapterConfig) -> None:
    """Adapt ``backbone`` in place and set ``requires_grad`` on exactly the trainable weights."""
    if cfg.kind == "none":
        backbone.requires_grad_(False)
        return
    if cfg.kind == "full":
        backbone.requires_grad_(True)
        # the mask token is only used for masked-image pre-training; it never gets a gradient here
        for name, p in backbone.named_parameters():
            if name.endswith("mask_token"):
                p.requires_grad_(False)
        return
    if cfg.kind not in ("lora", "dora"):
        raise ConfigError(f"unknown adapter {cfg.kind!r}: choose none, lora, dora or full")
    from peft import LoraConfig, get_peft_model

    targets = resolve_targets(backbone, cfg.targets, cfg.last_n_blocks)
    peft_cfg = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        use_dora=cfg.kind == "dora",
        bias="none",
    )
    with warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` property: noise for users,
        # nothing they can act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        backbone.model = get_peft_model(backbone.model, peft_cfg)  # freezes every base weight


def is_peft(backbone: DinoBackbone) -> bool:
    return hasattr(backbone.model, "peft_config")


def trainable_backbone_parameters(backbone: DinoBackbone, cfg: AdapterConfig) -> list[tuple[str, nn.Parameter]]:
    """The backbone parameters an optimizer should update for this adapter kind. A patch embedding
    widened for N-band input (``backbone/channels.py``) is new, so it trains with LoRA and DoRA
    too; with ``none`` the backbone, that layer included, stays frozen (a head-only probe, whose
    features may be cached: the widened layer starts from the pretrained kernels, not at random)."""
    if cfg.kind == "none":
        return []
    if cfg.kind == "full":
        return [(n, p) for n, p in backbone.named_parameters() if not n.endswith("mask_token")]
    conv = adapted_embedding(backbone)
    widened = {id(p) for p in conv.parameters()} if conv is not None else set()
    return [(n, p) for n, p in backbone.named_parameters() if "lora_" in n or id(p) in widened]


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameters in the backbone and elsewhere (the head), and the total."""
    out = {"backbone_trainable": 0, "head_trainable": 0, "total": 0}
    for name, p in model.named_parameters():
        out["total"] += p.numel()
        if p.requires_grad:
            key = "backbone_trainable" if name.startswith("backbone.") else "head_trainable"
            out[key] += p.numel()
    return out


def format_parameter_count(counts: dict[str, int]) -> str:
    trainable = counts["backbone_trainable"] + counts["head_trainable"]
    return (
        f"trainable parameters: {trainable:,} ({counts['backbone_trainable']:,} backbone + "
        f"{counts['head_trainable']:,} head) of {counts['total']:,} total "
        f"({100.0 * trainable / max(1, counts['total']):.2f}%)"
    )


def save_adapter(backbone: DinoBackbone, cfg: AdapterConfig, folder: Path) -> None:
    """Write the adapter (LoRA/DoRA) or the whole backbone (full) into ``folder``; nothing for none.
    A widened patch embedding (N-band input) is written beside them (``input_embedding.safetensors``)
    for every kind but ``full``, whose backbone file holds it already."""
    if cfg.kind in ("lora", "dora"):
        from peft import get_peft_model_state_dict

        sd = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(backbone.model).items()}
        save_file(sd, str(folder / ADAPTER_WEIGHTS))
        peft_cfg = backbone.model.peft_config["default"].to_dict()
        peft_cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in peft_cfg.items()}
        (folder / ADAPTER_CONFIG).write_text(json.dumps(peft_cfg, indent=2, default=str))
    elif cfg.kind == "full":
        sd = {k: v.detach().contiguous().cpu() for k, v in backbone.hf_model().state_dict().items()}
        save_file(sd, str(folder / BACKBONE_WEIGHTS))
    embedding = input_embedding_state(backbone)
    if embedding and cfg.kind != "full":
        save_file(embedding, str(folder / INPUT_EMBEDDING_WEIGHTS))


def load_adapter(backbone: DinoBackbone, cfg: AdapterConfig, folder: Path) -> None:
    """Load what ``save_adapter`` wrote onto a backbone already adapted with ``cfg`` (and widened
    to the run's bands: ``backbone/channels.py``)."""
    if cfg.kind in ("lora", "dora"):
        from peft import set_peft_model_state_dict

        sd = load_file(str(folder / ADAPTER_WEIGHTS))
        result = set_peft_model_state_dict(backbone.model, sd)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"{folder / ADAPTER_WEIGHTS}: adapter tensors do not fit: {unexpected[:5]}")
    elif cfg.kind == "full":
        sd = load_file(str(folder / BACKBONE_WEIGHTS))
        backbone.hf_model().load_state_dict(sd, strict=True)
    path = folder / INPUT_EMBEDDING_WEIGHTS
    if cfg.kind != "full" and path.is_file():
        try:
            load_input_embedding_state(backbone, load_file(str(path)), str(path))
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
    elif cfg.kind != "full" and adapted_embedding(backbone) is not None:
        raise CheckpointError(f"{path} is missing: the model takes N-band input, and its widened patch "
                              "embedding is saved there")


def merge_adapter(backbone: DinoBackbone) -> None:
    """Fold LoRA / DoRA into the base weights: plain DINOv2 again, same outputs, faster."""
    if is_peft(backbone):
        backbone.model = backbone.model.merge_and_unload(safe_merge=True)


def adapter_tensors(backbone: DinoBackbone) -> dict[str, Tensor]:
    """Adapter tensors by name (empty without PEFT); for tests and inspection."""
    return {n: p for n, p in backbone.named_parameters() if "lora_" in n}
