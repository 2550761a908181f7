"""The segmentation config: data layouts, decoders and inference."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

from dinotune.config.bands import BandsConfig
from dinotune.config.tiling import TilePredictOptions
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
from dinotune.config.scene import SceneDataFields


@dataclass
class SegmentDataConfig(SceneDataFields):  # fields: the scene's (config/scene.py), then these
    data: str = opt(
        "",
        "training data: Pascal VOC (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/), ADE20K "
        "(images/training, annotations/training), folders of images/ + masks/ with matching stems (or "
        "train/ and val/ each holding them), a COCO instances JSON / folder rasterised to semantic masks, or a "
        "scene (GeoTIFF, .npy ...) with --labels",
    )
    val_data: str = opt("", "validation data in the same forms; empty = the val split of --data")
    val_fraction: float = opt(0.0, "a scene (--labels): the fraction of its blocks held out for validation", ge=0,
                              lt=1)
    train_images: str = opt("", "COCO: image folder of the training JSON (auto-detected when empty)")
    val_images: str = opt("", "COCO: image folder of the validation JSON (auto-detected when empty)")
    num_classes: int = opt(
        0, "number of classes, for VOC, ADE20K and image/mask folder layouts (0 = from the data: the largest "
        "mask label + 1, or Pascal VOC's 21 when the labels reach 20, or ADE20K's 150; COCO: refused, its "
        "classes are the JSON's categories)", ge=0,
    )
    class_names: list[str] = opt(
        [], "class names in label order, for VOC, ADE20K and image/mask folder layouts (default: Pascal's / "
        "ADE20K's names where the classes are theirs, else class_<i>; COCO: refused)",
    )
    ignore_index: int = opt(255, "mask value excluded from the loss and the metrics", ge=0, le=255)
    mask_colors: str = opt(
        "", "colour table of colour-coded masks (VOC or images/ + masks/ layouts, a colour per class): a JSON file "
        "{\"road\": [128, 64, 128] or \"#804080\", ...} or a CSV of name,r,g,b / name,#rrggbb lines, in label order; "
        "it names the classes, and mask colours not in it are reported and ignored. Saved with the run (eval and "
        "predict use it). Colour masks without it are refused, listing their colours and a table to fill in",
        metavar="FILE", default_text="masks hold class indices",
    )
    subset: int = opt(0, "train on a reproducible random subset of N images (0 = all); names go to RUN/subset.json", ge=0)
    val_subset: int = opt(0, "evaluate on a reproducible random subset of N validation images (0 = all)", ge=0)
    subset_seed: int = opt(0, "seed that picks the subsets", ge=0)
    augment: bool = opt(True, "random scale, crop and horizontal flip; masks use nearest neighbour")
    scale_range: list[float] = opt([0.5, 2.0], "augmentation: random scale of the short side, as factors of "
                                   "--image-size (min max)", gt=0)
    overfit: int = opt(0, "debug mode: train and evaluate on the first N training images", ge=0)
    check_images: Literal["full", "fast", "off"] = opt(
        "fast", "scan images before training: full decodes each, fast reads headers; masks are always read "
        "whole, once, to check their size and labels (off: checked when first used)"
    )
    max_image_pixels: int = max_image_pixels_option()


@dataclass
class SegmentModelConfig:
    decoder: Literal["linear", "fpn"] = opt(
        "linear", "linear = BatchNorm + 1x1 conv on patch tokens; fpn = multi-level features, lateral + "
        "top-down path, fused and upsampled"
    )
    linear_layers: int = opt(
        1, "linear decoder: use the last N layers' patch tokens, concatenated (4 = the official DINOv2 "
        "linear segmentation evaluation)", ge=1,
    )
    fpn_layers: list[int] = opt([], "fpn decoder: 0-based block indices to read (empty = 4 evenly spaced)")
    fpn_dim: int = opt(256, "fpn decoder: channel width", ge=2)
    inference: Literal["whole", "slide"] = opt(
        "whole", "evaluation: whole = resize the short side to --image-size; slide = windows of "
        "--image-size over the full-resolution image, logits averaged"
    )
    slide_stride: int = opt(0, "sliding-window stride in pixels, a multiple of the patch size (0 = two thirds "
                            "of --image-size, rounded down to one)", ge=0)


@dataclass
class SegmentLossConfig:
    class_weights: list[float] = opt([], "per-class cross-entropy weights, in label order (empty = equal)", ge=0)


@dataclass
class SegmentInferenceConfig:
    """Defaults of eval / predict / analyze on a trained run (their flags override them)."""

    batch_size: int = opt(4, "images per batch when evaluating a trained run (slide inference: 1)",
                          flag="--eval-batch-size", ge=1)
    window_batch: int = opt(8, "slide inference: windows forwarded at once", ge=1)



@dataclass
class SegmentPredictOptions(TilePredictOptions):
    """Options of ``dinotune predict`` on a segmentation run besides its inference section (the
    keyword options of ``SegmentTask.predict`` and ``SegmentRuntime``)."""

    masks: str = opt("", "write each label map as a palette PNG (pixel values = class indices, coloured with the "
                     "run's --mask-colors table if it had one) into DIR",
                     metavar="DIR", default_text="not written")
    draw: str = opt("", "write colour overlays, with a legend of the classes present, into DIR", metavar="DIR",
                    default_text="not drawn")
    out: str = opt("", "--tile: the label GeoTIFF of the scene (one scene; predict's --out FILE.tif)",
                   default_text="DIR/<scene>.tif of --masks")

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
    bands: BandsConfig = field(default_factory=BandsConfig)
    model: SegmentModelConfig = field(default_factory=SegmentModelConfig)
    loss: SegmentLossConfig = field(default_factory=SegmentLossConfig)
    inference: SegmentInferenceConfig = field(default_factory=SegmentInferenceConfig)
    # what predict takes besides the inference section (a ClassVar: not a key of the saved config)
    predict_options: ClassVar[type] = SegmentPredictOptions

    @classmethod
    def sweep_rules(cls) -> tuple[tuple[tuple[str, ...], Callable[[Any], bool], Callable[[Any], str]], ...]:
        """For sweeps (``dinotune/sweep/grid.py``): ``(keys, applies(cfg), why not)`` of the settings
        that do nothing under others, so trials differing only in them are one trial."""
        return (
            (("model.linear_layers",), lambda c: c.model.decoder == "linear", lambda c: f"decoder={c.model.decoder}"),
            (("model.fpn_layers", "model.fpn_dim"), lambda c: c.model.decoder == "fpn",
             lambda c: f"decoder={c.model.decoder}"),
        )

    def validate(self) -> None:
        validate_common(self)
        d = self.data
        d.check_scene({"--val-data": d.val_data, "--train-images": d.train_images, "--val-images": d.val_images,
                       "--subset": d.subset, "--val-subset": d.val_subset, "--overfit": d.overfit,
                       "--mask-colors": d.mask_colors})
        if d.val_fraction and not d.scene_requested():
            raise ConfigError(f"--val-fraction {d.val_fraction:g} holds out blocks of a scene (--labels); a dataset "
                              "names its validation split (or --val-data)")
        lo_hi = self.data.scale_range
        if len(lo_hi) != 2 or not lo_hi[0] <= lo_hi[1]:
            raise ConfigError(f"--scale-range {' '.join(map(str, lo_hi))}: give two factors, min <= max")
