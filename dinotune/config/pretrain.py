"""The self-supervised pretraining config (``dinotune pretrain``): unlabelled data, multi-crop, and
DINOv2's objective (DINO's prototypes with Sinkhorn-Knopp centring, iBOT's masked patches, KoLeo),
or the distillation of a frozen teacher backbone.

DINOv2's values are the defaults where they carry over (temperatures, crop scales, mask ratios,
loss weights, momentum 0.992 -> 1); the prototype count and the head width are smaller (65 536 and
2048 in DINOv2, trained on 142M images) because a user's domain set has thousands to millions of
images, and a run of minutes needs a head that learns in minutes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from dinotune.config.bands import BandsConfig
from dinotune.config.base import (
    AdapterConfig,
    BackboneConfig,
    ConfigError,
    OptimConfig,
    TrainConfig,
    max_image_pixels_option,
    opt,
    validate_common,
)


@dataclass
class PretrainDataConfig:
    data: str = opt("", "unlabelled images: a folder in any layout (class and split folders are read as plain "
                    "images), a CSV listing them, .npy / multi-band TIFF band arrays")
    val_data: str = opt("", "labelled train/ and val/ class folders: the k-NN top-1 of the backbone every epoch "
                        "(the usual way to watch self-supervised training)", default_text="none")
    local_crops: int = opt(6, "local crops per image (DINOv2: 8)", ge=0)
    local_size: int = opt(0, "side of a local crop in pixels, a multiple of the patch size (0: 7/16 of "
                          "--image-size, DINOv2's 98 for 224)", ge=0)
    global_scale: float = opt(0.32, "smallest share of the image a global crop covers (local crops cover "
                              "0.05 up to it)", gt=0, lt=1)
    check_images: Literal["full", "fast", "off"] = opt(
        "fast", "check images before training: full = decode every file, fast = headers, off")
    max_image_pixels: int = max_image_pixels_option()


@dataclass
class PretrainObjectiveConfig:
    prototypes: int = opt(4096, "prototypes of the DINO / iBOT head (DINOv2: 65536)", ge=2)
    head_hidden: int = opt(2048, "hidden width of the head's MLP", ge=1)
    head_bottleneck: int = opt(256, "bottleneck width before the prototypes", ge=1)
    student_temperature: float = opt(0.1, "temperature of the student's softmax", gt=0)
    teacher_temperature: float = opt(0.07, "temperature of the teacher's Sinkhorn-Knopp targets after warm-up", gt=0)
    teacher_temperature_start: float = opt(0.04, "the teacher's temperature at the start", gt=0)
    teacher_temperature_warmup: float = opt(0.3, "share of training over which the teacher's temperature rises",
                                            ge=0, le=1)
    momentum: float = opt(0.992, "the teacher's EMA momentum at the start, rising to 1 on a cosine", ge=0, le=1)
    ibot_weight: float = opt(1.0, "weight of iBOT's masked-patch loss (0: off)", ge=0)
    koleo_weight: float = opt(0.1, "weight of the KoLeo regulariser (spreads the class tokens; 0: off)", ge=0)
    mask_ratio_min: float = opt(0.1, "smallest share of patches masked in a masked global crop", ge=0, lt=1)
    mask_ratio_max: float = opt(0.5, "largest share of patches masked", gt=0, lt=1)
    mask_probability: float = opt(0.5, "share of global crops that are masked", ge=0, le=1)
    distill: str = opt("", "a frozen teacher backbone (--model forms) whose class and patch tokens the model "
                       "learns to reproduce, instead of the DINO objective", default_text="off", metavar="TEACHER")
    knn_k: int = opt(20, "neighbours of the k-NN evaluation on --val-data", ge=1)
    knn_temperature: float = opt(0.07, "temperature of the k-NN votes", gt=0)


@dataclass
class PretrainInferenceConfig:
    batch_size: int = opt(32, "images per batch of the k-NN evaluation", flag="--eval-batch-size", ge=1)


@dataclass
class PretrainConfig:
    task: Literal["pretrain"] = "pretrain"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    # every weight trains: continued pretraining of a small backbone, or from random weights;
    # --adapter lora --last-n-blocks N adapts a large one as ExPLoRA does
    adapter: AdapterConfig = field(default_factory=lambda: AdapterConfig(kind="full"))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, backbone_lr=5e-5, weight_decay=0.04,
                                                                   grad_clip=3.0))
    train: TrainConfig = field(default_factory=TrainConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    bands: BandsConfig = field(default_factory=BandsConfig)
    ssl: PretrainObjectiveConfig = field(default_factory=PretrainObjectiveConfig)
    inference: PretrainInferenceConfig = field(default_factory=PretrainInferenceConfig)

    def validate(self) -> None:
        validate_common(self)
        s = self.ssl
        if not self.data.data:
            raise ConfigError("--data is required: the unlabelled images to pretrain on")
        for flag, value in (("--data", self.data.data), ("--val-data", self.data.val_data)):
            if value and not Path(value).expanduser().exists():
                raise ConfigError(f"{flag} {value}: no such folder or file")
        if s.mask_ratio_min > s.mask_ratio_max:
            raise ConfigError(f"--mask-ratio-min {s.mask_ratio_min} is above --mask-ratio-max {s.mask_ratio_max}")
        if self.adapter.kind == "none":
            raise ConfigError("pretraining trains the backbone: use --adapter full, lora or dora (not none)")
        if self.train.two_stage:
            raise ConfigError("--two-stage trains a head before the backbone; pretraining trains both together")
