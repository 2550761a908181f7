"""Which ``nn.Linear`` modules of the backbone a LoRA / DoRA adapter wraps (``--targets``)."""

from __future__ import annotations

from torch import nn

from dinotune.backbone.model import DinoBackbone
from dinotune.config import ConfigError


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _alias_matches(name: str, alias: str) -> bool:
    # transformers 5 names both families' block layers alike: ``.attention.{q,k,v,o}_proj`` and
    # ``.mlp.{fc1,fc2}`` (DINOv2) / ``.mlp.{up_proj,down_proj}`` (DINOv3) /
    # ``.mlp.{gate_proj,up_proj,down_proj}`` (SwiGLU, both)
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
    has. ``last_n_blocks`` keeps the matches in the last N blocks (where the blocks are is the
    backbone family's to say).
    """
    family = backbone.family
    blocks = {n: family.block_index(n) for n in _linear_names(backbone.hf_model())}
    names = [n for n, block in blocks.items() if block is not None]
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
        chosen += [n for n in hits if blocks[n] >= first_block]
    return sorted(set(chosen), key=names.index)
