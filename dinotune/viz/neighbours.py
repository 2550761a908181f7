"""The picture of a similarity search: one row per query, the query image first and then its nearest
images left to right, each under its file name and score.

Composed with Pillow, as ``dinotune.viz.draw.side_by_side`` is, rather than a matplotlib grid of
axes: every thumbnail is pasted at its exact pixel size (no resampling by the figure's DPI), a
grid of 88 images is drawn in milliseconds instead of building 88 axes, and the layout needs no
tight-layout guessing. Each thumbnail is fitted into a ``thumb x thumb`` square keeping its aspect
(small images are enlarged, large ones reduced) and centred on a light grey cell. An image that could
not be read (``None``) is a darker grey cell reading "unreadable". At most ``MAX_QUERIES`` rows and
``MAX_HITS`` hits per row (``MAX_HITS + 1`` columns) are drawn; the rest are left out so that the
picture stays a readable size.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dinotune.utils import atomic_write_bytes

__all__ = ["MAX_HITS", "MAX_QUERIES", "neighbours_figure"]

MAX_QUERIES = 8
MAX_HITS = 10
GAP = 8  # between cells
QUERY_GAP = 24  # between the query and its first hit, with a line in it
MARGIN = 16
CELL = (242, 242, 242)
UNREADABLE = (200, 200, 200)
QUERY_FRAME = (31, 119, 180)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``size`` px (FreeType), or its fixed bitmap font without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB: transparency over white, 16-bit and float images stretched to 0-255."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(image, dtype=np.float64)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255.0
        return Image.fromarray(np.nan_to_num(a).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return image.convert("RGB")


def _fit(image: Image.Image, side: int) -> Image.Image:
    """``image`` scaled to fit a ``side x side`` square, aspect kept."""
    image = _rgb(image)
    w, h = image.size
    scale = side / max(w, h, 1)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return image
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    return image.resize(size, resample, reducing_gap=3.0 if scale < 0.5 else None)


def _clip(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` shortened in the middle with an ellipsis until it fits ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    keep = len(text)
    while keep > 2:
        keep -= 1
        head = (keep + 1) // 2
        short = text[:head] + "…" + text[len(text) - (keep - head):]
        if draw.textlength(short, font=font) <= width:
            return short
    return "…"


def neighbours_figure(queries: Sequence[tuple[str, Image.Image]],
                      hits: Sequence[Sequence[tuple[str, float, Image.Image | None]]],
                      path: str | Path, *, thumb: int = 160, title: str | None = None) -> Path:
    """Save the query images and their nearest neighbours as one PNG.

    Args:
        queries: ``Q`` ``(name, image)`` pairs; the name's file name is shown under "query". An image
            of ``None`` is drawn as unreadable.
        hits: ``Q`` lists, one per query, of ``(name, score, image or None)`` nearest first; the score
            is printed with 3 decimals, ``None`` (an image that could not be read) is a grey
            placeholder reading "unreadable".
        path: output PNG, written atomically; parent folders are created.
        thumb: the side of each square cell, in pixels.
        title: an optional line above the grid.

    Returns:
        ``path`` as a ``Path``. The picture has ``min(Q, MAX_QUERIES)`` rows and
        ``1 + min(max hits per query, MAX_HITS)`` columns.

    Raises:
        ValueError: no queries, ``hits`` not one list per query, or ``thumb`` below 32.
    """
    if not queries:
        raise ValueError("no queries to draw")
    if len(hits) != len(queries):
        raise ValueError(f"{len(hits)} hit lists for {len(queries)} queries")
    if thumb < 32:
        raise ValueError(f"thumb must be at least 32 pixels, got {thumb}")
    rows = [(q, list(h)[:MAX_HITS]) for q, h in zip(list(queries)[:MAX_QUERIES], list(hits)[:MAX_QUERIES])]
    columns = max(len(h) for _, h in rows)

    size = max(11, round(thumb / 12))
    font, bold = _font(size), _font(size + 1)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line = probe.textbbox((0, 0), "Ag…", font=font)[3] + 3
    caption = 2 * line + 4  # two lines: name, then score (or "query")
    title_h = probe.textbbox((0, 0), "Ag", font=_font(size + 4))[3] + 12 if title else 0
    row_h = caption + thumb
    width = 2 * MARGIN + thumb + (QUERY_GAP + columns * thumb + (columns - 1) * GAP if columns else 0)
    height = 2 * MARGIN + title_h + len(rows) * row_h + (len(rows) - 1) * 2 * GAP

    out = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    if title:
        draw.text((MARGIN, MARGIN), _clip(draw, title, _font(size + 4), width - 2 * MARGIN), fill=(0, 0, 0),
                  font=_font(size + 4))

    def cell(x: int, y: int, top: str, bottom: str, image: Image.Image | None, colour=(0, 0, 0)) -> None:
        draw.text((x, y), _clip(draw, top, bold, thumb), fill=colour, font=bold)
        draw.text((x, y + line), _clip(draw, bottom, font, thumb), fill=(70, 70, 70), font=font)
        y += caption
        if image is None:
            draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], fill=UNREADABLE)
            draw.text((x + thumb // 2, y + thumb // 2), "unreadable", fill=(90, 90, 90), font=font, anchor="mm")
            return
        draw.rectangle([x, y, x + thumb - 1, y + thumb - 1], fill=CELL)
        small = _fit(image, thumb)
        out.paste(small, (x + (thumb - small.width) // 2, y + (thumb - small.height) // 2))

    y = MARGIN + title_h
    for (name, image), found in rows:
        cell(MARGIN, y, "query", Path(name).name, image, colour=QUERY_FRAME)
        draw.rectangle([MARGIN - 3, y + caption - 3, MARGIN + thumb + 2, y + caption + thumb + 2],
                       outline=QUERY_FRAME, width=2)
        x = MARGIN + thumb + QUERY_GAP
        if columns:
            draw.line([x - QUERY_GAP // 2, y, x - QUERY_GAP // 2, y + row_h], fill=(190, 190, 190), width=1)
        for rank, (hit_name, score, hit_image) in enumerate(found, 1):
            cell(x, y, Path(hit_name).name, f"#{rank}  score {float(score):.3f}", hit_image)
            x += thumb + GAP
        y += row_h + 2 * GAP
    path = Path(path)
    buf = io.BytesIO()
    out.save(buf, format="PNG")  # PNG whatever the suffix: the thumbnails' text stays sharp
    atomic_write_bytes(path, buf.getvalue())
    return path
