"""Segmentation data: the torch Dataset and its collate, per the contract in
``dinotune/tasks/segment/__init__.py``. ``SegmentationSource`` and mask loading live in
``sources.py``, the readers in ``layouts.py`` and ``coco_masks.py``; all are re-exported here.

Training: random scale (short side ``lo..hi x S``, ``--scale-range``), random ``S x S`` crop
(padding: image 0, mask ``ignore_index``), horizontal flip; image and mask go through the same
``transforms.v2`` calls as ``tv_tensors.Image`` / ``tv_tensors.Mask``, so they stay aligned and the
mask is resized with nearest neighbour. Evaluation: the image's short side becomes ``S`` (sides
rounded to multiples of the backbone's patch size ``p``) or it keeps its resolution (sliding
windows); the mask stays at the original resolution. Images are normalised (ImageNet mean / std)
after ``ToDtype(scale=True)``. Band arrays (``.npy``, multi-band TIFF images; masks stay PNG) take
the same path as float ``C x H x W`` tensors, normalised per band (``InputSpec``), and training
adds vertical flips and quarter turns, applied to image and mask alike.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from dinotune.config import SegmentDataConfig
from dinotune.data.bands import InputSpec, input_bands, read_input
from dinotune.data.images import DEFAULT_MAX_IMAGE_PIXELS, ImageReadError
from dinotune.data.transforms import normalize, spatial_augmentations
from dinotune.tasks.segment.coco_masks import read_coco_semantic
from dinotune.tasks.segment.layouts import (
    ADE20K_CLASSES,
    VOC_CLASSES,
    find_segmentation_data,
    read_ade20k,
    read_folders,
    read_voc,
)
from dinotune.tasks.segment.runtime import eval_size  # one rule for both backends
from dinotune.tasks.segment.sources import (
    CocoShapes,
    DataError,
    MaskReadError,
    MaskSummary,
    SegmentationSource,
    describe,
    load_mask,
    mask_summary,
    rasterize_coco,
    read_mask_labels,
    scan_source,
)
from dinotune.utils import warn

__all__ = [
    "DataError", "MaskReadError", "CocoShapes", "SegmentationSource", "VOC_CLASSES", "ADE20K_CLASSES",
    "read_voc", "read_ade20k", "read_folders", "read_coco_semantic", "find_segmentation_data", "load_mask",
    "MaskSummary", "mask_summary", "read_mask_labels", "rasterize_coco", "scan_source", "describe", "SegmentationDataset",
    "segmentation_collate", "eval_size", "image_size",
]


def train_transforms(image_size: int, ignore_index: int, augment: bool,
                     scale_range: tuple[float, float], spec: InputSpec | None = None) -> v2.Compose | None:
    """Joint geometry for ``(tv_tensors.Image, tv_tensors.Mask)``. ``augment``: random scale of a
    short side ``S`` base by ``scale_range``, random ``S x S`` crop (pad image 0 / mask ignore when
    smaller), horizontal flip. Without it: None, and the dataset resizes the whole image exactly as
    for evaluation (short side ``S``), so what is trained on is what is evaluated (overfit checks)."""
    s = int(image_size)
    if not augment:
        return None
    lo, hi = scale_range
    return v2.Compose([
        v2.RandomResize(max(1, round(lo * s)), round(hi * s) + 1, antialias=True),
        v2.RandomCrop(s, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}),
        v2.RandomHorizontalFlip(p=0.5),
        *spatial_augmentations(spec),  # band arrays: vertical flips, quarter turns (square crops stay square)
    ])


class SegmentationDataset(Dataset):
    """Items per the segmentation contract. ``train``: ``S x S`` crops with augmentation (see
    ``train_transforms``); else evaluation items (image short side ``S`` rounded to multiples of
    ``patch_size``, or untouched with ``keep_full_resolution``; mask at the original resolution).
    An image or mask that fails to decode at run time (or an image over ``max_image_pixels``) is
    reported once and replaced by the next readable pair; a mask that does not fit its image (size,
    labels) raises DataError. Images are read upright (EXIF orientation applied), masks as stored."""

    def __init__(self, source: SegmentationSource, train: bool, image_size: int, patch_size: int,
                 augment: bool = True, keep_full_resolution: bool = False, pre_transform: Any = None,
                 scale_range: tuple[float, float] | None = None,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, spec: InputSpec | None = None):
        self.source = source
        self.spec = spec or InputSpec()  # pictures (RGB, ImageNet statistics) or band arrays
        self.max_image_pixels = max_image_pixels  # held here so DataLoader workers get it too
        self.pre_transform = pre_transform  # PIL -> PIL before everything else (e.g. a corruption)
        self.train = bool(train)
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.keep_full_resolution = bool(keep_full_resolution)
        self.class_names = list(source.class_names)
        self.ignore_index = source.ignore_index
        scale_range = tuple(scale_range or SegmentDataConfig().scale_range)  # the config's default
        self.transform = (train_transforms(self.image_size, source.ignore_index, augment, scale_range, self.spec)
                          if self.train else None)
        self._finish = v2.Compose([v2.ToDtype(torch.float32, scale=True), normalize(self.spec)])
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.source)

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.source)
        for offset in range(n):
            i = (index + offset) % n
            if i in self._bad:
                continue
            try:
                pil = read_input(self.source.pairs[i][0], self.max_image_pixels, self.spec.layout)
                if input_bands(pil) != self.spec.in_channels:
                    raise ImageReadError(f"{self.source.pairs[i][0]}: has {input_bands(pil)} band(s), the model "
                                         f"takes {self.spec.in_channels}")
                labels = read_mask_labels(self.source, i, image_size(pil))
            except ImageReadError as exc:  # MaskReadError included
                self._bad.add(i)
                warn(f"skipped {exc} (replaced by another image)")
                continue
            if self.pre_transform is not None:
                pil = self.pre_transform(pil)
            return self._item(i, pil, labels)
        raise DataError(f"{self.source.name}: no image / mask pair in the dataset could be decoded")

    def _item(self, i: int, pil: Image.Image | torch.Tensor, labels: np.ndarray) -> dict[str, Any]:
        image = pil if isinstance(pil, torch.Tensor) else tv_tensors.Image(F.pil_to_tensor(pil))
        height, width = image.shape[-2:]
        if self.train:
            mask = tv_tensors.Mask(torch.from_numpy(labels))
            if self.transform is not None:
                image, mask = self.transform(image, mask)
            else:  # the whole image at the evaluation size; the collate pads the batch
                size = list(eval_size(height, width, self.image_size, self.patch_size))
                image, mask = F.resize(image, size, antialias=True), F.resize(mask, size)
            return {"image": self._finish(image.as_subclass(torch.Tensor)),
                    "mask": mask.as_subclass(torch.Tensor).to(torch.int64), "index": i}
        if not self.keep_full_resolution:
            size = eval_size(height, width, self.image_size, self.patch_size)
            if size != (height, width):
                image = F.resize(image, list(size), antialias=True)
        return {"image": self._finish(image.as_subclass(torch.Tensor)),
                "mask": torch.from_numpy(labels).to(torch.int64), "index": i}


def image_size(image: Image.Image | torch.Tensor) -> tuple[int, int]:
    """``(width, height)`` of a PIL picture or a ``C x H x W`` band tensor."""
    return image.size if isinstance(image, Image.Image) else (int(image.shape[-1]), int(image.shape[-2]))


def segmentation_collate(batch: list[dict[str, Any]], patch_size: int, train: bool | None = None,
                         ignore_index: int = 255) -> dict[str, Any]:
    """Training items: ``{"images": B x 3 x S x S, "masks": B x S x S int64, "index", "sizes"}``.
    Evaluation items: images zero-padded (right / bottom) to the batch's largest height and width,
    rounded up to multiples of ``patch_size``, ``"masks"`` a list of original-resolution masks, ``"sizes"`` the
    ``(h, w)`` of each unpadded image, ``"index"``. ``train=None`` decides by the items (all images
    and masks the same size: training); pass ``train=False`` (``functools.partial``) for evaluation
    loaders so a batch whose masks happen to match the resized images still comes as a list."""
    images = [b["image"] for b in batch]
    masks = [b["mask"] for b in batch]
    index = torch.tensor([int(b["index"]) for b in batch], dtype=torch.int64)
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    if train is None:
        train = all(im.shape == images[0].shape and tuple(m.shape) == sizes[0] for im, m in zip(images, masks))
    h = math.ceil(max(s[0] for s in sizes) / patch_size) * patch_size
    w = math.ceil(max(s[1] for s in sizes) / patch_size) * patch_size
    out = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for k, im in enumerate(images):
        out[k, :, : im.shape[-2], : im.shape[-1]] = im
    if train:  # whole-image training items of different sizes: masks padded with ignore_index
        padded = masks[0].new_full((len(masks), h, w), ignore_index)
        for k, m in enumerate(masks):
            padded[k, : m.shape[-2], : m.shape[-1]] = m
        return {"images": out, "masks": padded, "sizes": sizes, "index": index}
    return {"images": out, "masks": masks, "sizes": sizes, "index": index}
