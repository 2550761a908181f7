"""Segmentation masks as pictures: the Pascal VOC colour map, coloured masks, overlays, side-by-side
comparisons, and palette PNGs whose pixel values are the labels (like VOC's ``SegmentationClass``).

Masks are ``H x W`` integer arrays of class indices in ``0..255``; ``ignore_index`` (255 by default,
VOC's "void") marks pixels that belong to no class. Every file is written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from dinotune.utils import atomic_write_bytes

__all__ = ["palette", "colorize", "overlay", "comparison_figure", "save_mask_png", "IGNORE_COLOUR"]

# The ignore label is drawn white: it reads as "nothing here" on the figures and never collides
# with a VOC class colour (VOC's own void colour is the cream (224, 224, 192)).
IGNORE_COLOUR = (255, 255, 255)
MAX_LEGEND_ENTRIES = 20


def palette(num_classes: int = 256, ignore_index: int | None = 255) -> np.ndarray:
    """The Pascal VOC colour map as a ``256 x 3`` uint8 array, row ``i`` the colour of label ``i``.

    Colours come from VOC's bit-interleaving formula (bits 0, 1, 2 of the label go to the top
    bits of red, green, blue, the next three to the next bits, and so on): 0 is black, 1 is
    (128, 0, 0), 15 is (192, 128, 128). All 256 rows are filled, so labels past ``num_classes``
    still get a colour; row ``ignore_index`` is white (``IGNORE_COLOUR``) unless it is None.

    Raises:
        ValueError: ``num_classes`` is outside 1..256 (masks hold 8-bit labels).
    """
    if not 1 <= num_classes <= 256:
        raise ValueError(f"num_classes must be in 1..256 for 8-bit masks, got {num_classes}")
    labels = np.arange(256)
    out = np.zeros((256, 3), dtype=np.int64)
    c = labels.copy()
    for j in range(8):
        for ch in range(3):
            out[:, ch] |= ((c >> ch) & 1) << (7 - j)
        c >>= 3
    if ignore_index is not None and 0 <= ignore_index < 256:
        out[ignore_index] = IGNORE_COLOUR
    return out.astype(np.uint8)


def _as_mask(mask: Any) -> np.ndarray:
    """``mask`` (array, tensor or "L"/"P" PIL image) as an ``H x W`` int64 array of labels 0..255."""
    if hasattr(mask, "detach"):  # torch tensor
        mask = mask.detach().cpu().numpy()
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"a mask must be H x W, got shape {m.shape}")
    if m.dtype.kind not in "iub":
        raise ValueError(f"a mask holds integer labels, got dtype {m.dtype}")
    m = m.astype(np.int64)
    if m.size and (m.min() < 0 or m.max() > 255):
        raise ValueError(f"mask labels must be in 0..255, got {m.min()}..{m.max()}")
    return m


def _fit(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``mask`` resized (nearest) to PIL ``size`` = (width, height) if it differs."""
    if mask.shape[::-1] == tuple(size):
        return mask
    return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize(size, Image.NEAREST)).astype(np.int64)


def colorize(mask: Any, palette: np.ndarray) -> Image.Image:
    """An RGB image of ``mask``, each pixel the ``palette`` colour of its label."""
    m = _as_mask(mask)
    return Image.fromarray(np.asarray(palette, dtype=np.uint8)[m])


def overlay(image: Image.Image, mask: Any, palette: np.ndarray, alpha: float = 0.5,
            ignore_index: int | None = 255) -> Image.Image:
    """``image`` with ``mask`` blended in at opacity ``alpha``; ``ignore_index`` pixels are left
    exactly as in ``image``. A mask of another size is resized (nearest) to the image first."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    m = _fit(_as_mask(mask), image.size)
    colours = np.asarray(palette, dtype=np.float32)[m]
    blended = np.clip(np.rint((1.0 - alpha) * base + alpha * colours), 0, 255)
    if ignore_index is not None:
        blended[m == ignore_index] = base[m == ignore_index]
    return Image.fromarray(blended.astype(np.uint8))


def _legend_labels(masks: Sequence[np.ndarray], ignore_index: int | None) -> list[int]:
    """Labels present in ``masks``, most pixels first, capped at ``MAX_LEGEND_ENTRIES``, then sorted."""
    counts = np.zeros(256, dtype=np.int64)
    for m in masks:
        counts += np.bincount(m.ravel(), minlength=256)
    if ignore_index is not None and 0 <= ignore_index < 256:
        counts[ignore_index] = 0
    present = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    return sorted(present[:MAX_LEGEND_ENTRIES])


def comparison_figure(image: Image.Image, gt_mask: Any | None, pred_mask: Any, class_names: Sequence[str],
                      path: str | Path, ignore_index: int | None = 255) -> Path:
    """Save image | ground truth overlay | prediction overlay side by side as a PNG (the middle
    panel is left out when ``gt_mask`` is None), with a legend of the classes present in either
    mask (the ``MAX_LEGEND_ENTRIES`` largest by area). Returns ``path``."""
    # matplotlib only here: masks and overlays are written without it (dinotune.runtime needs neither)
    from matplotlib.patches import Patch

    from dinotune.viz.plots import _new_figure, _save

    image = image.convert("RGB")
    pal = palette(max(1, min(len(class_names), 256)), ignore_index)
    pred = _fit(_as_mask(pred_mask), image.size)
    panels = [("image", image)]
    masks = [pred]
    if gt_mask is not None:
        gt = _fit(_as_mask(gt_mask), image.size)
        masks.insert(0, gt)
        panels.append(("ground truth", overlay(image, gt, pal, ignore_index=ignore_index)))
    panels.append(("prediction", overlay(image, pred, pal, ignore_index=ignore_index)))

    aspect = image.height / max(1, image.width)
    panel_w = 4.0
    fig = _new_figure(panel_w * len(panels), min(panel_w * aspect, 12.0) + 1.3)
    for i, (title, im) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(np.asarray(im), interpolation="nearest")
        ax.set_title(title)
        ax.axis("off")
    labels = _legend_labels(masks, ignore_index)
    if labels:
        handles = [Patch(facecolor=pal[i] / 255.0, edgecolor="0.3",
                         label=class_names[i] if i < len(class_names) else f"class {i}") for i in labels]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.04 * (1 + (len(labels) - 1) // 5) if labels else 0, 1, 1))
    return _save(fig, path)


def save_mask_png(mask: Any, path: str | Path, palette: np.ndarray) -> Path:
    """Write ``mask`` as a palette ("P") PNG whose pixel values are the labels themselves, coloured
    by ``palette`` in viewers; ``Image.open(path)`` and ``np.asarray`` read the labels back."""
    path = Path(path)
    m = _as_mask(mask).astype(np.uint8)
    im = Image.frombytes("P", (m.shape[1], m.shape[0]), np.ascontiguousarray(m).tobytes())
    im.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False)
    atomic_write_bytes(path, buf.getvalue())
    return path
