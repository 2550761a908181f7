"""Training-step throughput and memory: dinotune's engine vs a hand-written HF + PEFT loop, and
dinotune's memory and speed options (activation checkpointing, adapting only the last blocks,
torch.compile).

Every configuration runs in a fresh subprocess that builds ``random:small`` (ViT-S/14) with a
linear head on CLS + mean patch token and runs ``--warmup`` then ``--steps`` optimizer steps on
random images (no data loading: every run gets the same in-memory tensors). Reported: images/s
over the timed steps, peak memory (CUDA: the allocator's max allocated; CPU: the peak resident set
size of the process, and that peak above the RSS right after the imports, which leaves out the
~0.6-0.8 GB of libraries every process carries) and the activation memory kept for backward in
one forward (autograd's saved tensors plus the block inputs checkpointing keeps for its
recompute: exact and repeatable, unlike RSS; not measured under --compile).

Table 1 compares dinotune with what a user would write by hand (``Dinov2Model`` +
``peft.get_peft_model`` + ``nn.Linear`` + AdamW + autocast), adapter by adapter. Table 2 is
dinotune alone: none / lora / dora / full, each with ``--grad-checkpointing``, LoRA on the last 4
blocks with and without it, and ``--compile`` rows where a compiler exists; memory is given
relative to full fine-tuning, speed relative to the same adapter without checkpointing / compile.

    python benchmarks/bench_adapters.py                  # CPU, writes results/adapters-cpu.{json,md}
    python benchmarks/bench_adapters.py --device cuda    # GPU, bf16, writes results/adapters-cuda.*
    python benchmarks/bench_adapters.py --size 112 --steps 2 --warmup 1 --repeats 1   # a quick CPU run
    python benchmarks/bench_adapters.py --model tiny --size 28 --batch 2 --steps 1 --warmup 1 --repeats 1 \
        --no-compile --in-process --out /tmp/adapters    # a check of the script itself (gpu_suite --dry-run)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from _common import machine_info

ADAPTERS = ["none", "lora", "dora", "full"]
HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Variant:
    """One row of table 2: an adapter and the memory / speed options it trains with."""

    adapter: str
    last_n: int = 0  # adapt only the last N blocks (LoRA / DoRA)
    ckpt: bool = False  # --grad-checkpointing
    compile: bool = False  # --compile

    @property
    def name(self) -> str:
        parts = [self.adapter + (f"-last{self.last_n}" if self.last_n else "")]
        return " + ".join(parts + ["checkpointing"] * self.ckpt + ["compile"] * self.compile)

    @property
    def reference(self) -> "Variant":
        """The same adapter and blocks without checkpointing and compile (the speed reference)."""
        return Variant(self.adapter, self.last_n)


def variants(with_compile: bool, adapters: list[str] = ADAPTERS) -> list[Variant]:
    """Table 2's rows for ``adapters`` (``none`` is table 1's: a frozen backbone has no memory option
    to apply)."""
    rows = [Variant(a) for a in ADAPTERS if a != "none"]
    rows += [Variant(a, ckpt=True) for a in ("lora", "dora", "full")]
    rows += [Variant("lora", 4), Variant("lora", 4, ckpt=True)]
    if with_compile:
        rows += [Variant("lora", compile=True), Variant("full", compile=True)]
    return [v for v in rows if v.adapter in adapters]


def _arch_name(model: str) -> str:
    """``ViT-S/14`` for ``small``, and so on (``tiny`` is dinotune's 4-block test size)."""
    return {"tiny": "4-block test ViT/14", "small": "ViT-S/14", "base": "ViT-B/14", "large": "ViT-L/14"}[model]


def _precision(device: str) -> str:
    return "bf16" if device.startswith("cuda") else "fp32"


def _synthetic_batches(n: int, batch: int, size: int, classes: int = 10):
    import torch

    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n)]


def _measure(step, n_warmup: int, n_steps: int, device: str) -> tuple[float, float]:
    """Wall and CPU seconds (this process's, every thread) of ``n_steps`` steps after ``n_warmup``."""
    import torch

    for _ in range(n_warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(n_steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def saved_activation_mb(loss_fn, model) -> float:
    """MiB one forward (``loss_fn()``) keeps for backward, each storage counted once: autograd's
    saved tensors and the inputs checkpointed blocks keep (``dinotune.engine.speed``), the
    weights of ``model`` left out (autograd keeps references to them, not copies). A
    deterministic activation-memory figure, where peak RSS on the CPU also moves with the
    allocator and whatever else the process imported."""
    from dinotune.engine.speed import saved_activations

    with saved_activations(model) as saved:
        loss = loss_fn()
    if loss.requires_grad:
        loss.backward()  # frees the graph the same way a training step does
    return saved.mb


def current_rss_mb() -> float | None:
    """This process's resident set size now (Linux), or None."""
    try:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Engine:
    """dinotune's training pieces for one classifier, assembled as ``dinotune train`` assembles
    them (config, backbone, head, memory / speed options, Trainer, optimizer and schedule of the
    first phase); ``run`` trains on in-memory batches with the Trainer's own epoch loop."""

    trainer: object
    task: object
    bundle: object
    phase: object
    optimizer: object
    scheduler: object
    device: object
    precision: str

    def run(self, batches: list[dict]) -> None:
        from torch.utils.data import DataLoader

        self.trainer.train_loader = DataLoader(batches, batch_size=None)
        self.trainer.train_epoch(0, self.phase, self.optimizer, self.scheduler, 0)

    def loss(self, batch: dict):
        """The training loss of one batch (``batch`` on the device), under the run's autocast."""
        from dinotune.engine.device import autocast

        with autocast(self.device, self.precision):
            return self.task.training_step(self.bundle, self.bundle.model, batch)["loss"]


def build_engine(run_dir: Path, *, model: str, adapter: str, size: int, batch: int, device: str, precision: str,
                 rank: int = 8, last_n: int = 0, ckpt: bool = False, compile: bool = False,
                 classes: int = 10) -> Engine:
    """An ``Engine`` for ``random:<model>`` with a linear head on CLS + mean patch token (LoRA /
    DoRA rank ``rank`` on q, k, v), writing into ``run_dir``."""
    import torch
    from torch.utils.data import DataLoader

    from dinotune.config import build_config
    from dinotune.engine.optim import phase_at
    from dinotune.engine.speed import prepare_for_training
    from dinotune.engine.trainer import Trainer
    from dinotune.tasks import build_backbone, get_task
    from dinotune.utils import set_quiet

    set_quiet(True)
    cfg = build_config("classify", model=f"random:{model}", adapter=adapter, image_size=size,
                       batch_size=batch, epochs=1, precision=precision, device=device, progress=False,
                       rank=rank, alpha=2 * rank, targets=["qkv"], pool="cls_mean", last_n_blocks=last_n,
                       grad_checkpointing=ckpt, compile=compile)
    task = get_task(cfg)
    backbone, _ = build_backbone(cfg)
    meta = {"class_names": [str(i) for i in range(classes)], "num_classes": classes}
    bundle = task.build_model(meta, backbone)
    dev = torch.device(device)
    prepare_for_training(bundle, cfg.train, dev)
    # the loader sets the schedule's length (one step per epoch) only: ``Engine.run`` replaces it
    trainer = Trainer(bundle=bundle, task=task, train_loader=DataLoader([None], batch_size=None), val_loader=None,
                      cfg=cfg, run_dir=run_dir, meta=meta, device=dev, precision=precision)
    index, phase = phase_at(trainer.phases, 0)
    optimizer, scheduler = trainer.start_phase(index, phase, None)
    return Engine(trainer, task, bundle, phase, optimizer, scheduler, dev, precision)


def image_batches(n: int, batch: int, size: int, classes: int = 10) -> list[dict]:
    """``n`` batches of random images and labels as the classification task reads them."""
    return [{"image": x, "label": y} for x, y in _synthetic_batches(n, batch, size, classes)]


def attention_of(model) -> str | None:
    """The attention implementation transformers resolved for the backbone inside ``model``
    (``sdpa`` where PyTorch's scaled_dot_product_attention serves, transformers' default)."""
    return next((m.config._attn_implementation for m in model.modules()
                 if hasattr(getattr(m, "config", None), "_attn_implementation")), None)


def run_dinotune(adapter: str, args) -> tuple[tuple[float, float], float | None, float | None, str | None]:
    """The dinotune engine's own training step (Trainer.train_epoch) on in-memory batches, with
    the run's memory and speed options applied as ``dinotune train`` applies them. Returns the
    timed seconds, the activation MiB (None under --compile), the seconds of the first step
    (compilation included) and the attention implementation. Seconds are (wall, CPU)."""
    import torch

    batches = image_batches(args.warmup + args.steps, args.batch, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        engine = build_engine(Path(tmp), model=args.model, adapter=adapter, size=args.size, batch=args.batch,
                              device=args.device, precision=_precision(args.device), rank=args.rank,
                              last_n=args.last_n, ckpt=args.ckpt, compile=args.compile)
        device = engine.device
        t0 = time.perf_counter()
        engine.run(batches[:1])  # the first step: compiles under --compile
        first = time.perf_counter() - t0
        if args.warmup > 1:
            engine.run(batches[1: args.warmup])
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0, c0 = time.perf_counter(), time.process_time()
        engine.run(batches[args.warmup:])
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0, time.process_time() - c0
        saved = None
        if not args.compile:  # the counting hooks would make the compiled graph recompile
            x, y = batches[0]["image"].to(device), batches[0]["label"].to(device)
            saved = saved_activation_mb(lambda: engine.loss({"image": x, "label": y}), engine.bundle.model)
        engine.optimizer.zero_grad(set_to_none=True)
        return seconds, saved, first, attention_of(engine.bundle.model)


def run_baseline(adapter: str, args) -> tuple[tuple[float, float], float, None, str | None]:
    """A plain loop as a user would write it with transformers + PEFT."""
    import torch
    from torch import nn
    from transformers import AutoModel

    from dinotune.backbone.registry import arch_config

    device = torch.device(args.device)
    torch.manual_seed(0)
    backbone = AutoModel.from_config(arch_config(args.model))
    if adapter in ("lora", "dora"):
        from peft import LoraConfig, get_peft_model

        backbone = get_peft_model(backbone, LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                       target_modules=["q_proj", "k_proj", "v_proj"],
                                                       use_dora=adapter == "dora"))
    elif adapter == "none":
        backbone.requires_grad_(False)
    head = nn.Linear(2 * backbone.config.hidden_size, 10)
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
    saved = saved_activation_mb(lambda: forward(data[0][0].to(device), data[0][1].to(device)),
                                nn.ModuleList([backbone, head]))
    opt.zero_grad(set_to_none=True)
    return seconds, saved, None, attention_of(backbone)


def measure(args) -> dict:
    """One configuration (``args.impl``, ``args.adapter`` and the variant flags) in this process."""
    import peft  # noqa: F401
    import torch

    import dinotune.tasks  # noqa: F401 - with torch, transformers and peft: the fixed cost of every process

    torch.set_num_threads(args.threads) if args.threads else None
    base_rss = current_rss_mb()
    run = run_dinotune if args.impl == "dinotune" else run_baseline
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    (seconds, cpu_seconds), saved, first, attention = run(args.adapter, args)
    peak_mb = (torch.cuda.max_memory_allocated() / 2**20 if cuda
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"impl": args.impl, "adapter": args.adapter, "last_n": args.last_n, "ckpt": args.ckpt,
            "compile": args.compile, "seconds": seconds, "first_step_s": first,
            "images_per_s": args.steps * args.batch / seconds,
            "images_per_cpu_s": args.steps * args.batch / cpu_seconds, "peak_mb": peak_mb,
            "peak_above_imports_mb": peak_mb if cuda or base_rss is None else peak_mb - base_rss,
            "saved_activation_mb": saved, "attn_implementation": attention}


def child(args) -> None:
    print(json.dumps(measure(args)))


def _in_process(args, impl: str, v: Variant) -> dict:
    """``--in-process``: the configuration in this process (peak RSS is then the process's so far)."""
    import torch

    one = argparse.Namespace(**{**vars(args), "impl": impl, "adapter": v.adapter, "last_n": v.last_n,
                                "ckpt": v.ckpt, "compile": v.compile})
    row = measure(one)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def _launch(args, impl: str, v: Variant) -> dict:
    if args.in_process:
        return _in_process(args, impl, v)
    cmd = [sys.executable, __file__, "--impl", impl, "--adapter", v.adapter, "--device", args.device,
           "--model", args.model,
           "--batch", str(args.batch), "--size", str(args.size), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--rank", str(args.rank), "--threads", str(args.threads),
           "--last-n", str(v.last_n)] + ["--ckpt"] * v.ckpt + ["--compile"] * v.compile
    with tempfile.TemporaryDirectory() as cache:
        # a cold compile, as a user's first run has it: Inductor's on-disk cache would hide its cost
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache} if v.compile else None
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{impl}/{v.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _load() -> float | None:
    """The machine's 1-minute load average (other processes share the CPU: timings are noisy)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _median(rs: list[dict]) -> dict:
    """Medians over repeats (throughput and RSS both move run to run); every run kept."""
    def med(key):
        values = sorted(r[key] for r in rs)
        return values[len(values) // 2]
    row = {**rs[0], "images_per_s": med("images_per_s"), "images_per_cpu_s": med("images_per_cpu_s"),
           "peak_mb": med("peak_mb"),
           "peak_above_imports_mb": med("peak_above_imports_mb"),
           "all_images_per_s": [r["images_per_s"] for r in rs], "all_peak_mb": [r["peak_mb"] for r in rs]}
    del row["seconds"]
    return row


def _ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    return f"{a / b:.{digits}f}" if a is not None and b else "-"


def baseline_table(by: dict, adapters: list[str] = ADAPTERS) -> list[str]:
    table = ["| adapter | baseline img/s | dinotune img/s | speed ratio | baseline peak MB | dinotune peak MB "
             "| memory ratio | baseline activations MB | dinotune activations MB | activation ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for a in adapters:
        b, d = by[("baseline", Variant(a))], by[("dinotune", Variant(a))]
        table.append(f"| {a} | {b['images_per_s']:.2f} | {d['images_per_s']:.2f} | "
                     f"{_ratio(d['images_per_s'], b['images_per_s'])} | {b['peak_mb']:.0f} | {d['peak_mb']:.0f} | "
                     f"{_ratio(d['peak_mb'], b['peak_mb'])} | {b['saved_activation_mb']:.1f} | "
                     f"{d['saved_activation_mb']:.1f} | {_ratio(d['saved_activation_mb'], b['saved_activation_mb'], 3)} |")
    return table


def options_table(by: dict, rows: list[Variant], cuda: bool) -> list[str]:
    """Table 2: memory relative to full fine-tuning, speed relative to the same adapter plain (on
    the CPU, in images per CPU-second of the process: less moved by other processes than wall
    time on a shared machine)."""
    peak = "peak allocated MB" if cuda else "peak RSS MB | peak above imports MB"
    speed = "img/s" if cuda else "img/s (wall) | img per CPU-s"
    key = "images_per_s" if cuda else "images_per_cpu_s"
    table = [f"| setting | activations MB | {peak} | activations / full | peak / full | {speed} "
             "| speed / same adapter plain | first step s |",
             "|---|---|---|" + ("" if cuda else "---|---|") + "---|---|---|---|---|"]
    full = by.get(("dinotune", Variant("full")), {"saved_activation_mb": None, "peak_above_imports_mb": None})
    for v in rows:
        d, ref = by[("dinotune", v)], by[("dinotune", v.reference)]
        act = "-" if d["saved_activation_mb"] is None else f"{d['saved_activation_mb']:.1f}"
        peaks = f"{d['peak_mb']:.0f}" if cuda else f"{d['peak_mb']:.0f} | {d['peak_above_imports_mb']:.0f}"
        speeds = f"{d['images_per_s']:.2f}" if cuda else f"{d['images_per_s']:.2f} | {d['images_per_cpu_s']:.2f}"
        first = "-" if d.get("first_step_s") is None else f"{d['first_step_s']:.1f}"
        table.append(f"| {v.name} | {act} | {peaks} | {_ratio(d['saved_activation_mb'], full['saved_activation_mb'])} "
                     f"| {_ratio(d['peak_above_imports_mb'], full['peak_above_imports_mb'])} | "
                     f"{speeds} | {_ratio(d[key], ref[key])} | {first} |")
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="small", choices=["tiny", "small", "base", "large"],
                   help="the random:<model> DINOv2 architecture (default small: ViT-S/14)")
    p.add_argument("--adapters", default=",".join(ADAPTERS),
                   help=f"comma-separated subset of {','.join(ADAPTERS)} (table 1's rows, and table 2's of these)")
    p.add_argument("--in-process", action="store_true",
                   help="run every configuration in this process, not a fresh one each (a quick check of the "
                        "script: peak memory is then not per configuration on the CPU)")
    p.add_argument("--batch", type=int, default=None, help="default 8 on CPU, 64 on CUDA")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5 CPU, 30 CUDA)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (at least 1: it compiles)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration; the median is reported")
    p.add_argument("--no-compile", action="store_true", help="leave out the --compile rows")
    p.add_argument("--skip-baseline", action="store_true",
                   help="leave out table 1 (the hand-written loop and the frozen backbone): table 2 alone")
    p.add_argument("--note", default="", help="a line written under the settings (e.g. the machine's load)")
    p.add_argument("--out", default=None)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    p.add_argument("--last-n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    args.batch = args.batch or (64 if cuda else 8)
    args.steps = args.steps or (30 if cuda else 5)
    args.warmup = max(1, args.warmup)
    adapters = [a for a in ADAPTERS if a in args.adapters.split(",")]
    unknown = set(args.adapters.split(",")) - set(ADAPTERS)
    if unknown or not adapters:
        p.error(f"--adapters {args.adapters}: choose among {','.join(ADAPTERS)}")
    if args.impl:
        child(args)
        return
    import torch

    from dinotune.engine.speed import compile_problem

    no_compile = "left out (--no-compile)" if args.no_compile else compile_problem(torch.device(args.device))
    rows = variants(with_compile=not no_compile, adapters=adapters)
    runs: dict[tuple[str, Variant], list[dict]] = {}
    t_start, load_start = time.time(), _load()
    for repeat in range(args.repeats):
        # alternate the order so neither side always runs on a warmer machine
        order = ("baseline", "dinotune") if repeat % 2 == 0 else ("dinotune", "baseline")
        pairs = [] if args.skip_baseline else [(i, Variant(a)) for a in adapters for i in order]
        jobs = pairs + [("dinotune", v) for v in rows if ("dinotune", v) not in pairs]
        for impl, v in jobs:
            row = _launch(args, impl, v)
            runs.setdefault((impl, v), []).append(row)
            print(f"{v.name:38s} {impl:9s} {row['images_per_s']:8.2f} img/s  peak {row['peak_mb']:8.0f} MB  "
                  f"({time.time() - t_start:.0f} s)", flush=True)
    by = {key: _median(rs) for key, rs in runs.items()}
    table1 = (["Not run this time (--skip-baseline); run the script without it for this table."]
              if args.skip_baseline else baseline_table(by, adapters))
    table2 = options_table(by, rows, cuda)
    settings = {k: getattr(args, k) for k in ("device", "model", "batch", "size", "steps", "warmup", "rank",
                                              "repeats", "threads", "skip_baseline", "in_process")}
    settings["adapters"] = adapters
    settings["load_average_1min"] = {"start": load_start, "end": _load()}
    settings["precision"] = _precision(args.device)
    settings["compile_rows"] = "yes" if not no_compile else f"no: {no_compile}"
    settings["wall_s"] = round(time.time() - t_start)
    result = {"settings": settings, "machine": machine_info(args.device), "note": args.note,
              "rows": [{**row, "setting": key[1].name} for key, row in by.items()],
              "variants": [asdict(v) for v in rows]}
    out = Path(args.out) if args.out else HERE / "results" / f"adapters-{'cuda' if cuda else 'cpu'}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    memory = ("max allocated on CUDA" if cuda else
              "the peak resident set size of the whole process, and that peak above the RSS right after the imports "
              "(the libraries every process carries), which the ratios to full fine-tuning use")
    md = [f"# Adapter training-step benchmark ({args.device})", "",
          f"random:{args.model} ({_arch_name(args.model)}), {args.size} px, batch {args.batch}, {settings['precision']}, "
          f"{args.steps} timed steps after {args.warmup} warm-up, median of {args.repeats} run(s)"
          f"{' in alternating order' if args.repeats > 1 else ''}"
          f"{' (all in one process, --in-process: peak memory is not per setting)' if args.in_process else ''}"
          f"; LoRA/DoRA rank {args.rank} on q,k,v; "
          f"{settings['wall_s']} s in all; 1-minute load average {settings['load_average_1min']['start']} at "
          f"the start, {settings['load_average_1min']['end']} at the end.",
          f"Attention: {', '.join(sorted({str(r.get('attn_implementation')) for r in result['rows']}))} "
          "(transformers' implementation of the backbone's attention). "
          f"Machine: {json.dumps(result['machine'])}", *(["", args.note] if args.note else []), "",
          f"Peak memory is {memory}; activations are the bytes kept for backward in one forward "
          "(autograd's saved tensors plus the block inputs checkpointing keeps; deterministic).", "",
          "## dinotune vs a hand-written transformers + PEFT loop", "",
          "Ratios are dinotune / baseline (speed: >1 is faster; memory: <1 is smaller).", "", *table1, "",
          "## Memory and speed options (dinotune)", "",
          "Memory relative to full fine-tuning without options; speed relative to the same adapter (and "
          "blocks) without checkpointing or compile" + ("" if cuda else ", in images per CPU-second of the "
          "training process (its user + system time over the timed steps), which other processes on a shared "
          "machine move far less than wall time") + "; the first step includes compilation under --compile (a cold "
          "compile: each --compile run gets an empty Inductor cache)."
          + ("" if not no_compile else f" No --compile rows: {no_compile}."), "", *table2, ""]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(table1 + [""] + table2))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
