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

__all__ = ["palette", "colorize", "overlay", "with_legend", "comparison_figure", "save_mask_png", "IGNORE_COLOUR"]

# The ignore label is drawn white: it reads as "nothing here" on the figures and never collides
# with a VOC class colour (VOC's own void colour is the cream (224, 224, 192)).
IGNORE_COLOUR = (255, 255, 255)
MAX_LEGEND_ENTRIES = 20


def palette(num_classes: int = 256, ignore_index: int | None = 255,
            colours: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """The Pascal VOC colour map as a ``256 x 3`` uint8 array, row ``i`` the colour of label ``i``.

    Colours come from VOC's bit-interleaving formula (bits 0, 1, 2 of the label go to the top
    bits of red, green, blue, the next three to the next bits, and so on): 0 is black, 1 is
    (128, 0, 0), 15 is (192, 128, 128). All 256 rows are filled, so labels past ``num_classes``
    still get a colour; row ``ignore_index`` is white (``IGNORE_COLOUR``) unless it is None.
    ``colours``: the ``(r, g, b)`` of labels ``0..len-1`` instead (a run's colour table, so
    predictions look like the masks it was trained on).

    Raises:
        ValueError: ``num_classes`` is outside 1..256 (masks hold 8-bit labels), or more colours
            than 256.
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
    if colours is not None and len(colours):
        given = np.asarray(colours, dtype=np.int64).reshape(-1, 3)
        if len(given) > 256:
            raise ValueError(f"at most 256 colours for 8-bit masks, got {len(given)}")
        out[: len(given)] = given
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


def _font(size: int) -> Any:
    """Pillow's default font at ``size`` pixels (its fixed bitmap font where FreeType is missing)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, ImportError, OSError):
        return ImageFont.load_default()


def with_legend(image: Image.Image, mask: Any, palette: np.ndarray, class_names: Sequence[str],
                ignore_index: int | None = 255) -> Image.Image:
    """``image`` (an overlay) with a legend panel on its right: a colour swatch and the name of each
    class present in ``mask`` (the ``MAX_LEGEND_ENTRIES`` largest by area, in label order). The
    image's own pixels stay where they were (top left); the canvas grows down when the legend is
    taller than the image. A mask with no class (all ignore) returns ``image`` as it is."""
    from PIL import ImageDraw

    labels = _legend_labels([_as_mask(mask)], ignore_index)
    if not labels:
        return image
    image = image.convert("RGB")
    size = max(10, min(32, round(max(image.size) / 40)))  # readable on a thumbnail and on an aerial tile
    font, pad = _font(size), max(3, size // 3)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    names = [class_names[i] if i < len(class_names) else f"class {i}" for i in labels]
    text_w = max(probe.textbbox((0, 0), n, font=font)[2] for n in names)
    row = size + pad
    width = pad + size + pad + text_w + pad
    height = max(image.height, pad + row * len(labels))
    out = Image.new("RGB", (image.width + width, height), (255, 255, 255))
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    x = image.width + pad
    for k, (label, name) in enumerate(zip(labels, names)):
        y = pad + k * row
        colour = tuple(int(v) for v in np.asarray(palette)[label])
        draw.rectangle([x, y, x + size - 1, y + size - 1], fill=colour, outline=(60, 60, 60))
        top, bottom = draw.textbbox((0, 0), name, font=font)[1::2]
        draw.text((x + size + pad, y + (size - (bottom - top)) // 2 - top), name, fill=(0, 0, 0), font=font)
    return out


def comparison_figure(image: Image.Image, gt_mask: Any | None, pred_mask: Any, class_names: Sequence[str],
                      path: str | Path, ignore_index: int | None = 255,
                      colours: Sequence[Sequence[int]] | None = None) -> Path:
    """Save image | ground truth overlay | prediction overlay side by side as a PNG (the middle
    panel is left out when ``gt_mask`` is None), with a legend of the classes present in either
    mask (the ``MAX_LEGEND_ENTRIES`` largest by area). ``colours``: the classes' colours (a run's
    colour table; default the VOC colour map). Returns ``path``."""
    # matplotlib only here: masks and overlays are written without it (dinotune.runtime needs neither)
    from matplotlib.patches import Patch

    from dinotune.viz.plots import _new_figure, _save

    image = image.convert("RGB")
    pal = palette(max(1, min(len(class_names), 256)), ignore_index, colours)
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
