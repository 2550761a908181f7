"""Throughput of ``dinotune embed`` against the backbone's own forward rate on the same machine.

``dinotune embed`` reads, decodes and transforms every image (the evaluation transform: resize,
centre crop, normalise), runs the backbone in batches and writes the parquet file. The baseline is
the backbone alone on tensors already in memory, same batch size, same model, same threads: what
the claim "embedding runs at the backbone's forward rate" compares with. Each is timed
``--repeats`` times in alternation (a busy machine slows both alike) and the best is kept.

    python benchmarks/bench_embed.py                  # writes results/embed-cpu.{json,md}
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import machine_info

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dinotune import api  # noqa: E402
from dinotune.backbone.model import DinoBackbone  # noqa: E402


def photos(root: Path, n: int, side: int) -> Path:
    """``n`` JPEGs of ``side`` px in two class folders (smooth random fields, as photos compress)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / ("ab"[i % 2])
        folder.mkdir(parents=True, exist_ok=True)
        cells = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(cells).resize((side, side), Image.Resampling.BICUBIC).save(folder / f"{i}.jpg", quality=90)
    return root


@torch.no_grad()
def forward_rate(model: str, n: int, size: int, batch: int) -> float:
    """Images per second of the backbone alone on ``n`` random ``size`` px images in memory."""
    backbone = DinoBackbone.from_spec(model).eval()
    x = torch.randn(batch, 3, size, size)
    backbone(x)  # warm-up
    start = time.perf_counter()
    for _ in range(0, n, batch):
        backbone(x)
    return (n // batch * batch) / (time.perf_counter() - start)


def embed_rate(model: str, data: Path, out: Path, size: int, batch: int, workers: int) -> float:
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    api.embed(model, data, out, image_size=size, batch_size=batch, workers=workers, device="cpu", progress=False)
    return sum(1 for _ in data.rglob("*.jpg")) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:small")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--side", type=int, default=400, help="the JPEGs' side in pixels")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "embed-cpu"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    try:
        data = photos(tmp / "data", args.images, args.side)
        rates: dict[str, list[float]] = {"backbone forward (tensors in memory)": [], "embed, --workers 0": [],
                                         "embed, --workers 2": []}
        for _ in range(args.repeats):
            rates["backbone forward (tensors in memory)"].append(
                forward_rate(args.model, args.images, args.image_size, args.batch_size))
            for workers in (0, 2):
                rates[f"embed, --workers {workers}"].append(
                    embed_rate(args.model, data, tmp / "e.parquet", args.image_size, args.batch_size, workers))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = {k: max(v) for k, v in rates.items()}
    base = best["backbone forward (tensors in memory)"]
    result = {"machine": machine_info("cpu"), "torch_threads": torch.get_num_threads(), "settings": vars(args),
              "images_per_second": best, "all_runs": rates, "ratio_to_forward": {k: v / base for k, v in best.items()}}
    Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# `dinotune embed` throughput vs the backbone's forward rate (CPU)", "",
             f"`python benchmarks/bench_embed.py`; {result['machine']['cpu_model']}, "
             f"{torch.get_num_threads()} torch threads; `{args.model}`, {args.image_size} px crops of "
             f"{args.images} {args.side} px JPEGs, batch {args.batch_size}; best of {args.repeats} alternating runs.",
             "", "| what | images / s | vs forward |", "|---|---|---|"]
    lines += [f"| {k} | {v:.1f} | {v / base:.2f} |" for k, v in best.items()]
    lines += ["", "The embed rows include reading and decoding the JPEGs, the transform and writing the parquet "
              "file; loader workers compete with the forward pass for the same cores on a 2-core machine."]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
