"""Can the detector / segmenter fit a few real COCO images? The metric on those same images over training.

The debug / overfit mode (``--overfit N``) trains and evaluates on the first N training images
without augmentation. A correct model (for detection: matching, losses, box refinement,
post-processing and COCO evaluation; for segmentation: masks, decoder, upsampling and mIoU) drives
the metric on them towards 1; the public projects this replaces could not show that, since their
AP / mIoU were computed wrongly.

    DINOTUNE_SHARED=../shared python benchmarks/bench_overfit.py --task detect    # AP50 on 4 images
    DINOTUNE_SHARED=../shared python benchmarks/bench_overfit.py --task segment   # mIoU on 2 images
    DINOTUNE_SHARED=../shared python benchmarks/bench_overfit.py --task instance  # mask AP50 on 4 images
    DINOTUNE_SHARED=../shared python benchmarks/bench_overfit.py --task instance-maskrcnn

For instance segmentation the run's own evaluation is then held against pycocotools' ``segm``
evaluation of ``dinotune predict``'s COCO results on the same images.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import machine_info, shared_dataset

HERE = Path(__file__).resolve().parent

# Per task: what to train, which metric to watch, and the defaults of this benchmark.
TASKS = {
    "detect": {
        "metrics": ("AP", "AP50"), "images": 4, "epochs": 300, "image_size": 224,
        "settings": dict(hidden_dim=128, num_heads=4, ffn_dim=256, decoder_layers=3, num_queries=50,
                         sampling_points=4, lr=5e-4, backbone_lr=2e-4, warmup_epochs=10),
        "title": "DETR-style detector",
    },
    "instance": {
        "metrics": ("segm/AP50", "segm/AP"), "images": 4, "epochs": 200, "image_size": 224,
        # `train instance --overfit 4 --epochs 200 --batch-size 4 --image-size 224 --lr 5e-4`: every other
        # setting is the instance config's default (6-layer 256-wide decoder, 100 queries, masks at stride 3.5)
        "settings": dict(lr=5e-4),
        "title": "DETR-style instance segmenter",
    },
    "instance-maskrcnn": {
        "task": "instance", "metrics": ("segm/AP50", "segm/AP"), "images": 4, "epochs": 200, "image_size": 224,
        # bench_fasterrcnn.py's head and recipe, with torchvision's mask branch
        "settings": dict(head="maskrcnn", hidden_dim=64, lr=1e-3, backbone_lr=3e-4, grad_clip=1.0, warmup_epochs=10,
                         rcnn_rpn_batch=128, rcnn_roi_batch=128),
        "title": "Mask R-CNN instance segmenter",
    },
    "segment": {
        "metrics": ("mIoU", "pixel_accuracy"), "images": 2, "epochs": 300, "image_size": 308,
        "settings": dict(decoder="fpn", fpn_dim=64, lr=3e-3, backbone_lr=1e-3, warmup_epochs=5),
        "title": "FPN segmenter",
    },
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=list(TASKS), default="detect")
    p.add_argument("--data", default=None, help="COCO folder (default: $DINOTUNE_SHARED/data/coco_tiny)")
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--images", type=int, default=None, help="images to fit (default: 4 detect, 2 segment)")
    p.add_argument("--epochs", type=int, default=None, help="one optimizer step per epoch (batch = all images)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="results file stem (default: results/<task>-overfit)")
    args = p.parse_args()
    spec = TASKS[args.task]
    images = args.images or spec["images"]
    epochs = args.epochs or spec["epochs"]
    size = args.image_size or spec["image_size"]
    data = shared_dataset("coco_tiny", args.data)

    import dinotune
    from dinotune.engine.logging import read_metrics

    settings = dict(model=args.model, adapter="full", image_size=size, overfit=images, epochs=epochs,
                    eval_every=max(1, epochs // 6), batch_size=images, workers=0, progress=False,
                    device=args.device, **spec["settings"])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        task = spec.get("task", args.task)
        result = dinotune.train(task=task, data=str(data), out=str(Path(tmp) / "run"), **settings)
        seconds = time.perf_counter() - t0
        history = read_metrics(Path(result["run_dir"]))
        check = (pycocotools_check(Path(result["run_dir"]), data, images, args.device) if task == "instance"
                 else None)
    first, second = spec["metrics"]
    curve = [{"step": r["epoch"], "train_loss": round(r["train/loss"], 4), first: r.get(f"val/{first}"),
              second: r.get(f"val/{second}")} for r in history if f"val/{first}" in r]
    machine = machine_info(args.device)
    out = Path(args.out) if args.out else HERE / "results" / f"{args.task}-overfit"
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {"task": args.task, "settings": settings, "machine": machine, "seconds": round(seconds, 1),
               "steps": epochs, "final": {k: result["metrics"].get(k) for k in spec["metrics"]}, "curve": curve}
    if check:
        summary["pycocotools"] = check
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# {spec['title']} overfit on {images} coco_tiny images ({args.model})", "",
             f"{epochs} steps (batch = all {images} images), {size} px, full fine-tuning, "
             f"{seconds:.0f} s on {machine['device']} ({machine['cpu_threads']} threads).", "",
             f"| step | train loss | {first} | {second} |", "|---|---|---|---|"]
    lines += [f"| {c['step']} | {c['train_loss']} | {c[first]:.3f} | {c[second]:.3f} |" for c in curve]
    if check:
        lines += ["", f"pycocotools' segm evaluation of `dinotune predict`'s COCO results on the same {images} images: "
                  f"AP50 {check['AP50']:.3f}, AP {check['AP']:.3f} (dinotune eval: AP50 {check['eval_AP50']:.3f}, "
                  f"AP {check['eval_AP']:.3f})."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def pycocotools_check(run: Path, data: Path, images: int, device: str) -> dict[str, float]:
    """The run's own evaluation of its (overfit) images beside pycocotools' segm evaluation of
    ``dinotune predict``'s COCO results for the same images."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from dinotune.cli import main as cli
    from dinotune.tasks.instance.sources import find_instance_data

    source = find_instance_data(str(data), "train", min_box_size=1.0)
    picked = source.images[:images]
    metrics = json.loads((run / "best_metrics.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        gt_file, info, preds = Path(tmp) / "gt.json", Path(tmp) / "info.json", Path(tmp) / "preds.json"
        gt_file.write_text(json.dumps(source.with_images(picked).coco_gt()))
        info.write_text(json.dumps({"images": [{"id": im.id, "file_name": im.path.name} for im in picked]}))
        assert cli(["predict", str(run), *[str(im.path) for im in picked], "--format", "coco", "--image-info",
                    str(info), "--out", str(preds), "--device", device]) == 0
        coco = COCO(str(gt_file))
        evaluator = COCOeval(coco, coco.loadRes(str(preds)), "segm")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"AP": float(evaluator.stats[0]), "AP50": float(evaluator.stats[1]),
            "eval_AP": float(metrics["segm"]["AP"]), "eval_AP50": float(metrics["segm"]["AP50"])}


if __name__ == "__main__":
    main()
