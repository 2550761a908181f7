"""The files a prediction reads, found, checked and decoded as the torch path does, without torch.

Listing and checking reuse ``dinotune.data.images`` (folders searched recursively, unreadable files
reported and skipped, pixel limits from the header) and decoding reuses ``load_image`` (upright,
RGB) and ``data.arrays.read_bands`` (``.npy`` / multi-band TIFF); neither imports torch. A file that
does not fit the model (a picture for a band-array model, another band count) is refused naming
it and both counts (``data.input_spec.check_inputs``, which the PyTorch path uses too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Literal

import numpy as np

from dinotune.data.arrays import check_band_file, is_band_file, read_bands
from dinotune.data.images import SkipReport, collect_images, load_image, scan_images
from dinotune.data.input_spec import InputSpec, check_inputs
from dinotune.errors import DataError, ImageReadError


def readable_inputs(inputs: str | Path | Iterable[str | Path], spec: InputSpec, max_pixels: int,
                    mode: Literal["full", "fast"] = "fast") -> list[Path]:
    """The image files named by ``inputs`` (files, or folders searched recursively) that read;
    the others are reported and skipped. Raises ImageReadError when none is left, DataError when
    one does not fit the model."""
    report = SkipReport()
    paths = collect_images(inputs, report)
    bands = {p for p in paths if is_band_file(p)}
    pictures = [p for p in paths if p not in bands]
    good = {p for p, ok in zip(pictures, scan_images(pictures, report, mode, max_pixels=max_pixels)) if ok}
    for p in sorted(bands):
        problem = check_band_file(p, mode, max_pixels, spec.layout)
        if problem:
            report.add(p, problem)
        else:
            good.add(p)
    report.print("inputs")
    paths = [p for p in paths if p in good]
    if not paths:
        raise ImageReadError(f"no readable images in {inputs}{report.why()}")
    check_inputs(paths, spec, "prediction")
    return paths


def read_image(path: Path, spec: InputSpec, max_pixels: int) -> np.ndarray:
    """``H x W x C``: a picture as uint8 RGB (upright), a band array as float32 in its units."""
    if spec.arrays:
        return read_bands(path, spec.layout, max_pixels).astype(np.float32, copy=False)
    return np.asarray(load_image(path, max_pixels))


def as_model_image(image: np.ndarray, spec: InputSpec, name: str) -> np.ndarray:
    """An in-memory image for the model: ``H x W x 3`` uint8 RGB for a picture model (a gray
    ``H x W`` is repeated to RGB, as pictures are read), ``H x W x C`` (or ``H x W`` for one band)
    float32 band values for a band-array model. DataError naming ``name`` when it does not fit."""
    array = np.asarray(image)
    if spec.arrays:
        array = array[..., None] if array.ndim == 2 else array
        if array.ndim != 3 or array.shape[-1] != spec.in_channels:
            raise DataError(f"{name}: an array of shape {array.shape}; the model takes H x W x {spec.in_channels} "
                            "band arrays")
        if not np.issubdtype(array.dtype, np.number):
            raise DataError(f"{name}: holds {array.dtype} values; band arrays must be numbers")
        array = array.astype(np.float32, copy=False)
        if not np.isfinite(array).all():
            raise DataError(f"{name}: holds NaN / inf values")
        return array
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise DataError(f"{name}: an array of shape {array.shape} ({array.dtype}); the model takes H x W x 3 uint8 RGB "
                        "pictures")
    return array
