"""The DINOv2 paper's picture of patch features: one PCA fitted jointly over the last-layer patch
tokens of several images, its first three components shown as RGB. Parts that match across the
images (heads, wheels, sky) get the same colour. ``dinotune.api.pca`` puts a run or a backbone spec
and image files together with these two functions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from dinotune.data.bands import InputSpec
from dinotune.viz.plots import _new_figure, _save

__all__ = ["pca_features", "pca_figure"]


def _resize(image: Image.Image, image_size: int | None, patch: int) -> Image.Image:
    """Short side ``image_size`` (None: the image's own), both sides rounded to multiples of ``patch``."""
    w, h = image.size
    scale = 1.0 if image_size is None else image_size / min(w, h)
    size = tuple(max(patch, int(round(s * scale / patch)) * patch) for s in (w, h))
    return image if size == (w, h) else image.resize(size, Image.BICUBIC)


def _resize_bands(x: torch.Tensor, image_size: int | None, patch: int) -> torch.Tensor:
    """``_resize`` for a ``C x H x W`` band tensor (bicubic, antialiased)."""
    h, w = x.shape[-2:]
    scale = 1.0 if image_size is None else image_size / min(w, h)
    size = tuple(max(patch, int(round(s * scale / patch)) * patch) for s in (h, w))
    if size == (h, w):
        return x
    return torch.nn.functional.interpolate(x[None].float(), size=size, mode="bicubic", antialias=True,
                                           align_corners=False)[0]


def _fit_pca(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, components)`` of ``x`` (M x C, float64): components ``k x C``, largest variance first,
    each signed so that its largest-magnitude loading is positive (the decomposition's own sign is
    arbitrary, and would flip colours from run to run or machine to machine)."""
    mean = x.mean(dim=0)
    xc = x - mean
    if x.shape[0] > x.shape[1]:  # C x C covariance: cheap for many patches
        _, vecs = torch.linalg.eigh(xc.T @ xc)
        comps = vecs.flip(1)[:, :k].T
    else:
        comps = torch.linalg.svd(xc, full_matrices=False).Vh[:k]
    pivot = comps.abs().argmax(dim=1)
    signs = torch.sign(comps.gather(1, pivot[:, None]))
    return mean, comps * torch.where(signs == 0, 1.0, signs).to(comps)


def _minmax(p: torch.Tensor) -> torch.Tensor:
    """Each column scaled to [0, 1] (a constant column becomes 0)."""
    lo, hi = p.min(dim=0).values, p.max(dim=0).values
    return (p - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))


def _border(grid: tuple[int, int]) -> torch.Tensor:
    h, w = grid
    b = torch.zeros(h, w, dtype=torch.bool)
    b[0], b[-1], b[:, 0], b[:, -1] = True, True, True, True
    return b.reshape(-1)


@torch.no_grad()
def pca_features(backbone, images: Sequence[Image.Image | torch.Tensor], image_size: int | None,
                 n_components: int = 3, foreground_threshold: float | None = None,
                 spec: InputSpec | None = None) -> list[np.ndarray]:
    """PCA maps of ``images`` under ``backbone`` (a ``DinoBackbone``): one ``h x w x n_components``
    float array in [0, 1] per image, ``(h, w)`` its patch grid.

    Each image is resized so its short side is ``image_size`` (None keeps its size), both sides
    rounded to multiples of the patch size, normalised with ``spec``'s per-band mean / std (default:
    ImageNet's, for RGB pictures; band arrays come as ``C x H x W`` tensors) and run alone (sizes
    may differ). One PCA is fitted over all images' patch tokens together, and each
    component is min-max scaled over all images, so colours are comparable between images.

    ``foreground_threshold`` (in [0, 1]) follows DINOv2's demo: patches whose scaled first
    component is below it are background, set to 0; the PCA is then refitted on the foreground
    patches alone and scaled over them. For this the first component is oriented so that the
    border patches (where the background usually is) score lower than the rest.
    """
    if not images:
        return []
    patch = backbone.patch_size
    param = next(backbone.parameters())
    spec = spec or InputSpec()
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
    was_training = backbone.training
    backbone.eval()
    tokens, grids = [], []
    try:
        for image in images:
            if isinstance(image, torch.Tensor):
                x = _resize_bands(image.as_subclass(torch.Tensor).float(), image_size, patch)
            else:
                im = _resize(image.convert("RGB"), image_size, patch)
                x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
            x = ((x - mean) / std)[None].to(device=param.device, dtype=param.dtype)
            feats = backbone(x)
            tokens.append(feats.patch_tokens[0].double().cpu())
            grids.append(feats.grid)
    finally:
        backbone.train(was_training)
    x = torch.cat(tokens)
    if not 1 <= n_components <= min(x.shape):
        raise ValueError(f"n_components must be in 1..{min(x.shape)} for {x.shape[0]} patches of "
                         f"width {x.shape[1]}, got {n_components}")
    mean_, comps = _fit_pca(x, n_components)
    proj = (x - mean_) @ comps.T
    if foreground_threshold is None:
        out = _minmax(proj)
    else:
        border = torch.cat([_border(g) for g in grids])
        if border.any() and (~border).any() and proj[border, 0].mean() > proj[~border, 0].mean():
            proj[:, 0] = -proj[:, 0]
        fg = _minmax(proj[:, :1])[:, 0] >= foreground_threshold
        out = torch.zeros_like(proj)
        if int(fg.sum()) > n_components:  # enough foreground to refit on
            m2, c2 = _fit_pca(x[fg], n_components)
            out[fg] = _minmax((x[fg] - m2) @ c2.T)
        elif fg.any():
            out[fg] = _minmax(proj[fg])
    maps, start = [], 0
    for h, w in grids:
        maps.append(out[start:start + h * w].reshape(h, w, n_components).float().numpy())
        start += h * w
    return maps


def pca_figure(images: Sequence[Image.Image], maps: Sequence[np.ndarray], path: str | Path,
               titles: Sequence[str] | None = None, columns: int = 3) -> Path:
    """Save each image beside its PCA map (first three components as RGB, upsampled nearest to
    the image size), ``columns`` pairs per row, as a PNG. Returns ``path``."""
    n = max(1, len(images))
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    aspect = max((im.height / max(1, im.width) for im in images), default=1.0)
    cell = 3.0
    fig = _new_figure(2 * cell * cols, min(cell * aspect + 0.4, 10.0) * rows)
    for i, (image, pmap) in enumerate(zip(images, maps)):
        rgb = np.zeros(pmap.shape[:2] + (3,), dtype=np.float32)
        rgb[..., : min(3, pmap.shape[2])] = pmap[..., :3]
        big = Image.fromarray(np.rint(np.clip(rgb, 0, 1) * 255).astype(np.uint8)).resize(image.size, Image.NEAREST)
        for j, (pic, label) in enumerate(((image.convert("RGB"), titles[i] if titles else f"image {i + 1}"),
                                          (big, "PCA of patch features"))):
            ax = fig.add_subplot(rows, 2 * cols, 2 * i + j + 1)
            ax.imshow(np.asarray(pic), interpolation="nearest")
            ax.set_title(label, fontsize=9)
            ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)
