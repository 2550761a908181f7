"""Instance segmentation dataset: detection's items (``DetectionDataset``) plus one mask per object.

An item is ``(image, target)`` as in detection (``3 x S x S`` canvas; ``boxes`` ``N x 4`` cxcywh
normalised, ``labels`` ``N``, ``image_id``, ``orig_size``, ``scale``) plus ``target["masks"]``:
``N x S x S`` uint8 {0, 1} on the canvas, row ``i`` the object of ``boxes[i]``.

How masks travel: each training object's segmentation (``InstanceSource.segmentations``, original
pixels) is decoded with pycocotools for the item being loaded only, on the image file's grid (a
file that is a rescale of its annotation gets its masks rescaled, as its boxes are), and enters the
augmentation as a ``tv_tensors.Mask`` beside the image and boxes: torchvision moves it in flips,
zoom-out, crops and quarter turns, and ``SanitizeBoundingBoxes`` drops the rows of the boxes it
drops. Then the masks are resized (nearest) to the image's size on the canvas and zero-padded at
the right / bottom, as ``resize_pad`` does to the image, and the rows of boxes that did not survive
the resize are dropped with them.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from dinotune.data.bands import InputSpec
from dinotune.data.images import DEFAULT_MAX_IMAGE_PIXELS
from dinotune.errors import DataError, ImageReadError
from dinotune.tasks.detect.data import DetectionDataset, class_table, detection_collate
from dinotune.tasks.detect.transforms import train_transforms
from dinotune.tasks.instance.masks import to_rle
from dinotune.tasks.instance.sources import InstanceSource

__all__ = ["InstanceDataset", "instance_collate", "instance_train_transforms", "describe_instances",
           "decode_segmentation", "canvas_masks", "MASK_BYTES"]

# One item's masks before the canvas (N x H x W uint8) may take this many bytes; an image with more
# objects x pixels is worked on at a smaller size (never below the canvas's), see ``work_factor``.
MASK_BYTES = 256 * 2**20


def decode_segmentation(seg: Any, height: int, width: int, out_size: tuple[int, int] | None = None) -> np.ndarray:
    """``H x W`` uint8 {0, 1} mask of a checked COCO segmentation of an ``height x width`` image:
    exactly pycocotools' ``COCO.annToMask`` (polygon parts merged). With ``out_size`` ``(h, w)``
    (another grid over the same image): polygons are scaled and drawn on it, an RLE is decoded and
    resized (nearest)."""
    if out_size is None or tuple(out_size) == (height, width):
        return mask_utils.decode(to_rle(seg, (height, width)))
    oh, ow = out_size
    if isinstance(seg, list):
        scale = np.array([ow / width, oh / height])
        parts = [(np.asarray(p, dtype=np.float64).reshape(-1, 2) * scale).reshape(-1) for p in seg]
        return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(parts, oh, ow)))
    full = torch.from_numpy(np.ascontiguousarray(mask_utils.decode(to_rle(seg, (height, width)))))
    return _nearest(full[None], oh, ow)[0].numpy()


def _nearest(masks: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``N x H x W`` -> ``N x h x w`` by nearest neighbour at pixel centres ("nearest-exact"), so
    the mask stays on the same part of the picture as the bilinear image resize (plain "nearest"
    shifts it up / left by up to half an output pixel)."""
    return F.resize_image(masks, [h, w], interpolation=InterpolationMode.NEAREST_EXACT, antialias=False)


def canvas_masks(masks: torch.Tensor, size: int) -> torch.Tensor:
    """``N x H x W`` masks of an ``H x W`` image -> ``N x S x S`` on its canvas: the image's size
    on the canvas is ``resize_pad``'s (longer side ``S``, the other rounded), masks resized to it
    and zero-padded at the right / bottom."""
    n, h, w = masks.shape
    factor = size / max(h, w)  # the rule of detect.transforms.resize_pad
    nh, nw = min(size, max(1, round(h * factor))), min(size, max(1, round(w * factor)))
    out = torch.zeros((n, size, size), dtype=torch.uint8)
    out[:, :nh, :nw] = masks if (nh, nw) == (h, w) else _nearest(masks, nh, nw)
    return out


def work_factor(n: int, h: int, w: int, size: int) -> float:
    """1, or the scale (< 1) at which ``n`` masks of an ``h x w`` image fit ``MASK_BYTES``, but never
    below the canvas scale ``size / max(h, w)`` (the item ends there anyway)."""
    if n * h * w <= MASK_BYTES:
        return 1.0
    return max(math.sqrt(MASK_BYTES / (n * h * w)), min(1.0, size / max(h, w)))


class InstanceDataset(DetectionDataset):
    """``(image, target)`` items of an ``InstanceSource``: detection's plus ``target["masks"]``
    (``N x S x S`` uint8, aligned with ``boxes`` / ``labels``). ``transform`` takes and returns
    ``(tv_tensors.Image, {"boxes": BoundingBoxes xyxy, "labels": int64, "masks": Mask N x H x W})``
    (``instance_train_transforms`` or detection's ``eval_transforms``). Other arguments as for
    ``DetectionDataset``."""

    def __init__(self, source: InstanceSource, transform: Callable | None, image_size: int,
                 pre_transform: Callable | None = None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 spec: InputSpec | None = None):
        super().__init__(source, transform, image_size, pre_transform, max_image_pixels, spec)
        # per record, the segmentations of its training objects in target order (references only)
        self.segments: list[list[Any]] = []
        for im in self.records:
            segs = []
            for a in source.targets(im.id):
                if a.id not in source.segmentations:
                    raise DataError(f"{source.name}: annotation id {a.id} of image {im.id} ({im.path.name}) "
                                    "has no segmentation")
                segs.append(source.segmentations[a.id])
            self.segments.append(segs)

    def _load(self, i: int) -> Image.Image | torch.Tensor:
        rec = self.records[i]
        # an RLE is decoded at its annotation's size: bounded like the image files themselves
        if rec.width * rec.height > self.max_image_pixels and any(isinstance(s, dict) for s in self.segments[i]):
            raise ImageReadError(f"{rec.path}: annotated as {rec.width}x{rec.height}, over the pixel limit "
                                 f"({self.max_image_pixels}); its RLE masks are not decoded")
        return super()._load(i)

    def _target(self, i: int, pil: Image.Image | torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        image, target = super()._target(i, pil)  # boxes already on the file's grid
        rec, segs = self.records[i], self.segments[i]
        h, w = image.shape[-2:]
        f = work_factor(len(segs), h, w, self.image_size)
        if f < 1:  # many objects on a big image: image, boxes and masks at a smaller size
            h, w = max(1, round(h * f)), max(1, round(w * f))
            image = F.resize(image, [h, w], antialias=True)
            target["boxes"] = F.resize(target["boxes"], [h, w])
        masks = torch.zeros((len(segs), h, w), dtype=torch.uint8)
        for k, seg in enumerate(segs):  # one full mask at a time
            masks[k] = torch.from_numpy(decode_segmentation(seg, rec.height, rec.width, (h, w)))
        target["masks"] = tv_tensors.Mask(masks)
        return image, target

    def _on_canvas(self, target: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
        masks = target["masks"].as_subclass(torch.Tensor)
        if masks.shape[0] != len(target["boxes"]) or tuple(masks.shape[-2:]) != tuple(target["boxes"].canvas_size):
            raise ValueError(f"the transform left {tuple(masks.shape)} masks beside {len(target['boxes'])} boxes on a "
                             f"{tuple(target['boxes'].canvas_size)} image: masks must move with the image and boxes")
        return {"masks": canvas_masks(masks, self.image_size)[keep]}


def instance_collate(batch: list[tuple[torch.Tensor, dict[str, Any]]]) -> dict[str, Any]:
    """``{"images": B x 3 x S x S, "targets": [target dict with masks, ...]}`` (detection's)."""
    return detection_collate(batch)


def instance_train_transforms(image_size: int, spec: InputSpec | None = None) -> v2.Compose:
    """Detection's training augmentation (``train_transforms``), which moves ``tv_tensors.Mask``
    with the image: flips and quarter turns, zoom-out (masks padded with 0), ``RandomCropKeepBoxes``
    (crops every tv_tensor; the boxes it zeroes are then dropped by ``SanitizeBoundingBoxes`` with
    their mask rows, as ``N x H x W`` masks with ``N`` = the box count are)."""
    return train_transforms(image_size, spec)


def describe_instances(source: InstanceSource) -> str:
    """For the log: images, instances (training objects) and classes, then each class's count."""
    return (f"{source.name}: {len(source)} images, {source.num_boxes()} instances, {len(source.categories)} "
            "classes\n" + class_table(source.class_names, source.boxes_per_class()))
