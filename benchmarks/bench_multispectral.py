"""13 Sentinel-2 bands against the same tiles reduced to RGB, on the real EuroSAT-MS tiles.

Both arms run the same command on the same 200 tiles (10 classes, the same stratified 20 %
hold-out), with the same model, seed, epochs, learning rates and image size; the only difference
is the input: all 13 bands (GeoTIFF, the patch embedding widened to 13 bands, RGB = bands 3, 2, 1)
or bands 3, 2, 1 alone (written as 3-band ``.npy`` tiles, the pretrained-width embedding). Both
are normalised per band with the training tiles' statistics. Several seeds are run, as 40
validation tiles make one run's accuracy move by 2.5 points per tile.

There are no pretrained weights here, so ``random:small`` starts from random init: the comparison
measures how much information the extra bands carry for a model learning from scratch on 160 tiles,
not how well pretrained DINOv2 transfers to them. With network, pass ``--model facebook/dinov2-small``.

    DINOTUNE_SHARED=../shared python benchmarks/bench_multispectral.py [--epochs 10] [--seeds 0 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine_info, shared_dataset

HERE = Path(__file__).resolve().parent
RGB_BANDS = [3, 2, 1]  # EuroSAT's band order: B01..B12, then B8A; red B04, green B03, blue B02


def rgb_copy(data: Path, out: Path) -> Path:
    """The tiles reduced to their RGB bands, as ``H x W x 3`` uint16 ``.npy`` (same class folders, same stems)."""
    import tifffile

    for tif in sorted(data.rglob("*.tif")):
        target = out / tif.parent.name / f"{tif.stem}.npy"
        target.parent.mkdir(parents=True, exist_ok=True)
        np.save(target, tifffile.imread(tif)[..., RGB_BANDS])
    return out


def run_arm(name: str, data: Path, rgb_bands: str, seed: int, args: argparse.Namespace, tmp: Path) -> dict:
    import dinotune

    t0 = time.perf_counter()
    result = dinotune.train(task="classify", data=str(data), val_fraction=0.2, model=args.model, adapter=args.adapter,
                            epochs=args.epochs, image_size=args.image_size, batch_size=args.batch_size, lr=args.lr,
                            backbone_lr=args.backbone_lr, seed=seed, init_seed=seed, rgb_bands=rgb_bands,
                            device=args.device, workers=args.workers, progress=False,
                            out=str(tmp / f"{name}-{seed}"))
    m = result["metrics"]
    return {"input": name, "seed": seed, "top1": m["top1"], "f1_macro": m["f1_macro"], "best_epoch": m["epoch"],
            "val_images": m["images"], "train_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="eurosat_ms folder (default: $DINOTUNE_SHARED/data/eurosat_ms)")
    p.add_argument("--model", default="random:small")
    p.add_argument("--adapter", default="full", help="full: random weights have nothing for an adapter to adapt")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--image-size", type=int, default=56, help="a multiple of the patch size (64 px tiles -> 56)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--backbone-lr", type=float, default=3e-4)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(HERE / "results" / "multispectral"))
    args = p.parse_args()
    data = shared_dataset("eurosat_ms", args.data)

    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        rgb = rgb_copy(data, tmp / "rgb")
        for seed in args.seeds:
            for name, folder, bands in (("13 bands", data, "3,2,1"), ("RGB (3,2,1)", rgb, "0,1,2")):
                rows.append(run_arm(name, folder, bands, seed, args, tmp))
                print(json.dumps(rows[-1]), flush=True)
    summary = []
    for name in ("13 bands", "RGB (3,2,1)"):
        mine = [r for r in rows if r["input"] == name]
        top1 = [r["top1"] for r in mine]
        summary.append({"input": name, "top1_mean": round(statistics.mean(top1), 4),
                        "top1_min": min(top1), "top1_max": max(top1),
                        "f1_macro_mean": round(statistics.mean(r["f1_macro"] for r in mine), 4),
                        "train_s_mean": round(statistics.mean(r["train_s"] for r in mine), 1)})
    machine = machine_info(args.device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("data", "out")}
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "machine": machine, "summary": summary,
                                                    "rows": rows}, indent=2))
    lines = [f"# EuroSAT-MS: 13 bands vs RGB ({args.model}, random weights)", "",
             f"200 real Sentinel-2 tiles, 10 classes, stratified 20 % hold-out (40 tiles); adapter {args.adapter}, "
             f"{args.epochs} epochs, {args.image_size} px, batch {args.batch_size}, lr {args.lr} / backbone "
             f"{args.backbone_lr}, seeds {args.seeds} (model init and data order). Machine: " + json.dumps(machine), "",
             "| input | val top-1 mean (min-max over seeds) | macro F1 mean | train + eval s per run |",
             "|---|---|---|---|"]
    lines += [f"| {s['input']} | {s['top1_mean']:.3f} ({s['top1_min']:.3f}-{s['top1_max']:.3f}) | "
              f"{s['f1_macro_mean']:.3f} | {s['train_s_mean']} |" for s in summary]
    lines += ["", "Per run:", "", "| input | seed | val top-1 | macro F1 | best epoch |", "|---|---|---|---|---|"]
    lines += [f"| {r['input']} | {r['seed']} | {r['top1']:.3f} | {r['f1_macro']:.3f} | {r['best_epoch']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
