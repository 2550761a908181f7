"""Training-step model FLOP utilisation (MFU) of dinotune: achieved FLOP/s over the card's peak.

Each configuration (``MODEL:ADAPTER:BATCH``, e.g. ``base:lora:64``) builds the ``random:<model>``
classifier exactly as ``bench_adapters.py`` does (linear head on CLS + mean patch token, LoRA / DoRA
rank 8 on q, k, v) and trains it with dinotune's own epoch loop (``Trainer.train_epoch``) on
in-memory random images: ``--warmup`` untimed steps, then ``--steps`` timed ones.

- FLOPs per step: ``torch.utils.flop_counter.FlopCounterMode`` over one forward and one backward of
  the same batch (the optimizer's element-wise update is not counted, as usual for MFU). Attention
  is counted through PyTorch's math kernel during the count (``sdpa_kernel(MATH)``: two matmuls
  forward, four backward, so the count does not depend on which fused kernel runs, and the CPU's
  flash kernel, which the counter does not know, is not missed); the timed steps use whatever SDPA
  picks. A frozen backbone (LoRA, DoRA) computes no weight gradients, so its backward is about one
  forward, not two: MFU counts the work the step needs, not ``6 x params x tokens``.
- A cross-check: the forward FLOPs of the backbone from its sizes (``analytic_forward_flops``).
- MFU = FLOPs per step x steps / timed seconds / the card's dense peak (``PEAK_TFLOPS``, NVIDIA's
  datasheets, no sparsity) in the precision the step ran: bf16 autocast where the card has bf16
  (compute capability 8.0+), fp16 autocast before. A card not in the table gets FLOP/s and no MFU.

    python benchmarks/bench_mfu.py --device cuda                  # writes results/mfu-cuda.{json,md}
    python benchmarks/bench_mfu.py --device cpu --configs tiny:full:2 --size 28 --steps 1 --warmup 1 --out /tmp/mfu
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import machine_info

HERE = Path(__file__).resolve().parent
CUDA_CONFIGS = "small:full:128,small:lora:128,base:full:64,base:lora:64"
CPU_CONFIGS = "small:full:8,small:lora:8"

# Dense (no sparsity) tensor-core peaks in TFLOP/s, NVIDIA datasheets; the first name that occurs in
# torch.cuda.get_device_name() wins, so longer names come before the names they contain.
PEAK_TFLOPS: list[tuple[str, str, float]] = [
    ("H100 NVL", "bf16", 835.0),
    ("H100 PCIe", "bf16", 756.0),
    ("H100", "bf16", 989.0),  # SXM (names such as "NVIDIA H100 80GB HBM3")
    ("H200", "bf16", 989.0),  # also GH200
    ("A100", "bf16", 312.0),
    ("L40S", "bf16", 362.0),
    ("L4", "bf16", 121.0),
    ("A10", "bf16", 125.0),  # A10, not A10G (AWS's variant has lower clocks)
    ("T4", "fp16", 65.0),
    ("V100", "fp16", 125.0),  # SXM2; PCIe 112
]


def peak_tflops(name: str) -> tuple[str, str, float] | None:
    """``(table name, precision, TFLOP/s)`` of the GPU called ``name``, or None when not in the table."""
    if "A10G" in name:
        return None
    return next((row for row in PEAK_TFLOPS if row[0] in name), None)


def parse_configs(text: str) -> list[tuple[str, str, int]]:
    """``"small:full:128,base:lora:64"`` -> ``[("small", "full", 128), ("base", "lora", 64)]``."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        parts = item.split(":")
        if len(parts) != 3 or not parts[2].isdigit():
            raise SystemExit(f"--configs: {item!r} is not MODEL:ADAPTER:BATCH (e.g. base:lora:64)")
        out.append((parts[0], parts[1], int(parts[2])))
    return out


def analytic_forward_flops(config, size: int, batch: int) -> int | None:
    """Forward FLOPs of a DINOv2 backbone with a GELU MLP (2 per multiply-add): per block the
    q, k, v, o and MLP matmuls over every token plus attention's two matmuls, and the patch
    embedding. None for other layouts (SwiGLU, DINOv3)."""
    if getattr(config, "model_type", "") not in ("dinov2", "dinov2_with_registers") or config.use_swiglu_ffn:
        return None
    d, p, layers = config.hidden_size, config.patch_size, config.num_hidden_layers
    patches = (size // p) ** 2
    tokens = patches + 1 + (getattr(config, "num_register_tokens", 0) or 0)
    mlp = int(d * config.mlp_ratio)
    block = 2 * tokens * (4 * d * d + 2 * d * mlp) + 2 * 2 * tokens * tokens * d
    return batch * (layers * block + 2 * patches * 3 * p * p * d)


def step_flops(engine, batch: dict) -> dict[str, int]:
    """FLOPs of one forward and one backward of ``batch`` (on the device) through ``engine``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = engine.bundle.model
    model.train()
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as forward:
            loss = engine.loss(batch)
        with FlopCounterMode(display=False) as backward:
            loss.backward()
    model.zero_grad(set_to_none=True)
    return {"forward": int(forward.get_total_flops()), "backward": int(backward.get_total_flops())}


def step_precision(device: str) -> str:
    """bf16 where the card has it (compute capability 8.0+), fp16 before; fp32 on the CPU."""
    import torch

    if not device.startswith("cuda"):
        return "fp32"
    return "bf16" if torch.cuda.get_device_capability(torch.device(device))[0] >= 8 else "fp16"


def measure(model: str, adapter: str, batch: int, args: argparse.Namespace, peak: tuple | None) -> dict:
    """One configuration: FLOPs per step, timed steps, FLOP/s and MFU."""
    import torch
    from bench_adapters import build_engine, image_batches

    cuda = args.device.startswith("cuda")
    precision = step_precision(args.device)
    batches = image_batches(args.warmup + args.steps, batch, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        engine = build_engine(Path(tmp), model=model, adapter=adapter, size=args.size, batch=batch,
                              device=args.device, precision=precision)
        hf_config = _hf_config(engine.bundle.model.backbone)
        attn = getattr(hf_config, "_attn_implementation", None)  # "sdpa": transformers' default when available
        first = {k: v.to(engine.device) for k, v in batches[0].items()}
        flops = step_flops(engine, first)
        engine.run(batches[: args.warmup])
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        engine.run(batches[args.warmup:])
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        trainable = sum(p.numel() for p in engine.bundle.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in engine.bundle.model.parameters())
        analytic = analytic_forward_flops(hf_config, args.size, batch)
        peak_mb = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        del engine
    if cuda:
        torch.cuda.empty_cache()
    per_step = flops["forward"] + flops["backward"]
    achieved = per_step * args.steps / seconds
    row = {"model": f"random:{model}", "adapter": adapter, "batch": batch, "size": args.size,
           "precision": precision, "attn_implementation": attn, "params": total, "trainable_params": trainable,
           "forward_flops": flops["forward"], "backward_flops": flops["backward"], "step_flops": per_step,
           "backward_over_forward": round(flops["backward"] / max(1, flops["forward"]), 3),
           "analytic_backbone_forward_flops": analytic,
           "counted_over_analytic_forward": round(flops["forward"] / analytic, 4) if analytic else None,
           "steps": args.steps, "seconds": round(seconds, 4), "step_ms": round(1000 * seconds / args.steps, 2),
           "images_per_s": round(args.steps * batch / seconds, 2), "achieved_tflops": round(achieved / 1e12, 3),
           "peak_tflops": peak[2] if peak else None, "peak_precision": peak[1] if peak else None,
           "mfu": round(achieved / (peak[2] * 1e12), 4) if peak else None, "peak_memory_mb": peak_mb}
    if peak and peak[1] != precision:
        row["mfu_note"] = f"the step ran in {precision}, the peak is {peak[1]}'s"
    return row


def _hf_config(backbone):
    """The transformers config inside a ``DinoBackbone`` (PEFT-wrapped or not)."""
    for module in backbone.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "hidden_size"):
            return config
    return None


def write_results(rows: list[dict], args: argparse.Namespace, machine: dict, peak: tuple | None, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("device", "configs", "size", "steps", "warmup")}
    peak_text = (f"peak {peak[2]:g} TFLOP/s dense {peak[1]} ({peak[0]} in the table)" if peak else
                 "not in the peak table: FLOP/s without MFU" if args.device.startswith("cuda") else
                 "CPU: no peak table, FLOP/s only")
    result = {"settings": settings, "machine": machine, "peak": {"name": peak[0], "precision": peak[1],
                                                                  "tflops": peak[2]} if peak else None,
              "peak_note": peak_text, "flop_count": "torch.utils.flop_counter.FlopCounterMode, one forward + "
              "one backward, attention through the math SDPA kernel; optimizer step not counted", "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    device = machine.get("gpu") or machine.get("cpu_model", "cpu")
    lines = [f"# Training-step MFU ({args.device}: {device})", "",
             f"{args.size} px, {args.warmup} warm-up + {args.steps} timed steps of dinotune's Trainer on in-memory "
             f"random images; {peak_text}. FLOPs per step from FlopCounterMode over one forward + backward "
             "(attention counted through the math kernel, the optimizer's update not counted); 'analytic' is the "
             "backbone's forward from its sizes, a cross-check of the count.", "",
             f"Machine: {json.dumps(machine)}", "",
             "| model | adapter | batch | precision | attention | GFLOP/step (fwd + bwd) | bwd / fwd "
             "| counted / analytic fwd | step ms | img/s | TFLOP/s | MFU | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r["counted_over_analytic_forward"] is None else f"{r['counted_over_analytic_forward']:.3f}"
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(f"| {r['model']} | {r['adapter']} | {r['batch']} | {r['precision']} | {r['attn_implementation']} "
                     f"| {r['step_flops'] / 1e9:.1f} | {r['backward_over_forward']:.2f} | {ratio} | {r['step_ms']:.1f} "
                     f"| {r['images_per_s']:.1f} | {r['achieved_tflops']:.2f} | {mfu} | {mem} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-len(rows) - 2:]))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--configs", default=None,
                   help=f"MODEL:ADAPTER:BATCH,... (default {CUDA_CONFIGS} on CUDA, {CPU_CONFIGS} on the CPU)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 CUDA, 2 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 CUDA, 1 CPU)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--out", default=None, help="path without suffix (default results/mfu-<cuda|cpu>)")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.configs = args.configs or (CUDA_CONFIGS if cuda else CPU_CONFIGS)
    args.steps = args.steps or (20 if cuda else 2)
    args.warmup = max(1, args.warmup if args.warmup is not None else (5 if cuda else 1))
    configs = parse_configs(args.configs)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    peak = peak_tflops(torch.cuda.get_device_name(torch.device(args.device))) if cuda else None
    rows = []
    for model, adapter, batch in configs:
        row = measure(model, adapter, batch, args, peak)
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out) if args.out else HERE / "results" / f"mfu-{'cuda' if cuda else 'cpu'}"
    write_results(rows, args, machine_info(args.device), peak, out)


if __name__ == "__main__":
    main()
