"""The classification config: data sources, head and loss options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from dinotune.config.bands import BandsConfig
from dinotune.config.base import (
    AdapterConfig,
    BackboneConfig,
    ConfigError,
    OptimConfig,
    Sampler,
    TrainConfig,
    max_image_pixels_option,
    opt,
    validate_common,
)


@dataclass
class ClassifyDataConfig:
    data: str = opt(
        "",
        "training data: a class-folder tree (train/<class>/*, val/<class>/*, or <class>/*), a CSV "
        "of path,label (relative paths are read from the CSV's folder and must stay inside it; absolute "
        "paths are used as written), a save_to_disk folder or a Hugging Face dataset name (hf:NAME)",
    )
    val_data: str = opt("", "validation data in the same forms; empty = the val/ split of --data")
    val_fraction: float = opt(
        0.0, "hold out this fraction of the training data for validation when there is no val split", ge=0, lt=1,
    )
    train_split: str = opt("train", "split name for Hugging Face datasets")
    val_split: str = opt("validation", "validation split name for Hugging Face datasets")
    image_column: str = opt("", "image column of a CSV or dataset (auto-detected when empty)")
    label_column: str = opt("", "label column of a CSV or dataset (auto-detected when empty)")
    augment: bool = opt(True, "random resized crop + horizontal flip on training images")
    check_images: Literal["full", "fast", "off"] = opt(
        "full", "scan images before training: full decodes each (at 1/8 scale), fast reads headers"
    )
    sampler: Sampler = opt("shuffle", "order of training images: shuffle = each once per epoch; balanced = "
                           "every class drawn equally often (weights 1 / class count, with replacement)")
    max_image_pixels: int = max_image_pixels_option()
    class_names: list[str] = opt([], "train on these classes only, in this label order (the other classes' images are "
                                 "left out; default: every class of the data)")
    subset: int = opt(0, "train on a reproducible random subset of N images (0 = all); their paths go to "
                      "RUN/subset.json", ge=0)
    val_subset: int = opt(0, "evaluate on a reproducible random subset of N validation images (0 = all)", ge=0)
    subset_seed: int = opt(0, "seed that picks the subsets", ge=0)


@dataclass
class ClassifyHeadConfig:
    pool: Literal["cls", "cls_mean", "last4"] = opt(
        "cls_mean",
        "features fed to the head: CLS token, CLS + mean patch token, or the last 4 layers' CLS + "
        "mean patch (official DINOv2 linear evaluation)",
    )
    head: Literal["linear", "mlp"] = opt("linear", "linear layer, or an MLP with dropout")
    mlp_hidden: int = opt(1024, "hidden width of the MLP head", ge=1)
    head_dropout: float = opt(0.0, "dropout before each layer of the head", ge=0, lt=1)
    loss: Literal["ce", "focal"] = opt("ce", "cross-entropy, or focal loss for class imbalance")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy", ge=0, lt=1)
    focal_gamma: float = opt(2.0, "focusing parameter of the focal loss", ge=0)
    cache_features: bool = opt(
        False,
        "linear-probe fast path: extract frozen-backbone features once, cache them on disk and "
        "train the head on the cache (needs --adapter none; no training augmentation)",
    )
    cache_dir: str = opt("", "feature cache folder (default: RUN/cache)")


@dataclass
class ClassifyInferenceConfig:
    """Defaults of eval / predict / analyze on a trained run (their flags override them)."""

    batch_size: int = opt(32, "images per batch when evaluating or predicting a trained run",
                          flag="--eval-batch-size", ge=1)
    top_k: int = opt(5, "classes listed per image by predict", ge=1)


@dataclass
class ClassifyConfig:
    task: Literal["classify"] = "classify"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: ClassifyDataConfig = field(default_factory=ClassifyDataConfig)
    bands: BandsConfig = field(default_factory=BandsConfig)
    head: ClassifyHeadConfig = field(default_factory=ClassifyHeadConfig)
    inference: ClassifyInferenceConfig = field(default_factory=ClassifyInferenceConfig)

    @classmethod
    def sweep_rules(cls) -> tuple[tuple[tuple[str, ...], Callable[[Any], bool], Callable[[Any], str]], ...]:
        """For sweeps (``dinotune/sweep/grid.py``): ``(keys, applies(cfg), why not)`` of the settings
        that do nothing under others, so trials differing only in them are one trial."""
        return (
            (("head.mlp_hidden",), lambda c: c.head.head == "mlp",
             lambda c: f"head={c.head.head} (only the mlp head has it)"),
            (("head.focal_gamma",), lambda c: c.head.loss == "focal",
             lambda c: f"loss={c.head.loss} (only the focal loss has it)"),
        )

    def validate(self) -> None:
        validate_common(self)
        if self.head.cache_features and self.adapter.kind != "none":
            raise ConfigError(
                "head.cache_features needs a frozen backbone (--adapter none); "
                f"got --adapter {self.adapter.kind}"
            )
        if self.head.cache_features and self.train.two_stage:
            raise ConfigError("head.cache_features cannot be combined with --two-stage")
