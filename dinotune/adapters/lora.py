"""``lora`` and ``dora``: low-rank updates of chosen linear layers, through PEFT.

Saved adapters use PEFT's own file names (``adapter_model.safetensors`` + ``adapter_config.json``)
so they also load with plain ``PeftModel.from_pretrained(Dinov2Model...)``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from dinotune.adapters.base import Adapter
from dinotune.adapters.targets import resolve_targets
from dinotune.backbone.channels import adapted_embedding
from dinotune.backbone.model import DinoBackbone
from dinotune.config import AdapterConfig, ConfigError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# --unfreeze-blocks: the base weights of the unfrozen blocks, beside the adapter
UNFROZEN_WEIGHTS = "unfrozen_blocks.safetensors"


def unfrozen_parameters(backbone: DinoBackbone) -> list[tuple[str, nn.Parameter]]:
    """The base (non-LoRA) weights of the last ``backbone.unfrozen_blocks`` blocks, which train
    with the adapter (ExPLoRA, Khanna et al. 2025: LoRA below, the last blocks unfrozen)."""
    n = getattr(backbone, "unfrozen_blocks", 0)
    if not n:
        return []
    first = backbone.num_layers - n
    family = backbone.family
    out = []
    for name, p in backbone.named_parameters():
        block = family.block_index(name)
        if "lora_" not in name and block is not None and block >= first:
            out.append((name, p))
    return out


def is_peft(backbone: DinoBackbone) -> bool:
    """Whether ``backbone`` is wrapped in a PEFT model (an adapter not merged yet)."""
    return hasattr(backbone.model, "peft_config")


def merge_peft(backbone: DinoBackbone) -> None:
    """Fold a PEFT adapter into the base weights: a plain transformers model again, same outputs,
    faster. ``safe_merge`` refuses NaNs; a backbone without PEFT stays as it is."""
    if is_peft(backbone):
        backbone.model = backbone.model.merge_and_unload(safe_merge=True)


def adapter_tensors(backbone: DinoBackbone) -> dict[str, Tensor]:
    """Adapter tensors by name (empty without PEFT); for tests and inspection."""
    return {n: p for n, p in backbone.named_parameters() if "lora_" in n}


class LoraAdapter(Adapter):
    """LoRA, or DoRA with ``use_dora`` (LoRA plus a learned magnitude per output channel). PEFT
    freezes every base weight; the ``lora_`` tensors and a widened patch embedding train."""

    trains_backbone = True
    uses_peft = True
    weight_files = (ADAPTER_WEIGHTS,)

    def __init__(self, kind: str, use_dora: bool = False):
        self.kind = kind
        self.use_dora = use_dora

    def apply(self, backbone: DinoBackbone, cfg: AdapterConfig) -> None:
        from peft import LoraConfig, get_peft_model

        peft_cfg = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=resolve_targets(backbone, cfg.targets, cfg.last_n_blocks),
            use_dora=self.use_dora,
            bias="none",
        )
        with warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing` property: noise for users,
            # nothing they can act on.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            backbone.model = get_peft_model(backbone.model, peft_cfg)  # freezes every base weight
        if cfg.unfreeze_blocks > backbone.num_layers:
            raise ConfigError(f"--unfreeze-blocks {cfg.unfreeze_blocks}: the backbone has {backbone.num_layers} blocks")
        backbone.unfrozen_blocks = cfg.unfreeze_blocks
        for _, p in unfrozen_parameters(backbone):
            p.requires_grad_(True)

    def trainable(self, backbone: DinoBackbone) -> list[tuple[str, nn.Parameter]]:
        conv = adapted_embedding(backbone)
        widened = {id(p) for p in conv.parameters()} if conv is not None else set()
        unfrozen = {id(p) for _, p in unfrozen_parameters(backbone)}
        return [(n, p) for n, p in backbone.named_parameters() if "lora_" in n or id(p) in widened | unfrozen]

    def save_weights(self, backbone: DinoBackbone, folder: Path) -> None:
        from peft import get_peft_model_state_dict

        sd = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(backbone.model).items()}
        save_file(sd, str(folder / ADAPTER_WEIGHTS))
        peft_cfg = backbone.model.peft_config["default"].to_dict()
        peft_cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in peft_cfg.items()}
        (folder / ADAPTER_CONFIG).write_text(json.dumps(peft_cfg, indent=2, default=str))
        unfrozen = unfrozen_parameters(backbone)
        if unfrozen:
            save_file({n: p.detach().contiguous().cpu() for n, p in unfrozen}, str(folder / UNFROZEN_WEIGHTS))

    def load_weights(self, backbone: DinoBackbone, folder: Path) -> None:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(backbone.model, load_file(str(folder / ADAPTER_WEIGHTS)))
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"{folder / ADAPTER_WEIGHTS}: adapter tensors do not fit: {unexpected[:5]}")
        unfrozen = dict(unfrozen_parameters(backbone))
        if unfrozen:
            path = folder / UNFROZEN_WEIGHTS
            if not path.is_file():
                raise ValueError(f"{path} is missing: the run trained its last {backbone.unfrozen_blocks} blocks")
            saved = load_file(str(path))
            if set(saved) != set(unfrozen):
                raise ValueError(f"{path}: the unfrozen blocks' weights do not fit this backbone")
            with torch.no_grad():
                for name, p in unfrozen.items():
                    p.copy_(saved[name])

    def merge(self, backbone: DinoBackbone) -> None:
        merge_peft(backbone)
