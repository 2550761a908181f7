"""Can the Faster R-CNN head (``--head fasterrcnn``) fit a few real COCO images? AP50 on those
same images over training (the ``--overfit N`` debug mode: train and evaluate on the first N
training images, no augmentation). A correct wiring of targets, anchors, the RPN / RoI losses,
post-processing back to original pixels and COCO evaluation drives AP50 towards 1.

    DINOTUNE_SHARED=../shared python benchmarks/bench_fasterrcnn.py            # AP50 on 4 images
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import machine_info, shared_dataset

HERE = Path(__file__).resolve().parent

# a small head (64-wide pyramid) on random:tiny, full fine-tuning; Faster R-CNN tolerates a looser
# gradient clip than the DETR recipe's 0.1; anchors of 2-8 strides (14-224 px) for COCO's small objects
SETTINGS = dict(head="fasterrcnn", hidden_dim=64, lr=1e-3, backbone_lr=3e-4, grad_clip=1.0, warmup_epochs=10,
                rcnn_rpn_batch=128, rcnn_roi_batch=128, rcnn_anchor_scales=[2.0, 4.0, 8.0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="COCO folder (default: $DINOTUNE_SHARED/data/coco_tiny)")
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--epochs", type=int, default=300, help="one optimizer step per epoch (batch = all images)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="results file stem (default: results/fasterrcnn-overfit)")
    args = p.parse_args()
    data = shared_dataset("coco_tiny", args.data)

    import dinotune
    from dinotune.engine.logging import read_metrics

    settings = dict(model=args.model, adapter="full", image_size=args.image_size, overfit=args.images,
                    epochs=args.epochs, eval_every=max(1, args.epochs // 8), batch_size=args.images, workers=0,
                    progress=False, device=args.device, **SETTINGS)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = dinotune.train(task="detect", data=str(data), out=str(Path(tmp) / "run"), **settings)
        seconds = time.perf_counter() - t0
        history = read_metrics(Path(result["run_dir"]))
    curve = [{"step": r["epoch"], "train_loss": round(r["train/loss"], 4), "AP": r["val/AP"], "AP50": r["val/AP50"]}
             for r in history if "val/AP" in r]
    curve = list({c["step"]: c for c in curve}.values())  # one row per step (a step may be recorded twice)
    machine = machine_info(args.device)
    out = Path(args.out) if args.out else HERE / "results" / "fasterrcnn-overfit"
    out.parent.mkdir(parents=True, exist_ok=True)
    final = {k: result["metrics"].get(k) for k in ("AP", "AP50")}
    summary = {"settings": settings, "machine": machine, "seconds": round(seconds, 1), "steps": args.epochs,
               "final": final, "curve": curve}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# Faster R-CNN head overfit on {args.images} coco_tiny images ({args.model})", "",
             f"{args.epochs} steps (batch = all {args.images} images), {args.image_size} px, full fine-tuning, "
             f"{seconds:.0f} s on {machine['device']} ({machine['cpu_threads']} threads).", "",
             "| step | train loss | AP | AP50 |", "|---|---|---|---|"]
    lines += [f"| {c['step']} | {c['train_loss']} | {c['AP']:.3f} | {c['AP50']:.3f} |" for c in curve]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
