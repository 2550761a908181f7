"""Typed run configuration: the one place where defaults live.

Every task config is a tree of dataclasses. Each leaf field carries its help text (and, optionally,
its command-line flag) in ``metadata``, so the CLI, the YAML file saved in every run folder and the
Python API all read the same defaults.

Precedence when a run is configured: dataclass defaults < ``--config FILE.yaml`` < ``--set a.b=v``
< explicit flags.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

PATCH_SIZE = 14

AdapterKind = Literal["none", "lora", "dora", "full"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the valid choices."""


def opt(default: Any, help: str, flag: str | None = None, short: str | None = None) -> Any:
    """A config field with its help text; ``flag`` overrides the derived ``--field-name``."""
    meta = {"help": help, "flag": flag, "short": short}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------- sections
@dataclass
class BackboneConfig:
    model: str = opt(
        "facebook/dinov2-small",
        "backbone: a hub id (facebook/dinov2-{small,base,large,giant}, "
        "facebook/dinov2-with-registers-*), a local Hugging Face folder, an official DINOv2 .pth "
        "checkpoint, or random:{tiny,small,base,large,giant}[-reg4] for random weights",
    )
    image_size: int = opt(224, "input side in pixels; must be a multiple of 14")
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


# --------------------------------------------------------------------------------- classification
@dataclass
class ClassifyDataConfig:
    data: str = opt(
        "",
        "training data: a class-folder tree (train/<class>/*, val/<class>/*, or <class>/*), a CSV "
        "of path,label, a save_to_disk folder or a Hugging Face dataset name (hf:NAME)",
    )
    val_data: str = opt("", "validation data in the same forms; empty = the val/ split of --data")
    val_fraction: float = opt(
        0.0, "hold out this fraction of the training data for validation when there is no val split"
    )
    train_split: str = opt("train", "split name for Hugging Face datasets")
    val_split: str = opt("validation", "validation split name for Hugging Face datasets")
    image_column: str = opt("", "image column of a CSV or dataset (auto-detected when empty)")
    label_column: str = opt("", "label column of a CSV or dataset (auto-detected when empty)")
    augment: bool = opt(True, "random resized crop + horizontal flip on training images")
    check_images: Literal["full", "fast", "off"] = opt(
        "full", "scan images before training: full decodes each (at 1/8 scale), fast reads headers"
    )


@dataclass
class ClassifyHeadConfig:
    pool: Literal["cls", "cls_mean", "last4"] = opt(
        "cls_mean",
        "features fed to the head: CLS token, CLS + mean patch token, or the last 4 layers' CLS + "
        "mean patch (official DINOv2 linear evaluation)",
    )
    head: Literal["linear", "mlp"] = opt("linear", "linear layer, or an MLP with dropout")
    mlp_hidden: int = opt(1024, "hidden width of the MLP head")
    head_dropout: float = opt(0.0, "dropout before each layer of the head")
    loss: Literal["ce", "focal"] = opt("ce", "cross-entropy, or focal loss for class imbalance")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy")
    focal_gamma: float = opt(2.0, "focusing parameter of the focal loss")
    cache_features: bool = opt(
        False,
        "linear-probe fast path: extract frozen-backbone features once, cache them on disk and "
        "train the head on the cache (needs --adapter none; no training augmentation)",
    )
    cache_dir: str = opt("", "feature cache folder (default: RUN/cache)")


@dataclass
class ClassifyConfig:
    task: Literal["classify"] = "classify"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)
    head: ClassifyHeadConfig = field(default_factory=ClassifyHeadConfig)

    def validate(self) -> None:
        validate_common(self)
        if self.head.cache_features and self.adapter.kind != "none":
            raise ConfigError(
                "head.cache_features needs a frozen backbone (--adapter none); "
                f"got --adapter {self.adapter.kind}"
            )
        if self.head.cache_features and self.train.two_stage:
            raise ConfigError("head.cache_features cannot be combined with --two-stage")


# ------------------------------------------------------------------------------------- detection
@dataclass
class DetectDataConfig:
    data: str = opt(
        "",
        "training data: a COCO folder (annotations/instances_train*.json + image folders), a COCO "
        "instances JSON, or a YOLO folder (data.yaml, images/, labels/)",
    )
    val_data: str = opt("", "validation data in the same forms; empty = the val split of --data")
    train_images: str = opt("", "COCO: image folder of the training JSON (auto-detected when empty)")
    val_images: str = opt("", "COCO: image folder of the validation JSON (auto-detected when empty)")
    subset: int = opt(0, "train on a reproducible random subset of N images (0 = all)")
    subset_seed: int = opt(0, "seed that picks the --subset images")
    subset_file: str = opt("", "reuse the image ids of an earlier run's subset.json")
    val_subset: int = opt(0, "evaluate on a reproducible random subset of N validation images (0 = all)")
    overfit: int = opt(
        0, "debug mode: train and evaluate on the first N training images, to prove the model can fit them"
    )
    augment: bool = opt(True, "box-aware horizontal flip, scale jitter and random crop on training images")
    min_box_size: float = opt(1.0, "drop boxes narrower or lower than this many pixels (after clamping)")
    check_images: Literal["full", "fast", "off"] = opt(
        "fast", "scan images before training: full decodes each, fast reads headers"
    )


@dataclass
class DetectModelConfig:
    head: Literal["detr", "simple", "improved"] = opt(
        "detr",
        "detr = multi-scale deformable DETR decoder; simple / improved = the seeds' one-object-per-image "
        "detectors (class + box from the CLS token; improved turns on --two-stage unless told otherwise)",
    )
    lightweight: bool = opt(
        False,
        "preset: dinov2-small, 2 decoder layers, 25 queries, width 128, 2 sampling points, LoRA on the "
        "last 4 blocks (flags given explicitly still win)",
    )
    num_queries: int = opt(100, "object queries (maximum detections per image)")
    decoder_layers: int = opt(6, "decoder layers, each with its own weights and box refinement")
    hidden_dim: int = opt(256, "decoder width")
    num_heads: int = opt(8, "attention heads in the decoder")
    ffn_dim: int = opt(1024, "decoder feed-forward width")
    sampling_points: int = opt(4, "deformable-attention sampling points per head and level")
    pyramid_scales: list[float] = opt(
        [2.0, 1.0, 0.5],
        "feature-pyramid levels as scale factors of the 1/14 patch map (2 = stride 7, 0.5 = stride 28)",
    )
    decoder_dropout: float = opt(0.0, "dropout in the decoder")
    topk: int = opt(100, "detections kept per image after post-processing (top-k over queries x classes)")
    score_threshold: float = opt(0.0, "drop detections scoring below this (0 keeps all top-k, as COCO AP wants)")


@dataclass
class DetectLossConfig:
    class_weight: float = opt(2.0, "weight of the sigmoid focal classification loss (and its matching cost)")
    bbox_weight: float = opt(5.0, "weight of the L1 box loss (and its matching cost)")
    giou_weight: float = opt(2.0, "weight of the GIoU box loss (and its matching cost)")
    focal_alpha: float = opt(0.25, "focal-loss alpha")
    focal_gamma: float = opt(2.0, "focal-loss gamma")
    aux_loss: bool = opt(True, "losses at every decoder layer, not only the last")
    box_loss_weight: float = opt(
        2.0, "improved head: weight of the smooth-L1 box loss against the focal class loss (simple uses 1)"
    )


def _detect_optim() -> OptimConfig:
    # DETR-family recipe: small decoder lr, smaller backbone lr, tight clipping
    return OptimConfig(lr=2e-4, backbone_lr=2e-5, weight_decay=1e-4, grad_clip=0.1)


def _detect_train() -> TrainConfig:
    return TrainConfig(epochs=50, batch_size=8)


def _detect_backbone() -> BackboneConfig:
    return BackboneConfig(image_size=518)


@dataclass
class DetectConfig:
    task: Literal["detect"] = "detect"
    backbone: BackboneConfig = field(default_factory=_detect_backbone)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=_detect_optim)
    train: TrainConfig = field(default_factory=_detect_train)
    data: DetectDataConfig = field(default_factory=DetectDataConfig)
    model: DetectModelConfig = field(default_factory=DetectModelConfig)
    loss: DetectLossConfig = field(default_factory=DetectLossConfig)

    def validate(self) -> None:
        validate_common(self)
        m = self.model
        if m.hidden_dim % m.num_heads:
            raise ConfigError(f"model.hidden_dim={m.hidden_dim} must be divisible by model.num_heads={m.num_heads}")
        if not m.pyramid_scales or any(s not in (4.0, 2.0, 1.0, 0.5, 0.25) for s in m.pyramid_scales):
            raise ConfigError(f"model.pyramid_scales={m.pyramid_scales}: use values from 4, 2, 1, 0.5, 0.25")
        if m.num_queries < 1 or m.decoder_layers < 1:
            raise ConfigError("model.num_queries and model.decoder_layers must be at least 1")


# ---------------------------------------------------------------------------------- segmentation
@dataclass
class SegmentDataConfig:
    data: str = opt(
        "",
        "training data: Pascal VOC (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/), ADE20K "
        "(images/training, annotations/training), folders of images/ + masks/ with matching stems (or "
        "train/ and val/ each holding them), or a COCO instances JSON / folder rasterised to semantic masks",
    )
    val_data: str = opt("", "validation data in the same forms; empty = the val split of --data")
    train_images: str = opt("", "COCO: image folder of the training JSON (auto-detected when empty)")
    val_images: str = opt("", "COCO: image folder of the validation JSON (auto-detected when empty)")
    num_classes: int = opt(0, "image/mask folders: number of classes (0 = largest label in the masks + 1)")
    class_names: list[str] = opt([], "image/mask folders: class names, in label order")
    ignore_index: int = opt(255, "mask value excluded from the loss and the metrics")
    subset: int = opt(0, "train on a reproducible random subset of N images (0 = all); names go to RUN/subset.json")
    val_subset: int = opt(0, "evaluate on a reproducible random subset of N validation images (0 = all)")
    subset_seed: int = opt(0, "seed that picks the subsets")
    augment: bool = opt(True, "random scale (0.5-2x), crop and horizontal flip; masks use nearest neighbour")
    overfit: int = opt(0, "debug mode: train and evaluate on the first N training images")
    check_images: Literal["full", "fast", "off"] = opt(
        "fast", "scan images before training: full decodes each, fast reads headers"
    )


@dataclass
class SegmentModelConfig:
    decoder: Literal["linear", "fpn"] = opt(
        "linear", "linear = BatchNorm + 1x1 conv on patch tokens; fpn = multi-level features, lateral + "
        "top-down path, fused and upsampled"
    )
    linear_layers: int = opt(
        1, "linear decoder: use the last N layers' patch tokens, concatenated (4 = the official DINOv2 "
        "linear segmentation evaluation)"
    )
    fpn_layers: list[int] = opt([], "fpn decoder: 0-based block indices to read (empty = 4 evenly spaced)")
    fpn_dim: int = opt(256, "fpn decoder: channel width")
    inference: Literal["whole", "slide"] = opt(
        "whole", "evaluation: whole = resize the short side to --image-size; slide = windows of "
        "--image-size over the full-resolution image, logits averaged"
    )
    slide_stride: int = opt(0, "sliding-window stride in pixels (0 = two thirds of --image-size)")


@dataclass
class SegmentLossConfig:
    class_weights: list[float] = opt([], "per-class cross-entropy weights, in label order (empty = equal)")


def _segment_train() -> TrainConfig:
    return TrainConfig(epochs=50, batch_size=8)


def _segment_backbone() -> BackboneConfig:
    return BackboneConfig(image_size=448)


@dataclass
class SegmentConfig:
    task: Literal["segment"] = "segment"
    backbone: BackboneConfig = field(default_factory=_segment_backbone)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=_segment_train)
    data: SegmentDataConfig = field(default_factory=SegmentDataConfig)
    model: SegmentModelConfig = field(default_factory=SegmentModelConfig)
    loss: SegmentLossConfig = field(default_factory=SegmentLossConfig)

    def validate(self) -> None:
        validate_common(self)
        if self.model.linear_layers < 1:
            raise ConfigError("model.linear_layers must be at least 1")
        if not 0 <= self.data.ignore_index <= 255:
            raise ConfigError(f"data.ignore_index={self.data.ignore_index} must be in 0..255 (masks are 8-bit)")


# What --lightweight sets (the seeds' "lightweight" detector); explicit flags are applied after it.
LIGHTWEIGHT_PRESET: dict[str, Any] = {
    "backbone.model": "facebook/dinov2-small",
    "model.decoder_layers": 2,
    "model.num_queries": 25,
    "model.hidden_dim": 128,
    "model.num_heads": 4,
    "model.ffn_dim": 512,
    "model.sampling_points": 2,
    "adapter.kind": "lora",
    "adapter.last_n_blocks": 4,
}


def apply_presets(cfg: Any, explicit: dict[str, Any]) -> Any:
    """Expand ``--lightweight`` when it is among the explicit overrides, without touching the other
    keys the user set explicitly. (A saved config.yaml already holds the expanded values.)"""
    if coerce(explicit.get("model.lightweight", False), bool, "model.lightweight"):
        for key, value in LIGHTWEIGHT_PRESET.items():
            if key not in explicit:
                set_dotted(cfg, key, value)
    # the seeds' "improved" detector is defined by its two-stage freeze-then-unfreeze schedule
    if explicit.get("model.head") == "improved" and "train.two_stage" not in explicit:
        set_dotted(cfg, "train.two_stage", True)
    return cfg


TASK_CONFIGS: dict[str, type] = {"classify": ClassifyConfig, "detect": DetectConfig, "segment": SegmentConfig}


def validate_common(cfg: Any) -> None:
    """Checks shared by every task config; raises ConfigError naming the key."""
    size = cfg.backbone.image_size
    if size <= 0 or size % PATCH_SIZE:
        lower = max(PATCH_SIZE, size // PATCH_SIZE * PATCH_SIZE)
        raise ConfigError(
            f"backbone.image_size={size} is not a multiple of the patch size {PATCH_SIZE}; "
            f"try {lower} or {lower + PATCH_SIZE}"
        )
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


# ------------------------------------------------------------------------------ dict / YAML in-out
def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a command line string) to the annotated type ``tp``."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(value, args[0], key)
    if origin is list:
        (inner,) = get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [coerce(v, inner, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}") from None
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build the dataclass ``cls`` from a nested dict, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown config key {full!r}; valid keys: {', '.join(known)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value or {}, prefix=f"{full}.")
        else:
            kwargs[key] = coerce(value, tp, full)
    return cls(**kwargs)


def save_yaml(cfg: Any, path: str | Path) -> None:
    from dinotune.utils import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_yaml(path: str | Path, cls: type | None = None) -> Any:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if cls is None:
        task = data.get("task", "classify")
        if task not in TASK_CONFIGS:
            raise ConfigError(f"{path}: unknown task {task!r}; valid: {', '.join(TASK_CONFIGS)}")
        cls = TASK_CONFIGS[task]
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def leaf_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """All leaf fields of a config tree as ``(dotted.key, field, annotated type)``."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(leaf_fields(tp, f"{prefix}{f.name}."))
        else:
            out.append((f"{prefix}{f.name}", f, tp))
    return out


def set_dotted(cfg: Any, key: str, value: Any) -> None:
    """Set ``a.b.c`` on a config tree, coercing ``value`` to the field's type."""
    *parents, last = key.split(".")
    obj = cfg
    for p in parents:
        if not hasattr(obj, p) or not dataclasses.is_dataclass(getattr(obj, p)):
            raise ConfigError(f"unknown config key {key!r}")
        obj = getattr(obj, p)
    hints = typing.get_type_hints(type(obj))
    if last not in hints or dataclasses.is_dataclass(hints[last]):
        raise ConfigError(f"unknown config key {key!r}")
    setattr(obj, last, coerce(value, hints[last], key))


def apply_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    for key, value in overrides.items():
        set_dotted(cfg, key, value)
    return cfg


def flag_name(key: str, f: dataclasses.Field) -> str:
    """The command-line flag of a leaf field: its ``metadata['flag']`` or ``--<field-name>``."""
    return f.metadata.get("flag") or "--" + key.rsplit(".", 1)[-1].replace("_", "-")


def flag_map(cls: type) -> dict[str, str]:
    """``{"--adapter": "adapter.kind", "--rank": "adapter.rank", ...}`` for a task config class."""
    out: dict[str, str] = {}
    for key, f, _ in leaf_fields(cls):
        if key == "task":
            continue
        flag = flag_name(key, f)
        if flag in out:
            raise AssertionError(f"two config fields share the flag {flag}: {out[flag]} and {key}")
        out[flag] = key
    return out


def build_config(task: str, base: Any = None, **kwargs: Any) -> Any:
    """A task config from defaults (or ``base``: a config, a dict, or a YAML path) plus keyword
    overrides named like the CLI flags (``adapter="lora", rank=16, image_size=448``) or dotted
    keys passed as a dict (``**{"optim.lr": 1e-3}``)."""
    if task not in TASK_CONFIGS:
        raise ConfigError(f"unknown task {task!r}; valid: {', '.join(TASK_CONFIGS)}")
    cls = TASK_CONFIGS[task]
    if base is None:
        cfg = cls()
    elif isinstance(base, cls):
        cfg = from_dict(cls, to_dict(base))
    elif isinstance(base, dict):
        cfg = from_dict(cls, base)
    else:
        cfg = load_yaml(base, cls)
    names = {flag.lstrip("-").replace("-", "_"): key for flag, key in flag_map(cls).items()}
    explicit = {}
    for name, value in kwargs.items():
        key = name if "." in name else names.get(name)
        if key is None:
            raise ConfigError(f"unknown option {name!r}; valid: {', '.join(sorted(names))}")
        explicit[key] = value
    apply_overrides(cfg, explicit)
    return apply_presets(cfg, explicit)
