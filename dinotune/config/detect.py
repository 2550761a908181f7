"""The detection config (DETR-style and single-object heads) and the --lightweight preset."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

from dinotune.config.bands import BandsConfig
from dinotune.config.tiling import TiledBoxOptions
from dinotune.config.base import (
    PYRAMID_SCALES,
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
from dinotune.config.io import coerce, set_dotted
from dinotune.config.scene import SceneDataFields


@dataclass
class DetectDataConfig(SceneDataFields):  # fields: the scene's (config/scene.py), then these
    data: str = opt(
        "",
        "training data: a COCO folder (annotations/instances_train*.json + image folders; a Roboflow COCO export's "
        "train/ valid/ test/ with _annotations.coco.json), a COCO instances JSON, a YOLO folder (data.yaml, "
        "images/, labels/), a Pascal VOC folder (Annotations/*.xml + JPEGImages/, splits from ImageSets/Main), or "
        "a scene (GeoTIFF, .npy ...) with --labels",
    )
    val_data: str = opt("", "validation data in the same forms; empty = the val split of --data")
    val_fraction: float = opt(
        0.0, "Pascal VOC folders without ImageSets/Main/val.txt: hold out this fraction of the training images for "
        "validation (drawn with --seed); a scene (--labels): the fraction of its blocks held out for validation",
        ge=0, lt=1,
    )
    train_images: str = opt("", "COCO: image folder of the training JSON (auto-detected when empty)")
    val_images: str = opt("", "COCO: image folder of the validation JSON (auto-detected when empty)")
    subset: int = opt(0, "train on a reproducible random subset of N images (0 = all)", ge=0)
    subset_seed: int = opt(0, "seed that picks the --subset images", ge=0)
    subset_file: str = opt("", "reuse the image ids of an earlier run's subset.json")
    val_subset: int = opt(0, "evaluate on a reproducible random subset of N validation images (0 = all)", ge=0)
    overfit: int = opt(
        0, "debug mode: train and evaluate on the first N training images, to prove the model can fit them", ge=0,
    )
    augment: bool = opt(True, "box-aware horizontal flip, scale jitter and random crop on training images")
    min_box_size: float = opt(1.0, "drop boxes narrower or lower than this many pixels (after clamping)", ge=0)
    check_images: Literal["full", "fast", "off"] = opt(
        "fast", "scan images before training: full decodes each, fast reads headers"
    )
    sampler: Sampler = opt("shuffle", "order of training images: shuffle = each once per epoch; balanced = "
                           "images drawn by the rarest class they contain (weight 1 / that class's image count, with replacement)")
    max_image_pixels: int = max_image_pixels_option()


@dataclass
class DetrDecoderFields:
    """The DETR-style decoder's sizes (detection's and instance segmentation's model sections)."""

    lightweight: bool = opt(
        False,
        "preset: dinov2-small, 2 decoder layers, 25 queries, width 128, 2 sampling points, LoRA on the "
        "last 4 blocks (flags given explicitly still win)",
    )
    num_queries: int = opt(100, "object queries (maximum detections per image)", ge=1)
    decoder_layers: int = opt(6, "decoder layers, each with its own weights and box refinement", ge=1)
    hidden_dim: int = opt(256, "decoder width", ge=4)
    num_heads: int = opt(8, "attention heads in the decoder", ge=1)
    ffn_dim: int = opt(1024, "decoder feed-forward width", ge=1)
    sampling_points: int = opt(4, "deformable-attention sampling points per head and level", ge=1)
    pyramid_scales: list[float] = opt(
        [2.0, 1.0, 0.5],
        "feature-pyramid levels as scale factors of the patch map (with 14-pixel patches: 2 = stride 7, "
        "0.5 = stride 28)", gt=0,
    )
    decoder_dropout: float = opt(0.0, "dropout in the decoder", ge=0, lt=1)


@dataclass
class RcnnFields:
    """The R-CNN heads' settings (Faster R-CNN for detection, Mask R-CNN for instance segmentation)."""

    rcnn_anchor_scales: list[float] = opt(
        [2.0, 4.0, 8.0], "fasterrcnn / maskrcnn: anchor sides in strides of each pyramid level (with 14-pixel patches and "
        "--pyramid-scales 2 1 0.5: 14..224 pixels; COCO's many small objects want the small ones)", gt=0)
    rcnn_aspect_ratios: list[float] = opt([0.5, 1.0, 2.0], "fasterrcnn / maskrcnn: anchor aspect ratios (height / width)", gt=0)
    rcnn_rpn_batch: int = opt(256, "fasterrcnn / maskrcnn (and --baseline): anchors sampled per image for the proposal-network loss", ge=1)
    rcnn_roi_batch: int = opt(512, "fasterrcnn / maskrcnn (and --baseline): proposals sampled per image for the box-head loss", ge=1)
    rcnn_score_threshold: float = opt(
        0.05, "fasterrcnn / maskrcnn (and --baseline): drop class scores below this before NMS (torchvision's default)", ge=0, lt=1)


@dataclass
class DetectModelConfig(RcnnFields, DetrDecoderFields):  # fields: the decoder's, the R-CNN's, then these
    head: Literal["detr", "simple", "improved", "fasterrcnn"] = opt(
        "detr",
        "detr = multi-scale deformable DETR decoder; simple / improved = single-object detectors, one "
        "class and one box per image from the CLS token (improved turns on --two-stage unless told otherwise); "
        "fasterrcnn = torchvision's Faster R-CNN (RPN + RoI heads) on the simple feature pyramid (ViTDet)",
    )
    single_hidden: int = opt(256, "improved single-object head: hidden width of its MLPs", ge=2)
    single_dropout: float = opt(0.3, "improved single-object head: dropout inside its MLPs", ge=0, lt=1)
    baseline: Literal["none", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn"] = opt(
        "none",
        "train a plain torchvision Faster R-CNN instead of a DINOv2 detector, to compare against (implies "
        "--head fasterrcnn, --adapter none and a never-run random:tiny placeholder as --model)",
    )
    baseline_weights: str = opt(
        "", "--baseline: initial weights: empty = random, DEFAULT = torchvision's COCO weights (downloaded), "
        "or a .pth state dict of the same torchvision model",
    )


@dataclass
class SetLossFields:
    """The DETR set loss's weights (and its matcher's costs)."""

    class_weight: float = opt(2.0, "weight of the sigmoid focal classification loss (and its matching cost)", ge=0)
    bbox_weight: float = opt(5.0, "weight of the L1 box loss (and its matching cost)", ge=0)
    giou_weight: float = opt(2.0, "weight of the GIoU box loss (and its matching cost)", ge=0)
    focal_alpha: float = opt(0.25, "focal-loss alpha", ge=0, le=1)
    focal_gamma: float = opt(2.0, "focal-loss gamma", ge=0)
    aux_loss: bool = opt(True, "losses at every decoder layer, not only the last")


@dataclass
class DetectLossConfig(SetLossFields):
    box_loss_weight: float = opt(
        2.0, "improved head: weight of the smooth-L1 box loss against the focal class loss (simple uses 1)", ge=0,
    )


@dataclass
class DetectInferenceConfig:
    """Post-processing, and the defaults of eval / predict / analyze / compare on a trained run."""

    batch_size: int = opt(8, "images per batch when evaluating or predicting a trained run",
                          flag="--eval-batch-size", ge=1)
    top_k: int = opt(100, "detections kept per image after post-processing (top-k over queries x classes); COCO AP "
                     "wants 100", ge=1)
    score_threshold: float = opt(0.0, "drop detections scoring below this (0 keeps all top-k, as COCO AP wants)", ge=0, le=1)
    draw_threshold: float = opt(
        0.3, "what a person reads shows the detections scoring at least this: predict's JSON records and CSV rows, "
        "--draw drawings, analyze, the server's page (COCO results for evaluation keep every top-k detection)",
        ge=0, le=1)
    compare_image_size: int = opt(640, "compare: inference size of the YOLO baselines", ge=1)
    category_ids: Literal["coco", "yolo"] = opt(
        "coco",
        "category_id written by predict: coco = the dataset's category ids (COCO data: its own ids; YOLO data: "
        "class index + 1, as COCO tools need ids from 1); yolo = the 0-based class index (the position in "
        "data.yaml names)",
    )



@dataclass
class DetectPredictOptions(TiledBoxOptions):
    """Options of ``dinotune predict`` on a detection run besides its inference section (the
    keyword options of ``DetectTask.predict`` and, ``image_info`` only, of ``DetectRuntime``)."""

    draw: str = opt("", "write each image with its boxes, and confidence_histogram.png, into DIR", metavar="DIR",
                    default_text="not drawn")
    image_info: str = opt("", "COCO image-info JSON (e.g. image_info_test-dev2017.json) giving image ids",
                          metavar="JSON", default_text="numeric file names, else 1..N")

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
    bands: BandsConfig = field(default_factory=BandsConfig)
    model: DetectModelConfig = field(default_factory=DetectModelConfig)
    loss: DetectLossConfig = field(default_factory=DetectLossConfig)
    inference: DetectInferenceConfig = field(default_factory=DetectInferenceConfig)
    # what predict takes besides the inference section (a ClassVar: not a key of the saved config)
    predict_options: ClassVar[type] = DetectPredictOptions

    @classmethod
    def sweep_rules(cls) -> tuple[tuple[tuple[str, ...], Callable[[Any], bool], Callable[[Any], str]], ...]:
        """For sweeps (``dinotune/sweep/grid.py``): ``(keys, applies(cfg), why not)`` of the settings
        that do nothing under others, so trials differing only in them are one trial."""
        detr = ("model.num_queries", "model.decoder_layers", "model.hidden_dim", "model.num_heads", "model.ffn_dim",
                "model.sampling_points", "model.pyramid_scales", "model.decoder_dropout")
        return (
            (detr, lambda c: c.model.head == "detr", lambda c: f"head={c.model.head} (only the DETR decoder has it)"),
            (("model.single_hidden", "model.single_dropout", "loss.box_loss_weight"),
             lambda c: c.model.head == "improved",
             lambda c: f"head={c.model.head} (only the improved single-object head has it)"),
        )

    def apply_presets(self, explicit: dict[str, Any]) -> None:
        """Expand ``--lightweight``, ``--baseline`` and ``--head improved`` among the ``explicit``
        overrides (dotted keys -> values) without touching the other keys the user set."""
        if coerce(explicit.get("model.lightweight", False), bool, "model.lightweight"):
            _preset(self, LIGHTWEIGHT_PRESET, explicit)
        # a --baseline replaces the DINOv2 detector: its head, no adapter, a placeholder backbone
        if explicit.get("model.baseline", "none") != "none":
            _preset(self, BASELINE_PRESET, explicit)
        # the "improved" single-object detector is defined by its two-stage freeze-then-unfreeze schedule
        if explicit.get("model.head") == "improved" and "train.two_stage" not in explicit:
            set_dotted(self, "train.two_stage", True)

    def validate(self) -> None:
        validate_common(self)
        check_scene_data(self.data)
        m = self.model
        validate_detr(m, self.loss)
        if m.baseline != "none":
            _validate_baseline(self)
        elif m.baseline_weights:
            raise ConfigError(f"--baseline-weights {m.baseline_weights}: only used with --baseline; add --baseline "
                              "fasterrcnn_resnet50_fpn_v2 (or the MobileNet one) or drop it")


def check_scene_data(d: DetectDataConfig) -> None:
    """Detection's and instance segmentation's flags that do not go with a scene (``--labels``)."""
    d.check_scene({"--val-data": d.val_data, "--train-images": d.train_images, "--val-images": d.val_images,
                   "--subset": d.subset, "--subset-file": d.subset_file, "--val-subset": d.val_subset,
                   "--overfit": d.overfit, "--sampler": "" if d.sampler == "shuffle" else d.sampler})


def validate_detr(m: DetrDecoderFields, loss: SetLossFields) -> None:
    """The checks of a DETR-style decoder's sizes and its set loss (detection, instance segmentation)."""
    if m.hidden_dim % m.num_heads:
        raise ConfigError(f"model.hidden_dim={m.hidden_dim} must be divisible by model.num_heads={m.num_heads}")
    if not m.pyramid_scales or any(s not in PYRAMID_SCALES for s in m.pyramid_scales):
        raise ConfigError(f"model.pyramid_scales={m.pyramid_scales}: use values from "
                          f"{', '.join(f'{s:g}' for s in PYRAMID_SCALES)}")
    if m.hidden_dim % 4:
        raise ConfigError(f"--hidden-dim {m.hidden_dim}: must be a multiple of 4 (sine position encoding)")
    if loss.class_weight == loss.bbox_weight == loss.giou_weight == 0:
        raise ConfigError("--class-weight, --bbox-weight and --giou-weight are all 0: nothing would be learned "
                          "(and the matcher needs at least one cost)")


def _preset(cfg: DetectConfig, preset: dict[str, Any], explicit: dict[str, Any]) -> None:
    for key, value in preset.items():
        if key not in explicit:
            set_dotted(cfg, key, value)


# The DINOv2 backbone a --baseline run carries without running it: the engine trains backbone + head
# models, and the baseline's whole torchvision detector is the head (see tasks/detect/baseline.py).
BASELINE_PLACEHOLDER = "random:tiny"

# What --baseline sets (explicit flags are applied after it, and refused when they make no sense)
BASELINE_PRESET: dict[str, Any] = {
    "model.head": "fasterrcnn",
    "adapter.kind": "none",
    "backbone.model": BASELINE_PLACEHOLDER,
}


def _validate_baseline(cfg: DetectConfig) -> None:
    """A --baseline has no DINOv2 backbone: refuse the options that would act on one."""
    m, name = cfg.model, f"--baseline {cfg.model.baseline}"
    refused = {
        "--head": (m.head, "fasterrcnn"),
        "--adapter": (cfg.adapter.kind, "none"),
        "--model": (cfg.backbone.model, BASELINE_PLACEHOLDER),
        "--two-stage": (cfg.train.two_stage, False),
        "--grad-checkpointing": (cfg.train.grad_checkpointing, False),
        "--compile": (cfg.train.compile, False),
    }
    for flag, (value, wanted) in refused.items():
        if value != wanted:
            raise ConfigError(f"{name} with {flag} {value}: the baseline is a whole torchvision Faster R-CNN with no "
                              f"DINOv2 backbone to adapt, load or speed up; leave {flag} out (it is {wanted} with "
                              "--baseline)")
    if cfg.bands.in_channels not in (0, 3):
        raise ConfigError(f"{name} with --in-channels {cfg.bands.in_channels}: torchvision's detectors read RGB "
                          "pictures only")


# What --lightweight sets (a small DETR-style detector for one GPU); explicit flags are applied after it.
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
