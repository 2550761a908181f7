"""Config building blocks shared by every task: field helper, the backbone / adapter / optimizer /
training sections and the checks common to all task configs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from dinotune.errors import ConfigError

# Scale factors a feature-pyramid level can apply to the patch map (detection pyramid, FPN decoder).
PYRAMID_SCALES = (4.0, 2.0, 1.0, 0.5, 0.25)

AdapterKind = Literal["none", "lora", "dora", "full"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Sampler = Literal["shuffle", "balanced"]

# Pillow's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS): the default of every pixel limit
MAX_IMAGE_PIXELS = 89_478_485

# Loggers --report-to takes (metrics.jsonl is always written).
REPORTERS = ("tensorboard", "csv", "wandb", "mlflow", "none")



def opt(default: Any, help: str, flag: str | None = None, short: str | None = None, *,
        ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None, positional: bool = False, required: bool = False,
        metavar: str | None = None, default_text: str | None = None, negatable: bool = True,
        repeatable: bool = False) -> Any:
    """A config field with its help text; ``flag`` overrides the derived ``--field-name``.

    ``ge`` / ``gt`` / ``le`` / ``lt``: the valid range of a number (of every item of a list of
    numbers), checked by ``check_ranges`` for the CLI, the API and config files alike; a float
    must also be finite.

    How the command line shows the field (``cli.add_config_flags``): ``positional`` (a command's
    operand, ``dinotune eval RUN``; a list takes one or more), ``required`` (a flag the command
    cannot do without), ``metavar`` (the value's name in the help), ``default_text`` (what the help
    says the default is, where the value itself would not tell: ``None`` standing for "the run's
    own"), ``negatable`` (a boolean gets ``--no-x`` too; False: a plain switch), ``repeatable`` (a
    list flag given twice gathers both lists; otherwise the last one wins).
    """
    meta = {"help": help, "flag": flag, "short": short, "ge": ge, "gt": gt, "le": le, "lt": lt,
            "positional": positional, "required": required, "metavar": metavar, "default_text": default_text,
            "negatable": negatable, "repeatable": repeatable}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def device_option(help: str = "auto, cpu, cuda, cuda:N, mps") -> Any:
    """A ``device`` field (training and every command that runs a model): ``auto`` picks CUDA,
    then MPS, then the CPU."""
    return opt("auto", help)


def threads_option() -> Any:
    """A ``threads`` field (training and every command that computes): CPU threads of PyTorch and
    onnxruntime. ``0`` (auto) takes the cores this process may use that other processes are not
    already busy on, so a busy machine is not oversubscribed (``dinotune.utils.choose_threads``)."""
    return opt(0, "CPU threads for PyTorch and onnxruntime (0 = auto: $OMP_NUM_THREADS when set, else the "
               "cores not already busy, at least 1; oversubscribed cores made predict 4.7x slower)", ge=0)


def max_image_pixels_option() -> Any:
    """The ``data.max_image_pixels`` field every task config has."""
    return opt(MAX_IMAGE_PIXELS, "skip (and report) images with more pixels than this, read from the header before "
               "anything is decoded: a guard against decompression bombs. It also bounds what an image is resized "
               "to for the model, refuses aspect ratios beyond 1:100 and band arrays that decode to more than 3 "
               "bytes per pixel of the limit (default: Pillow's limit; 0 = no limit)", ge=0)


def range_text(meta: Any) -> str:
    """``> 0``, ``>= 1``, ``in [0, 1)``: the range a field's metadata declares ('' for none)."""
    lo = (f"{meta['ge']:g}", "[") if meta.get("ge") is not None else (f"{meta['gt']:g}", "(") \
        if meta.get("gt") is not None else None
    hi = (f"{meta['le']:g}", "]") if meta.get("le") is not None else (f"{meta['lt']:g}", ")") \
        if meta.get("lt") is not None else None
    if lo and hi:
        return f"in {lo[1]}{lo[0]}, {hi[0]}{hi[1]}"
    if lo:
        return (">= " if lo[1] == "[" else "> ") + lo[0]
    if hi:
        return ("<= " if hi[1] == "]" else "< ") + hi[0]
    return ""


def _in_range(value: Any, meta: Any) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False
    return not ((meta.get("ge") is not None and value < meta["ge"]) or (meta.get("gt") is not None and value <= meta["gt"])
                or (meta.get("le") is not None and value > meta["le"]) or (meta.get("lt") is not None and value >= meta["lt"]))


def check_ranges(cfg: Any, prefix: str = "") -> None:
    """Raise ConfigError for the first number outside its field's declared range (or not finite),
    naming the command-line flag, the value, the range and the config key."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{key}.")
            continue
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                continue
            if not _in_range(item, f.metadata):
                flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
                rng = range_text(f.metadata)
                finite = "a finite number" + (" " if rng else "") if isinstance(item, float) and not math.isfinite(item) else ""
                raise ConfigError(f"{flag} {item!r}: must be {finite}{rng} ({key})")



@dataclass
class BackboneConfig:
    model: str = opt(
        "facebook/dinov2-small",
        "backbone: a hub id (facebook/dinov2-{small,base,large,giant}, "
        "facebook/dinov2-with-registers-*, facebook/dinov3-{vits16,vits16plus,vitb16,vitl16,vith16plus,"
        "vit7b16}-pretrain-lvd1689m (gated), facebook/dinov3-{vitl16,vit7b16}-pretrain-sat493m), a local "
        "Hugging Face folder, an official DINOv2 / DINOv3 .pth checkpoint, or random:{tiny,small,base,"
        "large,giant}[-reg4] / random:dinov3-{tiny,small,small-plus,base,large,huge-plus,7b} for random "
        "weights (`dinotune models` lists them)",
    )
    image_size: int = opt(224, "input side in pixels; must be a multiple of the backbone's patch size "
                          "(14 for DINOv2, 16 for DINOv3)", gt=0)
    init_seed: int = opt(0, "seed of the random initialisation used by random:* models", ge=0)


@dataclass
class AdapterConfig:
    kind: AdapterKind = opt(
        "lora", "none = frozen backbone (head only), lora / dora through PEFT, full = every weight",
        flag="--adapter",
    )
    rank: int = opt(8, "LoRA / DoRA rank r", ge=1)
    alpha: float = opt(16.0, "LoRA / DoRA scaling alpha (the update is scaled by alpha / r)", gt=0)
    dropout: float = opt(0.0, "dropout on the LoRA / DoRA input", flag="--lora-dropout", ge=0, lt=1)
    targets: list[str] = opt(
        ["attention"],
        "modules to adapt: attention (q,k,v,o projections), qkv, mlp, or module names such as "
        "q_proj fc1 (DINOv2) / q_proj up_proj (DINOv3)",
    )
    last_n_blocks: int = opt(0, "adapt only the last N transformer blocks (0 = all)", ge=0)
    unfreeze_blocks: int = opt(0, "lora / dora: every weight of the last N blocks trains too (ExPLoRA's recipe: "
                               "LoRA below, the last blocks unfrozen)", ge=0)


@dataclass
class OptimConfig:
    lr: float = opt(1e-3, "learning rate of the head", gt=0)
    backbone_lr: float = opt(1e-4, "learning rate of the backbone's adapters (or weights, with full)", ge=0)
    weight_decay: float = opt(0.05, "AdamW weight decay (never applied to norms, biases, tokens)", ge=0)
    schedule: Literal["cosine", "constant", "linear"] = opt("cosine", "learning-rate schedule")
    warmup_epochs: float = opt(1.0, "linear warm-up length in epochs (fractions allowed)", ge=0)
    min_lr_ratio: float = opt(0.0, "final learning rate as a fraction of the peak", ge=0, le=1)
    grad_clip: float = opt(1.0, "clip the gradient norm to this value (0 = off)", ge=0)
    accumulate: int = opt(1, "accumulate gradients over this many batches per optimizer step", ge=1)
    layer_decay: float = opt(
        1.0,
        "layer-wise learning-rate decay (the DINOv2 / BEiT recipe): block i of L (0 = first) trains at "
        "backbone_lr * R^(L - i), the patch embedding and tokens at R^(L + 1), the final norm at backbone_lr; "
        "1 = off. Needs --adapter full, lora or dora",
        gt=0, le=1,
    )


@dataclass
class TrainConfig:
    epochs: int = opt(10, "training epochs (ignored with --two-stage, which sums its stages)", ge=1)
    batch_size: int | Literal["auto"] = opt(
        32, "images per batch; auto (CUDA only) = the largest power of two that fits, found by trial "
        "and saved to the run's config", ge=1,
    )
    two_stage: bool = opt(
        False, "stage 1 trains the head on a frozen backbone, stage 2 unfreezes the adapters"
    )
    stage1_epochs: int = opt(10, "two-stage: epochs of stage 1 (head only)", ge=1)
    stage1_lr: float = opt(1e-3, "two-stage: learning rate of stage 1", gt=0)
    stage2_epochs: int = opt(5, "two-stage: epochs of stage 2 (adapters / backbone unfrozen)", ge=1)
    stage2_lr: float = opt(1e-5, "two-stage: learning rate of stage 2 (head and backbone)", gt=0)
    precision: Precision = opt("auto", "auto = bf16 on CUDA when supported, fp32 elsewhere")
    device: str = device_option()
    threads: int = threads_option()
    seed: int = opt(0, "seed of data order, augmentation and head initialisation", ge=0)
    workers: int = opt(2, "data-loading worker processes (0 = load in the main process)", ge=0)
    eval_every: int = opt(1, "evaluate every N epochs (and always after the last)", ge=1)
    progress: bool = opt(True, "show progress bars")
    grad_checkpointing: bool = opt(
        False, "recompute the backbone blocks' activations during backward instead of keeping them: "
        "less memory, about a third more compute",
    )
    compile: bool = opt(False, "torch.compile the backbone (needs a C++ compiler on the CPU)")
    ema: float = opt(
        0.0, "keep an exponential moving average of the trained weights with this decay (e.g. 0.999) and "
        "evaluate it beside the raw weights each epoch; 0 = off", ge=0, lt=1,
    )
    patience: int = opt(
        0, "early stopping: stop after this many evaluations without an improvement of the monitored "
        "metric by more than --min-delta (0 = off)", ge=0,
    )
    min_delta: float = opt(0.0, "early stopping: the smallest change of the monitored metric that counts "
                           "as an improvement", ge=0)
    monitor: str = opt(
        "auto", "the validation metric that picks checkpoints/best and drives --patience: a key of the "
        "validation metrics (top1, f1_macro, accuracy_balanced, loss, AP, AP50, map50, mIoU, ...); auto = the "
        "task's default (classification: accuracy_balanced when the validation classes are imbalanced, "
        "top1 otherwise; detection: AP, or map50 for --head simple / improved; segmentation: mIoU)",
        metavar="METRIC",
    )
    monitor_mode: Literal["auto", "max", "min"] = opt(
        "auto", "whether a larger (max) or smaller (min) --monitor value is better; auto = min for a loss, "
        "max for the rest"
    )
    report_to: list[str] = opt(
        ["tensorboard"], "where to log besides metrics.jsonl: tensorboard, csv, wandb, mlflow (wandb and "
        "mlflow are optional extras, and log offline unless configured otherwise), or none",
    )
    out: str = opt("runs/run", "run folder (config, metrics, TensorBoard logs, checkpoints)", short="-o")



def validate_common(cfg: Any) -> None:
    """Checks shared by every task config; raises ConfigError naming the key (and the flag)."""
    # that the size is a multiple of the patch size is checked when the backbone is built: the
    # patch size is the model's (DINOv2 14, other families differ)
    check_ranges(cfg)
    bands = getattr(cfg, "bands", None)  # the N-band section (config/bands.py), in every task config
    if bands is not None:
        bands.validate()
    bad = sorted(set(cfg.train.report_to) - set(REPORTERS))
    if bad:
        raise ConfigError(f"--report-to {' '.join(bad)}: not a logger; choose from {', '.join(REPORTERS)} (report_to)")
    if "none" in cfg.train.report_to and len(cfg.train.report_to) > 1:
        raise ConfigError(f"--report-to none cannot be combined with {' '.join(r for r in cfg.train.report_to if r != 'none')}")
    if cfg.optim.layer_decay < 1 and cfg.adapter.kind == "none":
        raise ConfigError("--layer-decay scales the learning rates of backbone weights that train; with "
                          "--adapter none none do: use --adapter full (or lora / dora)")
    if cfg.adapter.unfreeze_blocks and cfg.adapter.kind not in ("lora", "dora"):
        raise ConfigError(f"--unfreeze-blocks unfreezes blocks beside a LoRA / DoRA adapter; with --adapter "
                          f"{cfg.adapter.kind} use --adapter lora (or full, where every block trains)")
    if cfg.train.two_stage and cfg.adapter.kind == "none":
        raise ConfigError(
            "--two-stage unfreezes the adapters in stage 2, so it needs --adapter lora, dora or full"
        )
