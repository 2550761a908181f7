"""Self-supervised pretraining from ``random:tiny`` on the shared data: the k-NN top-1 of the starting
backbone and of the pretrained one on the same held-out split, per seed, with the time it took, and
the linear-probe and LoRA fine-tuning accuracy starting from each; then the cost of a pretraining
step against a supervised step on the same backbone.

Data (``$DINOTUNE_SHARED/data``):
- ``eurosat_ms``: 200 Sentinel-2 tiles (13 bands, 10 classes). All 200 are the unlabelled pretraining
  set; the labelled split is 16 train / 4 val tiles per class (fixed by file name order), the k-NN
  and probe data.
- ``hymenoptera``: its 245 train photos are the unlabelled set; its train / val folders the labelled split.

The starting backbone is ``random:tiny`` (its init seed 0) for every seed; seed ``s`` is the seed of
the pretraining (crop, mask and batch draws) and of the probes trained on each backbone. Pretraining
gets no ``--val-data``, so the pretrained backbone is the last epoch's: nothing is selected on the
split the k-NN and the probes are scored on. Everything runs on the CPU at small
image sizes (the numbers measure the recipe's effect, not DINOv2's features).

    DINOTUNE_SHARED=../shared python benchmarks/bench_pretrain.py     # results/pretrain-cpu.{json,md}
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import machine_info, shared_dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dinotune  # noqa: E402
from dinotune import api  # noqa: E402
from dinotune.utils import set_quiet  # noqa: E402


def eurosat_split(source: Path, root: Path) -> Path:
    """``root/train/<class>/`` (16 per class) and ``root/val/<class>/`` (4) as links to ``source``'s tiles."""
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        tiles = sorted(folder.glob("*.tif"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        for split, part in (("train", tiles[:16]), ("val", tiles[16:20])):
            (root / split / folder.name).mkdir(parents=True, exist_ok=True)
            for tile in part:
                (root / split / folder.name / tile.name).symlink_to(tile)
    return root


def knn_top1(model: str, labelled: Path, image_size: int, seed: int) -> float:
    result = api.knn(model if model.startswith("random:") else Path(model), data=labelled, k=(20,),
                     image_size=image_size if model.startswith("random:") else None, device="cpu", progress=False,
                     save=False)
    return result["k=20"]["top1"]


def probe(model: str, labelled: Path, out: Path, image_size: int, seed: int, adapter: str, epochs: int) -> float:
    summary = dinotune.train(task="classify", data=str(labelled), model=model, image_size=image_size, adapter=adapter,
                             epochs=epochs, batch_size=16, lr=1e-2 if adapter == "none" else 1e-3,
                             backbone_lr=1e-3, seed=seed, workers=0, progress=False, device="cpu",
                             out=str(out))
    return summary["metrics"]["top1"]


def throughput(data: Path, root: Path, image_size: int, epochs: int = 2) -> dict:
    """Images per second of ``epochs`` pretraining epochs (2 global + 4 local crops per image) and of
    as many supervised classification epochs (one crop per image), both full fine-tuning of
    ``random:tiny`` at batch 32 on the same images: the engine's own ``sys/images_per_s``."""
    from dinotune.engine.logging import read_metrics

    common = dict(model="random:tiny", image_size=image_size, epochs=epochs, batch_size=32, adapter="full",
                  workers=0, progress=False, device="cpu")
    dinotune.train(task="pretrain", data=str(data / "train"), out=str(root / "t-pre"), local_crops=4, **common)
    dinotune.train(task="classify", data=str(data), out=str(root / "t-cls"), **common)
    rate = {name: max(r["sys/images_per_s"] for r in read_metrics(root / name)) for name in ("t-pre", "t-cls")}
    return {"pretrain_images_per_s": rate["t-pre"], "supervised_images_per_s": rate["t-cls"],
            "pretrain_vs_supervised": round(rate["t-pre"] / rate["t-cls"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["eurosat_ms", "hymenoptera"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=56)
    ap.add_argument("--probe-epochs", type=int, default=10)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pretrain-cpu"))
    ap.add_argument("--pretrain", nargs="*", default=[], metavar="KEY=VALUE", help="extra pretrain options")
    ap.add_argument("--part", choices=["all", "knn", "throughput"], default="all")
    args = ap.parse_args()
    set_quiet(True)
    extra = {k.replace("-", "_"): json.loads(v) if v[:1].isdigit() or v[:1] == "-" else v
             for k, v in (item.split("=", 1) for item in args.pretrain)}
    tmp = Path(tempfile.mkdtemp(prefix="bench-pretrain-"))
    rows, speed = [], {}
    try:
        if args.part in ("all", "throughput"):
            speed = throughput(shared_dataset("hymenoptera", None), tmp, args.image_size)
            print(json.dumps(speed), flush=True)
        for name in args.datasets if args.part != "throughput" else []:
            source = shared_dataset(name, None)
            if name == "eurosat_ms":
                unlabelled, labelled = source, eurosat_split(source, tmp / "eurosat")
            else:
                unlabelled, labelled = source / "train", source
            for seed in args.seeds:
                start = "random:tiny"
                before = knn_top1(start, labelled, args.image_size, seed) if seed == 0 else None
                run = tmp / f"{name}-{seed}"
                t0 = time.perf_counter()
                options = dict(model=start, image_size=args.image_size, epochs=args.epochs, batch_size=32,
                               local_crops=4, prototypes=1024, head_hidden=512, seed=seed,
                               workers=0, progress=False, device="cpu", out=str(run))
                options.update(extra)
                dinotune.train(task="pretrain", data=str(unlabelled), **options)
                seconds = time.perf_counter() - t0
                if before is None:
                    before = api.knn(start, data=labelled, k=(20,), image_size=args.image_size, device="cpu",
                                     progress=False, save=False)["k=20"]["top1"]
                after = api.knn(run, data=labelled, k=(20,), device="cpu", progress=False, save=False)["k=20"]["top1"]
                row = {"dataset": name, "seed": seed, "knn_top1_start": before, "knn_top1_pretrained": after,
                       "pretrain_seconds": round(seconds, 1)}
                for adapter in ("none", "lora"):
                    row[f"{adapter}_top1_start"] = probe(start, labelled, tmp / f"p-{name}-{seed}-{adapter}-s",
                                                         args.image_size, seed, adapter, args.probe_epochs)
                    row[f"{adapter}_top1_pretrained"] = probe(str(run), labelled, tmp / f"p-{name}-{seed}-{adapter}-p",
                                                              args.image_size, seed, adapter, args.probe_epochs)
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"machine": machine_info("cpu"), "settings": vars(args), "rows": rows, "throughput": speed}
    Path(args.out).with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Self-supervised pretraining from `random:tiny` (CPU)", "",
             f"`python benchmarks/bench_pretrain.py`; {result['machine']['cpu_model']}, "
             f"{result['machine']['cpu_threads']} threads; {args.image_size} px, {args.epochs} pretraining epochs, "
             f"probes {args.probe_epochs} epochs; extra options {extra or 'none'}.", "",
             "| data | seed | k-NN top-1 start | k-NN top-1 pretrained | gain | pretrain s | linear probe start / "
             "pretrained | LoRA start / pretrained |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['seed']} | {r['knn_top1_start']:.3f} | {r['knn_top1_pretrained']:.3f} | "
                     f"{r['knn_top1_pretrained'] - r['knn_top1_start']:+.3f} | {r['pretrain_seconds']} | "
                     f"{r['none_top1_start']:.3f} / {r['none_top1_pretrained']:.3f} | "
                     f"{r['lora_top1_start']:.3f} / {r['lora_top1_pretrained']:.3f} |")
    for name in args.datasets:
        gains = [r["knn_top1_pretrained"] - r["knn_top1_start"] for r in rows if r["dataset"] == name]
        if gains:
            lines.append(f"\n{name}: mean k-NN gain {statistics.mean(gains):+.3f} over {len(gains)} seed(s)")
    if speed:
        lines.append(f"\nthroughput, `random:tiny` full fine-tuning, {args.image_size} px, batch 32, hymenoptera: "
                     f"pretraining {speed['pretrain_images_per_s']} images/s (2 global + 4 local crops each), "
                     f"supervised classification {speed['supervised_images_per_s']} images/s: "
                     f"{speed['pretrain_vs_supervised']}x")
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
