"""What the mask branch costs: training-step time of the instance segmenters against the same
detectors without masks, on the same real images and settings.

Four models on the first N coco_tiny training images (batch = N, no augmentation): the DETR-style
detector (``train detect``), the same decoder with a mask per query (``train instance``), Faster
R-CNN (``detect --head fasterrcnn``) and Mask R-CNN (``instance --head maskrcnn``). Each is timed
over ``--steps`` optimizer steps (forward, loss, backward, AdamW) after ``--warmup`` steps, in one
process, alternating the models every round so a machine's changing load falls on all alike; the
ratio of each mask model to its detector is the cost of masks.

    DINOTUNE_SHARED=../shared python benchmarks/bench_mask_cost.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from _common import machine_info, shared_dataset

HERE = Path(__file__).resolve().parent

DECODER = dict(hidden_dim=128, num_heads=4, ffn_dim=256, decoder_layers=3, num_queries=50, sampling_points=4)
RCNN = dict(hidden_dim=64, rcnn_rpn_batch=128, rcnn_roi_batch=128)
MODELS = {  # name: (task, settings, the detector it is compared with)
    "DETR detector": ("detect", dict(DECODER), None),
    "DETR + masks (instance)": ("instance", dict(DECODER, mask_dim=64), "DETR detector"),
    "Faster R-CNN": ("detect", dict(RCNN, head="fasterrcnn"), None),
    "Mask R-CNN (instance)": ("instance", dict(RCNN, head="maskrcnn"), "Faster R-CNN"),
}


def build(task_name: str, settings: dict, data: Path, images: int, size: int, model: str, device: str):
    """(task, bundle, batch on the device, optimizer) of one model on the first ``images`` images."""
    import torch

    from dinotune.config import build_config
    from dinotune.engine.device import select_device, to_device
    from dinotune.tasks import build_backbone, get_task

    cfg = build_config(task_name, data=str(data), model=model, adapter="full", image_size=size, overfit=images,
                       batch_size=images, workers=0, progress=False, device=device, **settings)
    task = get_task(cfg)
    backbone, _ = build_backbone(cfg)
    td = task.build_data(None, backbone.patch_size)
    train, _ = task.loaders(td)
    torch.manual_seed(0)
    bundle = task.build_model(td.meta, backbone)
    dev = select_device(device)
    bundle.model.to(dev).train()
    batch = to_device(next(iter(train)), dev)
    optimizer = torch.optim.AdamW([p for p in bundle.model.parameters() if p.requires_grad], lr=1e-4)
    return task, bundle, batch, optimizer


def step(task, bundle, batch, optimizer) -> float:
    import torch

    t0 = time.perf_counter()
    loss = task.training_step(bundle, bundle.model, batch)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="COCO folder (default: $DINOTUNE_SHARED/data/coco_tiny)")
    p.add_argument("--model", default="random:tiny")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=str(HERE / "results" / "mask-cost"))
    args = p.parse_args()
    data = shared_dataset("coco_tiny", args.data)

    built = {name: build(task, settings, data, args.images, args.image_size, args.model, args.device)
             for name, (task, settings, _) in MODELS.items()}
    times: dict[str, list[float]] = {name: [] for name in MODELS}
    for round_ in range(args.warmup + args.steps):
        for name, parts in built.items():
            seconds = step(*parts)
            if round_ >= args.warmup:
                times[name].append(seconds)
    rows = []
    for name, (task, settings, base) in MODELS.items():
        median = statistics.median(times[name])
        ratio = median / statistics.median(times[base]) if base else 1.0
        params = sum(p.numel() for p in built[name][1].model.parameters())
        rows.append({"model": name, "task": task, "seconds_per_step": round(median, 4),
                     "vs_detector": round(ratio, 2), "parameters": params})
    machine = machine_info(args.device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "images": args.images,
                                                    "image_size": args.image_size, "steps": args.steps,
                                                    "model": args.model, "rows": rows}, indent=2) + "\n")
    lines = [f"# Training-step cost of the mask branch ({args.model}, {args.image_size} px, batch {args.images})", "",
             f"Median of {args.steps} steps after {args.warmup} warm-up, models alternating each round, on "
             f"{machine['device']} ({machine['cpu_threads']} threads); `python benchmarks/bench_mask_cost.py`.", "",
             "| model | s / step | vs the same detector without masks | parameters |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['seconds_per_step']} | {r['vs_detector']} | {r['parameters']:,} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
