"""The instance-segmentation config: detection's data, decoder and set loss, plus the mask branch
(``--head detr``: a mask embedding per query dotted with per-pixel embeddings; ``--head maskrcnn``:
torchvision's Mask R-CNN heads on the same feature pyramid)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

from dinotune.config.bands import BandsConfig
from dinotune.config.base import (
    PYRAMID_SCALES,
    AdapterConfig,
    BackboneConfig,
    ConfigError,
    OptimConfig,
    TrainConfig,
    opt,
    validate_common,
)
from dinotune.config.detect import (
    LIGHTWEIGHT_PRESET,
    DetectDataConfig,
    DetectInferenceConfig,
    DetectPredictOptions,
    DetrDecoderFields,
    RcnnFields,
    SetLossFields,
    check_scene_data,
    validate_detr,
)
from dinotune.config.io import coerce, set_dotted


@dataclass
class InstanceDataConfig(DetectDataConfig):
    data: str = opt(
        "",
        "training data: a COCO folder (annotations/instances_train*.json with polygon or RLE segmentations + image "
        "folders; a Roboflow COCO export's train/ valid/ test/ with _annotations.coco.json), a COCO instances JSON, "
        "or a YOLO-seg folder (data.yaml, images/, labels/ with 'class x1 y1 x2 y2 ...' normalised polygons)",
    )


@dataclass
class InstanceModelConfig(RcnnFields, DetrDecoderFields):  # fields: the decoder's, the R-CNN's, then these
    head: Literal["detr", "maskrcnn"] = opt(
        "detr",
        "detr = the deformable DETR decoder with a mask per query (its embedding dotted with per-pixel embeddings "
        "of the finest pyramid level, as Mask DINO); maskrcnn = torchvision's Mask R-CNN (RPN, box and mask RoI "
        "heads) on the simple feature pyramid",
    )
    mask_dim: int = opt(256, "detr: width of the query and pixel mask embeddings", ge=1)
    mask_scale: float = opt(
        4.0, "detr: the pyramid scale of the mask grid, as a factor of the patch map (with 14-pixel patches: 4 = "
        "masks at stride 3.5, 2 = stride 7; finer costs memory with the square)", gt=0)


@dataclass
class InstanceLossConfig(SetLossFields):
    mask_weight: float = opt(5.0, "detr: weight of the mask's sigmoid cross-entropy (and its matching cost)", ge=0)
    dice_weight: float = opt(5.0, "detr: weight of the mask's dice loss (and its matching cost)", ge=0)
    mask_points: int = opt(
        12544, "detr: points sampled per mask for its losses and matching costs (Mask2Former: 112 x 112; grids with "
        "fewer cells use every cell)", ge=16)
    oversample_ratio: float = opt(3.0, "detr: candidate points per sampled point, to find the uncertain ones", ge=1)
    importance_ratio: float = opt(
        0.75, "detr: share of the sampled points taken where the prediction is most uncertain (the rest uniform)",
        ge=0, le=1)


@dataclass
class InstanceInferenceConfig(DetectInferenceConfig):
    mask_threshold: float = opt(0.5, "a pixel belongs to an instance when its mask probability is above this",
                                gt=0, lt=1)


def _instance_optim() -> OptimConfig:
    # the detection recipe: small decoder lr, smaller backbone lr, tight clipping
    return OptimConfig(lr=2e-4, backbone_lr=2e-5, weight_decay=1e-4, grad_clip=0.1)


def _instance_train() -> TrainConfig:
    return TrainConfig(epochs=50, batch_size=4)


def _instance_backbone() -> BackboneConfig:
    return BackboneConfig(image_size=518)


@dataclass
class InstanceConfig:
    task: Literal["instance"] = "instance"
    backbone: BackboneConfig = field(default_factory=_instance_backbone)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    optim: OptimConfig = field(default_factory=_instance_optim)
    train: TrainConfig = field(default_factory=_instance_train)
    data: InstanceDataConfig = field(default_factory=InstanceDataConfig)
    bands: BandsConfig = field(default_factory=BandsConfig)
    model: InstanceModelConfig = field(default_factory=InstanceModelConfig)
    loss: InstanceLossConfig = field(default_factory=InstanceLossConfig)
    inference: InstanceInferenceConfig = field(default_factory=InstanceInferenceConfig)
    # what predict takes besides the inference section: detection's (drawings, image ids)
    predict_options: ClassVar[type] = DetectPredictOptions

    @classmethod
    def sweep_rules(cls) -> tuple[tuple[tuple[str, ...], Callable[[Any], bool], Callable[[Any], str]], ...]:
        """For sweeps: the settings that do nothing under others (see ``DetectConfig.sweep_rules``)."""
        detr = ("model.num_queries", "model.decoder_layers", "model.hidden_dim", "model.num_heads", "model.ffn_dim",
                "model.sampling_points", "model.decoder_dropout", "model.mask_dim", "model.mask_scale",
                "loss.mask_weight", "loss.dice_weight", "loss.mask_points", "loss.oversample_ratio",
                "loss.importance_ratio")
        rcnn = ("model.rcnn_anchor_scales", "model.rcnn_aspect_ratios", "model.rcnn_rpn_batch",
                "model.rcnn_roi_batch", "model.rcnn_score_threshold")
        return (
            (detr, lambda c: c.model.head == "detr", lambda c: f"head={c.model.head} (only the DETR decoder has it)"),
            (rcnn, lambda c: c.model.head == "maskrcnn", lambda c: f"head={c.model.head} (only Mask R-CNN has it)"),
        )

    def apply_presets(self, explicit: dict[str, Any]) -> None:
        """Expand ``--lightweight`` (detection's small decoder) among the ``explicit`` overrides."""
        if coerce(explicit.get("model.lightweight", False), bool, "model.lightweight"):
            for key, value in LIGHTWEIGHT_PRESET.items():
                if key not in explicit:
                    set_dotted(self, key, value)

    def validate(self) -> None:
        validate_common(self)
        check_scene_data(self.data)
        validate_detr(self.model, self.loss)
        if self.model.mask_scale not in PYRAMID_SCALES:
            raise ConfigError(f"--mask-scale {self.model.mask_scale:g}: use one of "
                              f"{', '.join(f'{s:g}' for s in PYRAMID_SCALES)}")
        if self.model.head == "detr" and self.loss.mask_weight == self.loss.dice_weight == 0:
            raise ConfigError("--mask-weight and --dice-weight are both 0: the masks would never be learned")
        if self.data.val_fraction and not self.data.scene_requested():  # a scene's held-out blocks are fine
            raise ConfigError("--val-fraction holds out Pascal VOC images, which have no masks; instance data names "
                              "its validation split (a COCO val JSON, a data.yaml val entry) or --val-data; with a scene "
                              "(--labels) it holds out blocks")
