"""Config building blocks shared by every task: field helper, the backbone / adapter / optimizer /
training sections and the checks common to all task configs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from dinotune.errors import ConfigError

# Scale factors a feature-pyramid level can apply to the patch map (detection pyramid, FPN decoder).
PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5, 0.25)

AdapterKind = Literal["none", "lora", "dora", "full"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]



def opt(default: Any, help: str, flag: str | None = None, short: str | None = None) -> Any:
    """A config field with its help text; ``flag`` overrides the derived ``--field-name``."""
    meta = {"help": help, "flag": flag, "short": short}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)



@dataclass
class BackboneConfig:
    model: str = opt(
        "facebook/dinov2-small",
        "backbone: a hub id (facebook/dinov2-{small,base,large,giant}, "
        "facebook/dinov2-with-registers-*), a local Hugging Face folder, an official DINOv2 .pth "
        "checkpoint, or random:{tiny,small,base,large,giant}[-reg4] for random weights",
    )
    image_size: int = opt(224, "input side in pixels; must be a multiple of the backbone's patch size "
                          "(14 for DINOv2)")
    init_seed: int = opt(0, "seed of the random initialisation used by random:* models")


@dataclass
class AdapterConfig:
    kind: AdapterKind = opt(
        "lora", "none = frozen backbone (head only), lora / dora through PEFT, full = every weight",
        flag="--adapter",
    )
    rank: int = opt(8, "LoRA / DoRA rank r")
    alpha: float = opt(16.0, "LoRA / DoRA scaling alpha (the update is scaled by alpha / r)")
    dropout: float = opt(0.0, "dropout on the LoRA / DoRA input", flag="--lora-dropout")
    targets: list[str] = opt(
        ["attention"],
        "modules to adapt: attention (q,k,v,o projections), qkv, mlp, or module names such as "
        "q_proj fc1",
    )
    last_n_blocks: int = opt(0, "adapt only the last N transformer blocks (0 = all)")


@dataclass
class OptimConfig:
    lr: float = opt(1e-3, "learning rate of the head")
    backbone_lr: float = opt(1e-4, "learning rate of the backbone's adapters (or weights, with full)")
    weight_decay: float = opt(0.05, "AdamW weight decay (never applied to norms, biases, tokens)")
    schedule: Literal["cosine", "constant", "linear"] = opt("cosine", "learning-rate schedule")
    warmup_epochs: float = opt(1.0, "linear warm-up length in epochs (fractions allowed)")
    min_lr_ratio: float = opt(0.0, "final learning rate as a fraction of the peak")
    grad_clip: float = opt(1.0, "clip the gradient norm to this value (0 = off)")
    accumulate: int = opt(1, "accumulate gradients over this many batches per optimizer step")


@dataclass
class TrainConfig:
    epochs: int = opt(10, "training epochs (ignored with --two-stage, which sums its stages)")
    batch_size: int = opt(32, "images per batch")
    two_stage: bool = opt(
        False, "stage 1 trains the head on a frozen backbone, stage 2 unfreezes the adapters"
    )
    stage1_epochs: int = opt(10, "two-stage: epochs of stage 1 (head only)")
    stage1_lr: float = opt(1e-3, "two-stage: learning rate of stage 1")
    stage2_epochs: int = opt(5, "two-stage: epochs of stage 2 (adapters / backbone unfrozen)")
    stage2_lr: float = opt(1e-5, "two-stage: learning rate of stage 2 (head and backbone)")
    precision: Precision = opt("auto", "auto = bf16 on CUDA when supported, fp32 elsewhere")
    device: str = opt("auto", "auto, cpu, cuda, cuda:1, mps")
    seed: int = opt(0, "seed of data order, augmentation and head initialisation")
    workers: int = opt(2, "data-loading worker processes (0 = load in the main process)")
    eval_every: int = opt(1, "evaluate every N epochs (and always after the last)")
    progress: bool = opt(True, "show progress bars")
    out: str = opt("runs/run", "run folder (config, metrics, TensorBoard logs, checkpoints)", short="-o")



def validate_common(cfg: Any) -> None:
    """Checks shared by every task config; raises ConfigError naming the key."""
    # that the size is a multiple of the patch size is checked when the backbone is built: the
    # patch size is the model's (DINOv2 14, other families differ)
    if cfg.backbone.image_size <= 0:
        raise ConfigError(f"backbone.image_size={cfg.backbone.image_size} must be positive")
    if cfg.train.two_stage and cfg.adapter.kind == "none":
        raise ConfigError(
            "--two-stage unfreezes the adapters in stage 2, so it needs --adapter lora, dora or full"
        )
    for name in ("batch_size", "epochs", "eval_every"):
        if getattr(cfg.train, name) < 1:
            raise ConfigError(f"train.{name} must be at least 1")
    if cfg.optim.accumulate < 1:
        raise ConfigError("optim.accumulate must be at least 1")
    if cfg.adapter.kind in ("lora", "dora") and cfg.adapter.rank < 1:
        raise ConfigError("adapter.rank must be at least 1")


def validate_inference(inference: Any) -> None:
    """Checks of an inference section (every task has one; fields differ)."""
    for name in ("batch_size", "top_k", "window_batch", "compare_image_size"):
        if hasattr(inference, name) and getattr(inference, name) < 1:
            raise ConfigError(f"inference.{name} must be at least 1, got {getattr(inference, name)}")
    for name in ("score_threshold", "draw_threshold"):
        if hasattr(inference, name) and not 0.0 <= getattr(inference, name) <= 1.0:
            raise ConfigError(f"inference.{name} must be in 0..1, got {getattr(inference, name)}")
