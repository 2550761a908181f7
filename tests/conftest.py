"""Shared fixtures: tiny synthetic image datasets and the location of ../shared data.

Real datasets come from ``$DINOTUNE_SHARED`` (the Makefile sets it to ``../shared``); tests that
need them skip with the reason when it is unset or missing.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinotune.utils import set_quiet

# Tests run on 2 CPU cores: more threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))
set_quiet(True)


def shared_dir() -> Path | None:
    value = os.environ.get("DINOTUNE_SHARED")
    return Path(value).expanduser().resolve() if value else None


def shared_data(name: str) -> Path:
    """``$DINOTUNE_SHARED/data/<name>``, or skip the test saying why."""
    root = shared_dir()
    if root is None:
        pytest.skip("DINOTUNE_SHARED is not set (point it at the shared/ folder with the real datasets)")
    path = root / "data" / name
    if not path.exists():
        pytest.skip(f"{path} does not exist")
    return path


COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def make_image(colour: tuple[int, int, int], size: int, seed: int, pattern: int = 0) -> Image.Image:
    """A noisy colour field with a class-specific stripe pattern: easy to tell apart."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = colour
    if pattern % 2:
        img[:, ::4] *= 0.4
    else:
        img[::4, :] *= 0.4
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_class_folders(root: Path, classes: list[str], n_per_class: int, size: int = 48,
                       seed: int = 0, fmt: str = "png") -> Path:
    """``root/<class>/<i>.<fmt>`` synthetic images."""
    for c_index, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            make_image(COLOURS[name], size, seed * 1000 + c_index * 100 + i, pattern=c_index).save(
                folder / f"{name}_{i}.{fmt}")
    return root


@pytest.fixture(scope="module")
def one_thread():
    """Tiny forwards and tensor init: one torch thread is as fast on an idle machine and 5-100x
    faster when other processes keep the (2) cores busy (intra-op threads then spin). Modules use
    it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# LayerScale (timm ``gamma``, transformers DINOv3 ``lambda1``) and learned tokens of either layout
_LAYERSCALE = ("gamma", "lambda1")
_TOKENS = ("cls_token", "reg_token", "register_tokens", "mask_token", "pos_embed")


@torch.no_grad()
def randomize_parameters(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded random values of a sensible scale, for parity tests
    between two implementations. Default inits leave LayerScale at 1e-5 (near-identity blocks),
    norms at 1 / 0, biases at 0 and gates near 0: any of these would hide a dropped or swapped
    tensor, so nothing of them is kept."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g)
        if name.endswith(_LAYERSCALE):  # random magnitude and sign
            p.copy_(r * 0.5)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(r * 0.2 + 1.0)
        elif name.endswith("bias"):
            p.copy_(r * 0.1)
        elif name.endswith(_TOKENS):
            p.copy_(r * 0.5)
        else:  # linear / conv weights: unit-variance outputs
            p.copy_(r * p[0].numel() ** -0.5)


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """``train/`` and ``val/`` class folders, 2 classes, 6 + 3 images each."""
    make_class_folders(tmp_path / "data" / "train", ["red", "blue"], 6, seed=1)
    make_class_folders(tmp_path / "data" / "val", ["red", "blue"], 3, seed=2)
    return tmp_path / "data"


def tiny_options(out: Path, **extra) -> dict:
    """Keyword options for ``dinotune.train`` that keep a run to a second or two on a CPU."""
    opts = dict(model="random:tiny", image_size=28, batch_size=4, epochs=2, workers=0,
                progress=False, device="cpu", out=str(out), check_images="full")
    opts.update(extra)
    return opts


def make_trainer(cfg, run_dir: Path):
    """The pieces ``dinotune.train`` assembles, so tests can drive the Trainer directly (and keep
    its in-memory model): seed, backbone, data, bundle, loaders."""
    from dinotune.engine import Trainer
    from dinotune.tasks import build_backbone, get_task
    from dinotune.utils import seed_everything

    seed_everything(cfg.train.seed)
    task = get_task(cfg)
    backbone, _ = build_backbone(cfg)
    data = task.build_data(run_dir, backbone.patch_size)
    bundle = task.build_model(data.meta, backbone)
    train_loader, val_loader = task.loaders(data)
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(bundle=bundle, task=task, train_loader=train_loader, val_loader=val_loader, cfg=cfg,
                   run_dir=run_dir, meta=data.meta, device=torch.device("cpu"), precision="fp32")


def make_coco_dataset(root: Path, counts: dict[str, list[int]], size: tuple[int, int] = (56, 42),
                      seed: int = 0) -> Path:
    """A small COCO folder: ``root/annotations/instances_<split>.json`` + ``root/<split>/*.png``.
    ``counts[split][i]``: how many boxes image ``i`` holds (drawn as coloured rectangles on noise,
    colour by category; two categories with non-contiguous ids 3 and 7)."""
    import json

    rng = np.random.default_rng(seed)
    w, h = size
    cats = [{"id": 3, "name": "red"}, {"id": 7, "name": "blue"}]
    colour = {3: (220, 40, 40), 7: (40, 60, 220)}
    for split, per_image in counts.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        for i, n in enumerate(per_image):
            pixels = rng.integers(90, 160, (h, w, 3)).astype(np.uint8)
            for _ in range(n):
                bw, bh = int(rng.integers(8, w // 2)), int(rng.integers(8, h // 2))
                x, y = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
                cat = int(rng.choice([3, 7]))
                pixels[y:y + bh, x:x + bw] = colour[cat]
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat,
                             "bbox": [x, y, bw, bh], "area": bw * bh, "iscrowd": 0})
            name = f"{split}_{i:03d}.png"
            Image.fromarray(pixels).save(root / split / name)
            images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def make_segmentation_folders(root: Path, counts: dict[str, int], size: int = 28, seed: int = 0) -> Path:
    """``root/<split>/images`` + ``root/<split>/masks``: 3 classes (background and two coloured
    squares) and an ignore (255) border of a different width in every image."""
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            mask = np.zeros((size, size), dtype=np.uint8)
            pixels = rng.integers(90, 160, (size, size, 3)).astype(np.uint8)
            for label, rgb in ((1, (220, 40, 40)), (2, (40, 60, 220))):
                s = int(rng.integers(6, size // 2))
                x, y = (int(v) for v in rng.integers(0, size - s, 2))
                mask[y:y + s, x:x + s] = label
                pixels[y:y + s, x:x + s] = rgb
            border = int(rng.integers(0, 5))
            if border:
                mask[:border] = 255
            Image.fromarray(pixels).save(root / split / "images" / f"{i:03d}.png")
            Image.fromarray(mask, mode="L").save(root / split / "masks" / f"{i:03d}.png")
    return root


# The memory a capped child may take beyond the interpreter with torch imported: an open hole that
# allocates without bound dies of MemoryError (or is killed) instead of taking the machine.
MEMORY_CAP_MB = 1500


def run_capped(argv: list[str], cap_mb: int = MEMORY_CAP_MB, timeout: float = 300) -> tuple[int | None, str]:
    """Exit code and stderr of ``python -m dinotune ARGV`` in a child process whose data segment is
    capped at ``cap_mb`` MB above what importing dinotune and torch takes (``RLIMIT_DATA``: anonymous
    memory, which is what an oversized tensor or decoded image takes). None: it timed out."""
    def cap() -> None:
        limit = (2048 + cap_mb) * 1024 * 1024  # torch's import alone maps ~1.5 GB of data
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run([sys.executable, "-m", "dinotune", *argv], cwd=Path(__file__).resolve().parents[1],
                              env=env, capture_output=True, text=True, timeout=timeout, preexec_fn=cap)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:g} s"
    return done.returncode, done.stderr


def _data_segment_bytes() -> int | None:
    """What this process's data segment maps now (``VmData``: what ``RLIMIT_DATA`` counts); None
    where there is no ``/proc``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def main_capped(argv: list[str], capsys: pytest.CaptureFixture, cap_mb: int = MEMORY_CAP_MB) -> tuple[int, str]:
    """Exit code and stderr of ``dinotune ARGV`` run in this process (``cli.main``: no interpreter to
    start and no torch to import, seconds per child on 2 cores) with its data segment capped, for the
    call, at ``cap_mb`` MB above what it maps now (``RLIMIT_DATA``, as ``run_capped``): an open hole
    that allocates without bound fails its test with a MemoryError (or torch's "can't allocate
    memory") instead of taking the machine. The soft limit alone is lowered, then put back, with the
    quiet flag and thread count ``main`` sets."""
    import dinotune.utils as dutils
    from dinotune.cli import main

    quiet, threads = dutils._QUIET, torch.get_num_threads()
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    used = _data_segment_bytes()
    capsys.readouterr()
    try:
        if used is not None:
            limit = used + cap_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_DATA, (limit if hard == resource.RLIM_INFINITY else min(limit, hard),
                                                      hard))
        code = main(argv)
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
        set_quiet(quiet)
        torch.set_num_threads(threads)
    return code, capsys.readouterr().err


def make_instance_dataset(root: Path, counts: dict[str, list[int]], size: tuple[int, int] = (56, 42),
                          seed: int = 0, layout: str = "coco") -> Path:
    """A small instance-segmentation set: ``counts[split][i]`` objects in image ``i``, each a filled
    triangle (category 3 "red") or a filled ellipse-like octagon (7 "blue") on noise, with its
    polygon. ``layout``: ``coco`` (``root/annotations/instances_<split>.json`` + ``root/<split>/``)
    or ``yolo`` (``root/data.yaml``, ``root/images/<split>/``, ``root/labels/<split>/`` with
    normalised polygons)."""
    import json
    import math

    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    cats = [{"id": 3, "name": "red"}, {"id": 7, "name": "blue"}]
    colour = {3: (220, 40, 40), 7: (40, 60, 220)}
    for split, per_image in counts.items():
        images, anns, labels = [], [], {}
        folder = root / split if layout == "coco" else root / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        for i, n in enumerate(per_image):
            picture = Image.fromarray(rng.integers(90, 160, (h, w, 3)).astype(np.uint8))
            draw = ImageDraw.Draw(picture)
            name = f"{split}_{i:03d}.png"
            lines = []
            for _ in range(n):
                cat = int(rng.choice([3, 7]))
                r = float(rng.uniform(6, min(w, h) / 3))
                cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
                corners = 3 if cat == 3 else 8
                turn = float(rng.uniform(0, 2 * math.pi))
                poly = [(cx + r * math.cos(turn + 2 * math.pi * k / corners),
                         cy + r * math.sin(turn + 2 * math.pi * k / corners)) for k in range(corners)]
                draw.polygon(poly, fill=colour[cat])
                flat = [round(v, 2) for p in poly for v in p]
                xs, ys = flat[0::2], flat[1::2]
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat, "segmentation": [flat],
                             "bbox": [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)],
                             "area": 0.5 * abs(sum(xs[k] * ys[k - 1] - xs[k - 1] * ys[k] for k in range(len(xs)))),
                             "iscrowd": 0})
                lines.append(" ".join([str([3, 7].index(cat))] + [f"{v / (w if k % 2 == 0 else h):.5f}"
                                                                   for k, v in enumerate(flat)]))
            picture.save(folder / name)
            images.append({"id": i + 1, "file_name": name, "width": w, "height": h})
            labels[name] = lines
        if layout == "coco":
            (root / "annotations").mkdir(parents=True, exist_ok=True)
            (root / "annotations" / f"instances_{split}.json").write_text(
                json.dumps({"images": images, "annotations": anns, "categories": cats}))
        else:
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            for name, lines in labels.items():
                (root / "labels" / split / (Path(name).stem + ".txt")).write_text("\n".join(lines) + "\n")
    if layout == "yolo":
        (root / "data.yaml").write_text("path: .\n" + "".join(f"{s}: images/{s}\n" for s in counts)
                                        + "names:\n  0: red\n  1: blue\n")
    return root
