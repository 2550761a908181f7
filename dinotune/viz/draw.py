"""Drawing detections on images: boxes, class names and scores, one colour per class."""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from dinotune.utils import atomic_write_bytes


def class_colour(index: int) -> tuple[int, int, int]:
    """A stable, well-separated colour for a class index (golden-ratio hue steps)."""
    hue = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(
    image: Image.Image,
    boxes_xyxy: Sequence[Sequence[float]],
    labels: Sequence[int],
    names: Sequence[str],
    scores: Sequence[float] | None = None,
    line_width: int | None = None,
) -> Image.Image:
    """A copy of ``image`` with each ``xyxy`` pixel box outlined and captioned ``name score``."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = line_width or max(2, round(max(out.size) / 300))
    font = ImageFont.load_default()
    for i, (box, label) in enumerate(zip(boxes_xyxy, labels)):
        colour = class_colour(int(label))
        x0, y0, x1, y1 = [float(v) for v in box]
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        caption = names[int(label)] + (f" {scores[i]:.2f}" if scores is not None else "")
        tx0, ty0, tx1, ty1 = draw.textbbox((x0, y0), caption, font=font)
        top = y0 - (ty1 - ty0) - 2 if y0 - (ty1 - ty0) - 2 >= 0 else y0
        draw.rectangle([x0, top, x0 + (tx1 - tx0) + 4, top + (ty1 - ty0) + 2], fill=colour)
        draw.text((x0 + 2, top), caption, fill=(0, 0, 0), font=font)
    return out


def side_by_side(panels: Sequence[tuple[str, Image.Image]], gap: int = 8) -> Image.Image:
    """``panels`` (title, image) placed left to right on white, each under its title, e.g. ground
    truth | prediction: one picture a reader compares at a glance. Images of unequal height are
    top-aligned."""
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_h = max((probe.textbbox((0, 0), t, font=font)[3] for t, _ in panels), default=0) + 6
    width = sum(im.width for _, im in panels) + gap * (len(panels) - 1)
    height = max((im.height for _, im in panels), default=0) + title_h
    out = Image.new("RGB", (max(1, width), max(1, height)), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    x = 0
    for title, im in panels:
        draw.text((x + 2, 2), title, fill=(0, 0, 0), font=font)
        out.paste(im.convert("RGB"), (x, title_h))
        x += im.width + gap
    return out


def save_image(image: Image.Image, path: str | Path, quality: int = 90) -> Path:
    """Write ``image`` atomically; the format follows the suffix (JPEG by default)."""
    import io

    path = Path(path)
    buf = io.BytesIO()
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    image.save(buf, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    atomic_write_bytes(path, buf.getvalue())
    return path
