"""DINOv2 image preprocessing (sizes are multiples of the patch size) and classification
augmentation, for pictures and for band arrays alike.

Pictures arrive as PIL RGB images and are normalised with the ImageNet mean / std (the default
``InputSpec``); band arrays arrive as float32 ``C x H x W`` tensors in their own units and are
normalised with their per-band statistics. The same ``v2`` pipeline serves both: resizing,
cropping, flips and quarter turns work on any channel count, ``ToDtype(scale=True)`` turns uint8
pictures into [0, 1] and leaves float arrays alone. No colour jitter is applied anywhere, so no
band is ever treated as if it were red, green or blue.

The evaluation resize keeps the aspect ratio, so a long strip grows with it: it is refused before
resizing when the result would have more pixels than the pixel limit (``BoundedResize``); files
longer than 1:100 are refused before decoding already (``data/images.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from dinotune.data.bands import IMAGENET_MEAN, IMAGENET_STD, InputSpec
from dinotune.data.images import DEFAULT_MAX_IMAGE_PIXELS, work_size_problem
from dinotune.errors import DataError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "BoundedResize", "RandomQuarterTurn", "classify_eval_transform",
           "classify_train_transform", "denormalize", "normalize", "spatial_augmentations"]


def normalize(spec: InputSpec | None = None) -> v2.Normalize:
    """Per-band normalisation of ``spec`` (ImageNet's for the default, RGB pictures)."""
    spec = spec or InputSpec()
    return v2.Normalize(mean=list(spec.mean), std=list(spec.std))


class RandomQuarterTurn(v2.Transform):
    """Rotate by 0, 90, 180 or 270 degrees (each with probability 1/4): exact for any channel count
    (no resampling), and applied alike to the image and to its masks and boxes (``tv_tensors``).
    Overhead imagery has no "up", so every quarter turn is as plausible as the original."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"angle": 90 * int(torch.randint(4, ()))}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if params["angle"] == 0:
            return inpt
        return self._call_kernel(F.rotate, inpt, angle=params["angle"], expand=True)


def spatial_augmentations(spec: InputSpec | None) -> list[v2.Transform]:
    """Geometric augmentation besides the horizontal flip every task uses: for band arrays
    (overhead imagery) vertical flips and quarter turns too; nothing for pictures (as before)."""
    if spec is None or not spec.arrays:
        return []
    return [v2.RandomVerticalFlip(), RandomQuarterTurn()]


def _to_image() -> v2.Transform:
    """PIL pictures -> uint8 tensors; band tensors (already ``tv_tensors.Image``) pass unchanged."""
    return v2.ToImage()


class FlooredCenterCrop(v2.CenterCrop):
    """``CenterCrop`` with the offsets floored, ``(H - size) // 2``, as transformers' image
    processors (and numpy slicing by hand) crop: torchvision rounds half to even, which puts the
    window one pixel lower / further right whenever the margin is 3 mod 4, so an exported
    transformers folder would see other pixels than dinotune on about one photo in six. Images
    smaller than the crop are padded as torchvision pads."""

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        h, w = v2.functional.get_size(inpt)
        size_h, size_w = self.size
        if size_h > h or size_w > w:
            return super().transform(inpt, params)
        return v2.functional.crop(inpt, (h - size_h) // 2, (w - size_w) // 2, size_h, size_w)


class BoundedResize(v2.Resize):
    """``Resize(size)`` (the short side to ``size``, the aspect ratio kept) that raises DataError,
    before allocating anything, when the result would have more than ``max_pixels`` pixels (0 = no
    limit): a 1 x 20000 strip would become 256 x 5,120,000."""

    def __init__(self, size: int, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, **kwargs: Any):
        super().__init__(size, **kwargs)
        self.short = int(size)
        self.max_pixels = int(max_pixels)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, (torch.Tensor, Image.Image)):  # images and masks: what get_size measures
            h, w = v2.functional.get_size(inpt)
            short, long = min(h, w), max(h, w)
            new_long = int(self.short * long / max(short, 1))  # torchvision's own rounding
            work = (self.short, new_long) if h <= w else (new_long, self.short)
            problem = work_size_problem((h, w), work, self.max_pixels, f"resized to the short side {self.short}")
            if problem:
                raise DataError(problem)
        return super().transform(inpt, params)


def classify_eval_transform(image_size: int, spec: InputSpec | None = None,
                            max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> v2.Compose:
    """Resize the short side to ``size * 256/224`` and center-crop ``size`` (the DINOv2 / ImageNet
    evaluation protocol), then normalise with ``spec``'s statistics (ImageNet's by default). A
    resize to more than ``max_pixels`` pixels is refused (``BoundedResize``; 0 = no limit)."""
    return v2.Compose([
        _to_image(),
        BoundedResize(int(round(image_size * 256 / 224)), max_pixels, antialias=True),
        FlooredCenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        normalize(spec),
    ])


def classify_train_transform(image_size: int, augment: bool = True, spec: InputSpec | None = None) -> v2.Compose:
    """Random resized crop + horizontal flip (+ vertical flip and quarter turns for band arrays);
    without ``augment`` the evaluation transform."""
    if not augment:
        return classify_eval_transform(image_size, spec)
    return v2.Compose([
        _to_image(),
        v2.RandomResizedCrop(image_size, scale=(0.25, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        *spatial_augmentations(spec),
        v2.ToDtype(torch.float32, scale=True),
        normalize(spec),
    ])


def denormalize(images: torch.Tensor, spec: InputSpec | None = None) -> torch.Tensor:
    """``B x C x H x W`` normalised images back to the reader's units: [0, 1] for pictures (clamped,
    for display), raw band values for band arrays."""
    spec = spec or InputSpec()
    mean = torch.tensor(spec.mean, device=images.device, dtype=images.dtype).view(-1, 1, 1)
    std = torch.tensor(spec.std, device=images.device, dtype=images.dtype).view(-1, 1, 1)
    out = images * std + mean
    return out if spec.arrays else out.clamp(0, 1)


def as_band_image(x: torch.Tensor) -> tv_tensors.Image:
    """A plain ``C x H x W`` tensor marked as an image for ``v2`` transforms."""
    return x if isinstance(x, tv_tensors.Image) else tv_tensors.Image(x)
