"""Small synthetic datasets, one per task, for benchmarks that must run from a clean checkout (no
shared data, no network): coloured shapes on noise, in the layouts dinotune reads. Speed does not
depend on what the images show; the accuracy columns compare variants of one model on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {1: (220, 40, 40), 2: (40, 60, 220)}


def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(90, 160, (h, w, 3)).astype(np.uint8)


def _square(rng: np.random.Generator, h: int, w: int) -> tuple[int, int, int, int]:
    """``x, y, width, height`` of a box a quarter to a half of the image's side."""
    bw, bh = int(rng.integers(w // 4, w // 2)), int(rng.integers(h // 4, h // 2))
    return int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh)), bw, bh


def class_folders(root: Path, per_class: int, size: int, seed: int = 0) -> Path:
    """``root/{train,val}/{red,blue}/*.png``: a red or a blue square on noise."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for label, name in ((1, "red"), (2, "blue")):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = _noise(rng, size, size)
                x, y, bw, bh = _square(rng, size, size)
                pixels[y:y + bh, x:x + bw] = COLOURS[label]
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}.png")
    return root


def coco_folders(root: Path, per_split: int, size: int, seed: int = 0) -> Path:
    """``root/annotations/instances_{train,val}.json`` + ``root/{train,val}/*.png``: one or two
    boxes per image, category ids 1 (red) and 2 (blue)."""
    rng = np.random.default_rng(seed)
    cats = [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        (root / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i in range(per_split):
            pixels = _noise(rng, size, size)
            for _ in range(1 + i % 2):
                cat = int(rng.integers(1, 3))
                x, y, bw, bh = _square(rng, size, size)
                pixels[y:y + bh, x:x + bw] = COLOURS[cat]
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "bbox": [x, y, bw, bh],
                             "area": bw * bh, "iscrowd": 0})
            Image.fromarray(pixels).save(root / split / f"{i:03d}.png")
            images.append({"id": i + 1, "file_name": f"{i:03d}.png", "width": size, "height": size})
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def mask_folders(root: Path, per_split: int, size: int, seed: int = 0) -> Path:
    """``root/{train,val}/{images,masks}/*.png``: labels 0 (background), 1 and 2 (the squares)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(per_split):
            pixels, mask = _noise(rng, size, size), np.zeros((size, size), dtype=np.uint8)
            for label in (1, 2):
                x, y, bw, bh = _square(rng, size, size)
                pixels[y:y + bh, x:x + bw] = COLOURS[label]
                mask[y:y + bh, x:x + bw] = label
            Image.fromarray(pixels).save(root / split / "images" / f"{i:03d}.png")
            Image.fromarray(mask, mode="L").save(root / split / "masks" / f"{i:03d}.png")
    return root


def eval_images(task: str, root: Path) -> list[Path]:
    """The validation images of ``task``'s synthetic dataset under ``root``."""
    folder = {"classify": root / "val", "detect": root / "val", "segment": root / "val" / "images"}[task]
    return sorted(folder.rglob("*.png"))
