"""Unlabelled images for self-supervised pretraining, cut into DINOv2's multi-crop views.

Pretraining learns from images alone, so any folder of them will do: every readable image under
it is used, whatever its layout (class folders, train / val splits, COCO or YOLO folders; their
annotation files are skipped) and whatever labels a CSV may carry. Each image yields two global
crops, which the teacher sees, and ``L`` small local crops, which only the student sees; the
student learns to give every crop the teacher's answer for the global ones (DINO's
local-to-global correspondence).

The augmentations are those of DINOv2's ``DataAugmentationDINO`` (``dinov2/data/augmentations.py``),
themselves BYOL's asymmetric pair (Grill et al. 2020, table 6), written with ``torchvision.transforms.v2``.
Pictures get the colour transforms; band arrays (``.npy``, multi-band TIFF) get only geometric ones,
since their values are physical measurements and no band is red, green or blue (as in
``data/transforms.py``). A file that fails to decode mid-epoch is reported once and replaced by the
next readable one, as classification's ``ImageListDataset`` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from dinotune.data.arrays import BandLayout
from dinotune.data.bands import InputSpec, input_bands, read_input
from dinotune.data.image_lists import LIST_SUFFIXES, read_labelled_csv
from dinotune.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageReadError,
    SkipReport,
    collect_images,
    scan_images,
    symlink_problem,
)
from dinotune.data.transforms import _to_image, normalize, spatial_augmentations
from dinotune.errors import DataError
from dinotune.utils import warn

__all__ = ["GLOBAL_SCALE", "LOCAL_SCALE", "MultiCropDataset", "collate_multicrop", "list_images",
           "multicrop_transforms"]

# DINOv2's defaults (configs/ssl_default_config.yaml, crops.global_crops_scale / local_crops_scale):
# a global crop covers a third of the image or more, a local one at most a third.
GLOBAL_SCALE = (0.32, 1.0)
LOCAL_SCALE = (0.05, 0.32)


# ------------------------------------------------------------------------------------- listing
def list_images(data: str | Path, *, check: Literal["full", "fast", "off"] = "fast",
                max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, layout: BandLayout = "auto") -> list[Path]:
    """Every readable image of ``data``, sorted, labels and class folders ignored.

    ``data`` is a folder (searched recursively, any layout; the annotation and list files datasets
    keep beside their images are skipped quietly), a CSV / TSV listing images in a path column
    (any label column is ignored; relative paths are read from the list's folder), or one image
    file. Pictures and band arrays alike. Each file is checked (``check``: ``fast`` reads headers,
    ``full`` decodes, ``off`` trusts the names; images over ``max_pixels`` are refused from their
    header); unusable files are reported and left out. Raises DataError naming ``data`` when no
    readable image is left."""
    path = Path(data).expanduser()
    if not path.exists():
        problem = symlink_problem(path)
        raise DataError(f"data not found: {path}" + (f" ({problem})" if problem else ""))
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        pairs, report = read_labelled_csv(path, require_label=False)
        found = [p for p, _ in pairs]
    else:
        report = SkipReport()
        found = collect_images(path, report)
    ok = scan_images(found, report, check, max_pixels=max_pixels, layout=layout)
    report.print("files")
    paths = sorted({p for p, good in zip(found, ok) if good})  # a set: a list may name a file twice
    if not paths:
        kind = "listed in" if path.is_file() and path.suffix.lower() in LIST_SUFFIXES else "in"
        raise DataError(f"no readable images {kind} {path}{report.why()}: pretraining needs a folder of images "
                        "(any layout), a CSV with a path column, or an image file")
    return paths


# ---------------------------------------------------------------------------------- transforms
def _blur(p: float) -> v2.Transform:
    """Gaussian blur applied with probability ``p``: a 9-pixel kernel, sigma uniform in [0.1, 2]
    (DINOv2's ``GaussianBlur``). ``p`` is the probability of blurring, as in DINO and BYOL; DINOv2's
    own class passes ``1 - p`` to ``RandomApply`` and so never blurs its first global crop
    (facebookresearch/dinov2#411, dinov3#286); we follow the recipe as written, not that slip."""
    return v2.RandomApply([v2.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=p)


def _picture_view(size: int, scale: tuple[float, float], blur: float, solarize: float) -> v2.Compose:
    """One of DINOv2's views of an RGB picture (PIL image) -> ``3 x size x size`` float in [0, 1],
    before normalisation. Everything runs on uint8 tensors, so the solarisation threshold is
    DINOv2's 128 (PIL's 0..255 scale; 0.5 on floats would be the same point)."""
    steps: list[v2.Transform] = [
        _to_image(),
        # bicubic as DINOv2; antialias so a large picture shrunk to 96 px does not alias
        v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        # DINOv2's color_jittering: strong jitter on 80 % of views, a fifth of views gray
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        _blur(blur),
    ]
    if solarize:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize))
    return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True)])


def _band_view(spec: InputSpec, size: int, scale: tuple[float, float]) -> v2.Compose:
    """A view of a band array (``C x H x W`` float ``tv_tensors.Image``) -> ``C x size x size``:
    the crop and flips only, plus the vertical flips and quarter turns overhead imagery allows
    (``spatial_augmentations``). Jitter, grayscale and solarisation assume red / green / blue
    values in [0, 1]; blur is left out with them, as a change of appearance rather than of view.
    Bilinear, not bicubic: bicubic overshoots at sharp edges (negative reflectance beside a
    cloud), and classification's band pipeline resamples bilinearly too."""
    return v2.Compose([
        _to_image(),
        v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        *spatial_augmentations(spec),
        v2.ToDtype(torch.float32, scale=True),  # float arrays pass unchanged
    ])


def multicrop_transforms(spec: InputSpec, global_size: int, local_size: int,
                         global_scale: tuple[float, float] = GLOBAL_SCALE,
                         local_scale: tuple[float, float] = LOCAL_SCALE) -> tuple[Callable, Callable, Callable]:
    """``(first global, second global, local)`` transforms of DINOv2's multi-crop, each taking what
    ``read_input`` returns and giving a ``C x size x size`` float tensor normalised with ``spec``.

    Pictures (``spec.arrays`` False), as ``DataAugmentationDINO``: a bicubic random resized crop of
    ``global_scale`` / ``local_scale`` of the area, a horizontal flip, colour jitter (0.4, 0.4, 0.2,
    0.1) with probability 0.8, grayscale 0.2, Gaussian blur with probability 1.0 (first global),
    0.1 (second global) and 0.5 (local), and solarisation (threshold 128 of 255) with probability
    0.2 on the second global crop only: the two global views differ on purpose (BYOL's asymmetric
    pair), one always soft, the other mostly sharp and sometimes inverted.

    Band arrays (``spec.arrays`` True): the crop, the flips and ``spatial_augmentations(spec)``
    only; no colour transform touches a physical band value. The two global transforms are then
    alike."""
    if spec.arrays:
        views = [_band_view(spec, global_size, global_scale), _band_view(spec, global_size, global_scale),
                 _band_view(spec, local_size, local_scale)]
    else:
        views = [_picture_view(global_size, global_scale, blur=1.0, solarize=0.0),
                 _picture_view(global_size, global_scale, blur=0.1, solarize=0.2),
                 _picture_view(local_size, local_scale, blur=0.5, solarize=0.0)]
    return tuple(v2.Compose([view, normalize(spec)]) for view in views)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------- dataset
class MultiCropDataset(Dataset):
    """Images (pictures or band arrays) cut into DINOv2's crops.

    Items: ``{"global": 2 x C x G x G, "local": L x C x l x l}`` float tensors, normalised with
    ``spec`` (``G`` = ``global_size``, ``l`` = ``local_size``, ``L`` = ``local_crops``, which may be
    0: a ``0 x C x l x l`` tensor). A file that fails to decode at run time (or is over
    ``max_image_pixels``, or has another band count than ``spec``) is reported once and replaced by
    the next readable one, so one bad file never stops an epoch."""

    def __init__(self, paths: Sequence[Path], spec: InputSpec, global_size: int, local_size: int,
                 local_crops: int, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 global_scale: tuple[float, float] = GLOBAL_SCALE, local_scale: tuple[float, float] = LOCAL_SCALE):
        if local_crops < 0:
            raise DataError(f"local_crops {local_crops}: the number of local crops is 0 or more")
        self.paths = [Path(p) for p in paths]
        self.spec = spec
        self.local_size = int(local_size)
        self.local_crops = int(local_crops)
        self.max_image_pixels = max_image_pixels  # held here so DataLoader workers get it too
        self.global1, self.global2, self.local = multicrop_transforms(spec, global_size, local_size,
                                                                      global_scale, local_scale)
        self._bad: set[int] = set()  # per process: each DataLoader worker reports its own once

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, index: int) -> Any:
        """The first readable image from ``index`` on (wrapping round): a PIL picture or a band tensor."""
        for offset in range(len(self.paths)):
            i = (index + offset) % len(self.paths)
            if i in self._bad:
                continue
            path = self.paths[i]
            try:
                image = read_input(path, self.max_image_pixels, self.spec.layout)
                if input_bands(image) != self.spec.in_channels:
                    raise ImageReadError(f"{path}: has {input_bands(image)} band(s), the model takes "
                                         f"{self.spec.in_channels}")
            except ImageReadError as exc:
                self._bad.add(i)
                warn(f"skipped {exc} (replaced by another image)")
                continue
            return image
        raise DataError("no image in the pretraining data could be decoded")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self._read(index)
        global_crops = torch.stack([self.global1(image), self.global2(image)])  # 2 x C x G x G
        if self.local_crops:
            local_crops = torch.stack([self.local(image) for _ in range(self.local_crops)])  # L x C x l x l
        else:
            local_crops = torch.empty(0, self.spec.in_channels, self.local_size, self.local_size)
        # plain tensors: tv_tensors.Image would leak its subclass into the batch and the model
        return {"global": global_crops.as_subclass(torch.Tensor), "local": local_crops.as_subclass(torch.Tensor)}


def collate_multicrop(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A batch of ``B`` items -> ``{"global": (2*B) x C x G x G, "local": (L*B) x C x l x l}``.

    Crop-major, as DINOv2's ``collate_data_and_cast``: row ``k * B + b`` is crop ``k`` of image
    ``b``, so the first ``B`` rows are every image's first global crop, the next ``B`` their second
    ones, and an image's two global crops sit ``B`` rows apart. The loss relies on it:
    ``x.chunk(n_crops)`` gives one ``B``-row block per crop, so the teacher's output for global crop
    ``k`` lines up row by row with the student's for every other crop of the same images."""
    out = {}
    for key in ("global", "local"):
        crops = torch.stack([item[key] for item in items], dim=1)  # n_crops x B x C x H x W
        out[key] = crops.flatten(0, 1)
    return out
