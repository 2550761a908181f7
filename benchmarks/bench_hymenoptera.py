"""End-to-end classification on the real hymenoptera (ants / bees) folders with ``random:small``.

Trains, evaluates and predicts through the public API exactly as a user would, and records
accuracy, wall time and throughput. There are no pretrained weights here, so ``random:small``
starts from random init: the numbers show the pipeline on real, messy data (a GIF placeholder,
mixed sizes) and its cost, not what pretrained DINOv2 reaches. With network, pass
``--model facebook/dinov2-small`` for the real thing.

    DINOTUNE_SHARED=../shared python benchmarks/bench_hymenoptera.py [--epochs 3] [--adapter lora]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import machine_info, shared_dataset

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="hymenoptera folder (default: $DINOTUNE_SHARED/data/hymenoptera)")
    p.add_argument("--model", default="random:small")
    p.add_argument("--adapters", nargs="+", default=["none", "lora"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(HERE / "results" / "hymenoptera"))
    args = p.parse_args()
    data = shared_dataset("hymenoptera", args.data)

    import dinotune

    rows = []
    for adapter in args.adapters:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            result = dinotune.train(task="classify", data=str(data), model=args.model, adapter=adapter,
                                    epochs=args.epochs, image_size=args.image_size, batch_size=args.batch_size,
                                    device=args.device, out=str(Path(tmp) / "run"), progress=False,
                                    cache_features=adapter == "none", augment=adapter != "none")
            train_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            preds = dinotune.predict(result["run_dir"], Path(data) / "val", top_k=1)
            predict_s = time.perf_counter() - t1
        m = result["metrics"]
        rows.append({"adapter": adapter, "top1": m["top1"], "f1_macro": m["f1_macro"], "roc_auc": m.get("roc_auc"),
                     "best_epoch": m["epoch"], "train_s": round(train_s, 1),
                     "predict_images_per_s": round(len(preds) / predict_s, 1)})
        print(json.dumps(rows[-1]), flush=True)
    machine = machine_info(args.device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("data", "out")}
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "machine": machine, "rows": rows}, indent=2))
    lines = [f"# hymenoptera end to end ({args.model})", "",
             f"{args.epochs} epochs, {args.image_size} px, batch {args.batch_size}; none = cached-feature "
             "linear probe, others with augmentation. Machine: " + json.dumps(machine), "",
             "| adapter | val top-1 | macro F1 | ROC-AUC | train + eval wall s | predict img/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['adapter']} | {r['top1']:.3f} | {r['f1_macro']:.3f} | {r['roc_auc']:.3f} | {r['train_s']} | "
              f"{r['predict_images_per_s']} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
