"""DINOv2 image preprocessing (ImageNet mean / std; sizes are multiples of the patch size) and
classification augmentation."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize() -> v2.Normalize:
    return v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)


def classify_eval_transform(image_size: int) -> v2.Compose:
    """Resize the short side to ``size * 256/224`` and center-crop ``size`` (the DINOv2 / ImageNet
    evaluation protocol)."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(int(round(image_size * 256 / 224)), antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        normalize(),
    ])


def classify_train_transform(image_size: int, augment: bool = True) -> v2.Compose:
    """Random resized crop + horizontal flip; without ``augment`` the evaluation transform."""
    if not augment:
        return classify_eval_transform(image_size)
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=(0.25, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        normalize(),
    ])


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """``B x 3 x H x W`` normalised images back to [0, 1] for display."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(-1, 1, 1)
    return (images * std + mean).clamp(0, 1)
