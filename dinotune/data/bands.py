"""How images enter the model: band count, which bands are red / green / blue, per-band statistics.

Two kinds of file reach a model. Pictures (JPEG, PNG, 8-bit TIFF, ...) are read by Pillow as RGB,
scaled to [0, 1] and normalised with the ImageNet mean / std, exactly as before N-band input
existed. Band arrays (``.npy``, multi-band TIFF, see ``data/arrays.py``) keep all their bands in
their own units (uint16 reflectance stays reflectance) and are normalised with each band's mean /
std over the training data, saved in the run (``meta["input"]``) so evaluation and prediction
normalise the same way.

``InputSpec`` carries that decision from the training data to the transforms, the model (its
patch embedding is widened to ``in_channels``, ``backbone/channels.py``) and the pictures (band
arrays are shown through their RGB bands with a 2-98 % percentile stretch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from dinotune.data.arrays import BandLayout, is_band_file, read_bands
from dinotune.data.images import DEFAULT_MAX_IMAGE_PIXELS, load_image
from dinotune.data.input_spec import (  # noqa: F401 (re-exported: the torch path reads them from here)
    BandMoments,
    IMAGENET_MEAN,
    IMAGENET_STD,
    InputSpec,
    check_band_counts,
    check_inputs,
    file_bands,
)
from dinotune.errors import ConfigError, DataError

# Band statistics are computed over at most this many training files (evenly spaced): enough for
# stable means and deviations, and a bounded cost on a large dataset.
STATS_MAX_FILES = 2000


def default_rgb_bands(in_channels: int) -> list[int]:
    """The first three bands; with fewer, the last band repeated (one band is shown as gray)."""
    return [min(i, in_channels - 1) for i in range(3)]


# ------------------------------------------------------------------------------------ reading
def read_input(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               layout: BandLayout = "auto") -> Image.Image | torch.Tensor:
    """A picture as an upright RGB PIL image (``load_image``), a band array as a float32
    ``C x H x W`` tensor in the file's units. Raises ImageReadError naming the file."""
    from torchvision import tv_tensors

    path = Path(path)
    if is_band_file(path):
        array = read_bands(path, layout, max_pixels)
        return tv_tensors.Image(torch.from_numpy(array.astype(np.float32, copy=False)).permute(2, 0, 1).contiguous())
    return load_image(path, max_pixels)


def input_bands(image: Image.Image | torch.Tensor) -> int:
    """Bands of what ``read_input`` returned."""
    return 3 if isinstance(image, Image.Image) else int(image.shape[0])


# ----------------------------------------------------------------------------------- statistics
def band_statistics(paths: Sequence[Path], layout: BandLayout = "auto", max_pixels: int = 0,
                    max_files: int = STATS_MAX_FILES) -> tuple[list[float], list[float]]:
    """Per-band mean and standard deviation over every pixel of ``paths`` (at most ``max_files``
    of them, evenly spaced), in the reader's units: raw values for band arrays, [0, 1] for
    pictures. Sums in float64; a band that never varies gets std 1 (dividing by 0 is no option)."""
    if not paths:
        raise DataError("no files to compute band statistics from")
    step = max(1, -(-len(paths) // max_files))
    moments = BandMoments()
    for p in list(paths)[::step]:
        x = _as_array(read_input(p, max_pixels, layout))
        moments.add(x.reshape(-1, x.shape[-1]))
    return moments.result()


def _as_array(image: Image.Image | torch.Tensor) -> np.ndarray:
    """``H x W x C`` float: pictures scaled to [0, 1] (the transforms' units), arrays as read."""
    if isinstance(image, Image.Image):
        return np.asarray(image, dtype=np.float32) / 255.0
    return image.permute(1, 2, 0).numpy()


def resolve_input_spec(paths: Sequence[Path], *, in_channels: int, rgb_bands: Sequence[int], layout: BandLayout,
                       stats: str, mean: Sequence[float], std: Sequence[float],
                       max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> InputSpec:
    """The ``InputSpec`` of training files ``paths`` (already checked) under the ``bands`` config.

    Pictures and band arrays are not mixed in one dataset (refused naming a file of each kind).
    ``in_channels`` (0 = from the data) must match the files' band count; the RGB bands and given
    statistics must fit it. Statistics: given ``mean`` / ``std`` win; else ``stats == "data"`` or
    band arrays compute them from ``paths``; else ImageNet's."""
    arrays = [is_band_file(p) for p in paths]
    if any(arrays) and not all(arrays):
        picture = next(p for p, a in zip(paths, arrays) if not a)
        array = next(p for p, a in zip(paths, arrays) if a)
        raise DataError(f"the data mixes pictures ({picture}) and band arrays ({array}); convert one kind to "
                        "the other (e.g. save the pictures as .npy)")
    is_arrays = bool(arrays) and all(arrays)
    found = check_band_counts(paths, layout) if is_arrays else 3
    if in_channels and in_channels != found:
        raise DataError(f"--in-channels {in_channels} but the training files have {found} band(s) (e.g. "
                        f"{paths[0] if paths else '?'}); pass --in-channels {found} or 0 (from the data)")
    return make_spec(found, rgb_bands=rgb_bands, layout=layout, arrays=is_arrays, stats=stats, mean=mean, std=std,
                     paths=paths, max_pixels=max_pixels)


def make_spec(in_channels: int, *, rgb_bands: Sequence[int] = (), layout: BandLayout = "auto", arrays: bool = False,
              stats: str = "auto", mean: Sequence[float] = (), std: Sequence[float] = (),
              paths: Sequence[Path] = (), max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> InputSpec:
    """An ``InputSpec`` for ``in_channels`` bands, its statistics given, computed from ``paths``
    (band arrays, or ``stats == "data"``), or ImageNet's (RGB pictures)."""
    rgb = list(rgb_bands) or default_rgb_bands(in_channels)
    if len(rgb) != 3 or any(not 0 <= b < in_channels for b in rgb):
        raise ConfigError(f"--rgb-bands {rgb}: three 0-based band indices below the band count {in_channels}")
    if mean:
        if len(mean) != in_channels or len(std) != in_channels:
            raise ConfigError(f"--band-mean / --band-std have {len(mean)} / {len(std)} values but the data has "
                              f"{in_channels} band(s)")
        m, s = list(map(float, mean)), list(map(float, std))
    elif arrays or stats == "data":
        m, s = band_statistics(paths, layout, max_pixels)
    else:
        m, s = list(IMAGENET_MEAN), list(IMAGENET_STD)
    return InputSpec(in_channels, rgb, m, s, arrays, layout)


# ------------------------------------------------------------------------------------- pictures
def stretch_to_rgb(image: Image.Image | torch.Tensor | np.ndarray, rgb_bands: Sequence[int],
                   low: float = 2.0, high: float = 98.0) -> Image.Image:
    """An RGB picture of any input: a PIL image as it is; a band array (``C x H x W`` tensor or
    ``H x W x C`` array) through its ``rgb_bands``, each stretched from its ``low`` to its ``high``
    percentile onto 0..255 (reflectance of a few thousand units would otherwise be black or white)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = image.permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    rgb = array[..., list(rgb_bands)].astype(np.float64)
    out = np.empty(rgb.shape, dtype=np.uint8)
    for c in range(3):
        lo, hi = np.percentile(rgb[..., c], [low, high])
        scaled = (rgb[..., c] - lo) / (hi - lo) if hi > lo else np.zeros_like(rgb[..., c])
        out[..., c] = np.rint(np.clip(scaled, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(out, mode="RGB")


def display_image(path: Path, spec: InputSpec | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """The picture to draw for ``path``: pictures as read, band arrays through the RGB bands of
    ``spec`` (default: the first three) with a percentile stretch."""
    spec = spec or InputSpec()
    image = read_input(path, max_pixels, spec.layout)
    rgb = spec.rgb_bands if input_bands(image) == spec.in_channels else default_rgb_bands(input_bands(image))
    return stretch_to_rgb(image, rgb)


def paths_of(items: Iterable[Any]) -> list[Path]:
    """The paths of ``(path, label)`` items."""
    return [Path(item[0]) for item in items]
