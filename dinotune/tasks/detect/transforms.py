"""Box-aware transforms for detection (``torchvision.transforms.v2`` on ``tv_tensors``).

A dataset item goes: ``transform(image, {"boxes": BoundingBoxes, "labels": ...})`` (training
augmentation, or the identity) -> ``resize_pad`` (longer side to ``S``, zero pad right / bottom to
``S x S``, boxes follow) -> ``to_input()`` (float in [0, 1], ImageNet normalisation). Labels ride in
the target dict under ``"labels"``, so ``SanitizeBoundingBoxes`` drops them with their boxes.
Band arrays (``.npy``, multi-band TIFF) take the same path as float ``C x H x W`` tensors in their
own units, normalised per band (``InputSpec``), with vertical flips and quarter turns added.
"""

from __future__ import annotations

from typing import Any

import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from dinotune.data.bands import InputSpec
from dinotune.data.transforms import normalize, spatial_augmentations

__all__ = ["train_transforms", "eval_transforms", "resize_pad", "to_input", "RandomCropKeepBoxes"]


class RandomCropKeepBoxes(v2.Transform):
    """Random crop (each side ``min_scale``..1 of the image) that keeps objects mostly intact: a
    crop is accepted only if every box it touches keeps at least ``min_visible`` of its area and at
    least one box survives; after ``trials`` rejections the image is left as it is. Boxes left
    outside become degenerate (all zero) for ``SanitizeBoundingBoxes`` to drop with their labels."""

    def __init__(self, min_scale: float = 0.5, min_visible: float = 0.6, p: float = 0.5, trials: int = 10):
        super().__init__()
        self.min_scale, self.min_visible, self.p, self.trials = min_scale, min_visible, p, trials

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        if torch.rand(()) >= self.p:
            return {}
        boxes = next((x for x in flat_inputs if isinstance(x, tv_tensors.BoundingBoxes)), None)
        image = next((x for x in flat_inputs if isinstance(x, (tv_tensors.Image, PIL.Image.Image))), None)
        h, w = F.get_size(image) if image is not None else boxes.canvas_size
        xyxy = None
        if boxes is not None and len(boxes):
            xyxy = F.convert_bounding_box_format(boxes.as_subclass(torch.Tensor), old_format=boxes.format,
                                                 new_format=tv_tensors.BoundingBoxFormat.XYXY).float()
        for _ in range(self.trials):
            r = self.min_scale + (1 - self.min_scale) * torch.rand(2)
            cw, ch = max(1, int(w * r[0])), max(1, int(h * r[1]))
            left = int((w - cw) * torch.rand(()))
            top = int((h - ch) * torch.rand(()))
            if xyxy is None:
                return dict(top=top, left=left, height=ch, width=cw, keep=None)
            ix0 = xyxy[:, 0].clamp(min=left)
            iy0 = xyxy[:, 1].clamp(min=top)
            ix1 = xyxy[:, 2].clamp(max=left + cw)
            iy1 = xyxy[:, 3].clamp(max=top + ch)
            inter = (ix1 - ix0).clamp(min=0) * (iy1 - iy0).clamp(min=0)
            area = ((xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])).clamp(min=1e-6)
            visible = inter / area
            keep = visible >= self.min_visible
            if keep.any() and not ((visible > 0) & ~keep).any():
                return dict(top=top, left=left, height=ch, width=cw, keep=keep)
        return {}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if not params or not isinstance(inpt, (tv_tensors.TVTensor, PIL.Image.Image)):
            return inpt  # no crop; labels and other plain values pass through
        out = F.crop(inpt, top=params["top"], left=params["left"], height=params["height"], width=params["width"])
        if isinstance(out, tv_tensors.BoundingBoxes) and params["keep"] is not None:
            out[~params["keep"]] = 0
        return out

    # torchvision < 0.21 calls these names
    _get_params = make_params
    _transform = transform


def train_transforms(image_size: int, spec: InputSpec | None = None) -> v2.Compose:
    """Horizontal flip (band arrays: also vertical flips and quarter turns), scale jitter (zoom out:
    objects smaller; crop: objects larger) and a crop that keeps objects mostly whole, then boxes
    clamped and degenerate ones dropped with their labels. ``image_size`` is the canvas side ``S``;
    the final resize / pad happens afterwards."""
    del image_size  # the geometry is relative; resize_pad brings every image to S afterwards
    return v2.Compose([
        v2.RandomHorizontalFlip(p=0.5),
        *spatial_augmentations(spec),
        v2.RandomZoomOut(fill=0, side_range=(1.0, 1.6), p=0.25),
        RandomCropKeepBoxes(min_scale=0.5, min_visible=0.6, p=0.5),
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=1.0),
    ])


def eval_transforms() -> v2.Transform:
    """The identity: evaluation images are only resized and padded (in the dataset)."""
    return v2.Identity()


def resize_pad(image: tv_tensors.Image, boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Resize so the longer side is ``size``, zero-pad right / bottom to ``size x size``.

    ``image`` is ``C x H x W``; ``boxes`` ``N x 4`` ``xyxy`` in its pixels. Returns the canvas image,
    the boxes in canvas pixels (multiplied by the exact factor ``size / max(H, W)``, so dividing by
    it recovers the input coordinates; the image side is rounded to whole pixels, a sub-pixel
    difference) and the factor."""
    h, w = image.shape[-2:]
    factor = size / max(h, w)
    nh, nw = min(size, max(1, round(h * factor))), min(size, max(1, round(w * factor)))
    if (nh, nw) != (h, w):
        image = F.resize(image, [nh, nw], antialias=True)
    if (nh, nw) != (size, size):
        image = F.pad(image, [0, 0, size - nw, size - nh], fill=0)
    boxes = boxes.as_subclass(torch.Tensor).float() * factor
    return image, boxes, factor


def to_input(spec: InputSpec | None = None) -> v2.Compose:
    """uint8 canvas -> float in [0, 1] -> ImageNet normalisation (after the pad, so the padding is
    black before normalisation); a float band canvas is normalised with ``spec``'s statistics."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), normalize(spec)])
