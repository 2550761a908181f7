"""Training-step throughput and peak memory: dinotune's engine vs a hand-written HF + PEFT loop.

For each adapter (none, lora, dora, full) and each implementation, a fresh subprocess builds
``random:small`` (ViT-S/14) with a linear head on CLS + mean patch token, and runs ``--warmup`` then
``--steps`` optimizer steps on random 224 px images (no data loading: both sides get the same
in-memory tensors). Reported: images/s over the timed steps, peak memory (CUDA: max allocated;
CPU: peak resident set size of the process) and the activation memory autograd saves for backward
in one forward (exact and repeatable, unlike RSS). The baseline is what a user would write by hand:
``Dinov2Model`` + ``peft.get_peft_model`` + ``nn.Linear`` + AdamW + autocast.

    python benchmarks/bench_adapters.py                  # CPU, writes results/adapters-cpu.{json,md}
    python benchmarks/bench_adapters.py --device cuda    # GPU, bf16, writes results/adapters-cuda.*
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import machine_info

ADAPTERS = ["none", "lora", "dora", "full"]
HERE = Path(__file__).resolve().parent


def _precision(device: str) -> str:
    return "bf16" if device.startswith("cuda") else "fp32"


def _synthetic_batches(n: int, batch: int, size: int, classes: int = 10):
    import torch

    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def _measure(step, n_warmup: int, n_steps: int, device: str) -> float:
    import torch

    for _ in range(n_warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n_steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def saved_activation_mb(loss_fn) -> float:
    """Bytes autograd keeps for backward during one forward (``loss_fn()``), each storage counted
    once: a deterministic activation-memory figure, where peak RSS on the CPU also moves with the
    allocator and whatever else the process imported."""
    import torch

    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    if loss.requires_grad:
        loss.backward()  # frees the graph the same way a training step does
    return sum(storages.values()) / 2**20


def run_dinotune(adapter: str, args) -> tuple[float, float]:
    """The dinotune engine's own training step (Trainer.train_epoch) on in-memory batches."""
    import tempfile

    import torch
    from torch.utils.data import DataLoader

    from dinotune.config import build_config
    from dinotune.engine.device import autocast
    from dinotune.engine.optim import phase_at
    from dinotune.engine.trainer import Trainer
    from dinotune.tasks import build_backbone, get_task
    from dinotune.utils import set_quiet

    set_quiet(True)
    cfg = build_config("classify", model="random:small", adapter=adapter, image_size=args.size,
                       batch_size=args.batch, epochs=1, precision=_precision(args.device),
                       device=args.device, progress=False, rank=args.rank, alpha=2 * args.rank,
                       targets=["qkv"], pool="cls_mean")
    task = get_task(cfg)
    backbone, _ = build_backbone(cfg)
    bundle = task.build_model({"class_names": [str(i) for i in range(10)], "num_classes": 10}, backbone)
    model = bundle.model
    batches = [{"image": x, "label": y} for x, y in _synthetic_batches(args.warmup + args.steps, args.batch, args.size)]
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(bundle=bundle, task=task, train_loader=DataLoader(batches[: args.warmup], batch_size=None),
                          val_loader=None, cfg=cfg, run_dir=Path(tmp), meta={}, device=device,
                          precision=_precision(args.device))
        index, phase = phase_at(trainer.phases, 0)
        optimizer, scheduler = trainer.start_phase(index, phase, None)
        trainer.train_epoch(0, phase, optimizer, scheduler, 0)  # warm-up
        trainer.train_loader = DataLoader(batches[args.warmup:], batch_size=None)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        trainer.train_epoch(0, phase, optimizer, scheduler, 0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        x, y = batches[0]["image"].to(device), batches[0]["label"].to(device)
        with autocast(device, _precision(args.device)):
            saved = saved_activation_mb(lambda: task.training_step(bundle, model, {"image": x, "label": y})["loss"])
        optimizer.zero_grad(set_to_none=True)
        return seconds, saved


def run_baseline(adapter: str, args) -> tuple[float, float]:
    """A plain loop as a user would write it with transformers + PEFT."""
    import torch
    from torch import nn
    from transformers import AutoModel

    from dinotune.backbone.registry import arch_config

    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = AutoModel.from_config(arch_config("small"))
    if adapter in ("lora", "dora"):
        from peft import LoraConfig, get_peft_model

        backbone = get_peft_model(backbone, LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                       target_modules=["q_proj", "k_proj", "v_proj"],
                                                       use_dora=adapter == "dora"))
    elif adapter == "none":
        backbone.requires_grad_(False)
    head = nn.Linear(2 * 384, 10)
    backbone.to(device)
    head.to(device)
    params = [p for p in list(backbone.parameters()) + list(head.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    data = _synthetic_batches(args.warmup + args.steps, args.batch, args.size)
    batches = iter(data)
    amp = _precision(args.device) == "bf16"

    def forward(x, y):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            with torch.set_grad_enabled(adapter != "none"):
                h = backbone(pixel_values=x).last_hidden_state
            logits = head(torch.cat([h[:, 0], h[:, 1:].mean(1)], dim=-1))
            return nn.functional.cross_entropy(logits.float(), y)

    def step():
        x, y = next(batches)
        loss = forward(x.to(device), y.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = _measure(step, 0, args.steps, args.device)
    saved = saved_activation_mb(lambda: forward(data[0][0].to(device), data[0][1].to(device)))
    opt.zero_grad(set_to_none=True)
    return seconds, saved


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads) if args.threads else None
    run = run_dinotune if args.impl == "dinotune" else run_baseline
    seconds, saved = run(args.adapter, args)
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda")
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"impl": args.impl, "adapter": args.adapter, "seconds": seconds,
                      "images_per_s": args.steps * args.batch / seconds, "peak_mb": peak_mb,
                      "saved_activation_mb": saved}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=None, help="default 8 on CPU, 64 on CUDA")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5 CPU, 30 CUDA)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration; the median is reported")
    p.add_argument("--out", default=None)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.batch = args.batch or (64 if cuda else 8)
    args.steps = args.steps or (30 if cuda else 5)
    if args.impl:
        child(args)
        return
    rows = []
    runs: dict[tuple[str, str], list[dict]] = {}
    for repeat in range(args.repeats):
        # alternate the order so neither side always runs on a warmer machine
        order = ("baseline", "dinotune") if repeat % 2 == 0 else ("dinotune", "baseline")
        for adapter, impl in [(a, i) for a in ADAPTERS for i in order]:
            cmd = [sys.executable, __file__, "--impl", impl, "--adapter", adapter, "--device", args.device,
                   "--batch", str(args.batch), "--size", str(args.size), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--rank", str(args.rank), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{impl}/{adapter} failed:\n{out.stderr[-3000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            runs.setdefault((adapter, impl), []).append(row)
            print(f"{adapter:5s} {impl:9s} {row['images_per_s']:8.2f} img/s  peak {row['peak_mb']:8.0f} MB", flush=True)
    by = {}
    for key, rs in runs.items():  # medians over repeats: throughput and RSS both move run to run
        speeds = sorted(r["images_per_s"] for r in rs)
        peaks = sorted(r["peak_mb"] for r in rs)
        by[key] = {**rs[0], "images_per_s": speeds[len(rs) // 2], "peak_mb": peaks[len(rs) // 2],
                   "all_images_per_s": [r["images_per_s"] for r in rs], "all_peak_mb": [r["peak_mb"] for r in rs]}
        del by[key]["seconds"]
        rows.append(by[key])
    table = ["| adapter | baseline img/s | dinotune img/s | speed ratio | baseline peak MB | dinotune peak MB "
             "| memory ratio | baseline activations MB | dinotune activations MB | activation ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for a in ADAPTERS:
        b, d = by[(a, "baseline")], by[(a, "dinotune")]
        act = (f"{d['saved_activation_mb'] / b['saved_activation_mb']:.3f}" if b["saved_activation_mb"]
               else "-")
        table.append(f"| {a} | {b['images_per_s']:.2f} | {d['images_per_s']:.2f} | "
                     f"{d['images_per_s'] / b['images_per_s']:.2f} | {b['peak_mb']:.0f} | {d['peak_mb']:.0f} | "
                     f"{d['peak_mb'] / b['peak_mb']:.2f} | {b['saved_activation_mb']:.1f} | "
                     f"{d['saved_activation_mb']:.1f} | {act} |")
    settings = {k: getattr(args, k) for k in ("device", "batch", "size", "steps", "warmup", "rank", "repeats")}
    settings["precision"] = _precision(args.device)
    result = {"settings": settings, "machine": machine_info(args.device), "rows": rows}
    out = Path(args.out) if args.out else HERE / "results" / f"adapters-{'cuda' if cuda else 'cpu'}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Adapter training-step benchmark ({args.device})", "",
          f"random:small (ViT-S/14), {args.size} px, batch {args.batch}, {settings['precision']}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, median of {args.repeats} runs in "
          f"alternating order; LoRA/DoRA rank {args.rank} on q,k,v.",
          f"Machine: {json.dumps(result['machine'])}", "",
          "Ratios are dinotune / baseline (speed: >1 is faster; memory: <1 is smaller). Peak memory is "
          "max allocated on CUDA and peak resident set size of the whole process on the CPU; "
          "activations are the bytes autograd saves for backward in one forward (deterministic).",
          "", *table, ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(table))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
