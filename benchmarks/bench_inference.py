"""Inference speed of one model four ways, on one machine in one run: PyTorch with the LoRA adapter
unmerged, PyTorch merged (what ``dinotune predict`` runs), ONNX Runtime fp32 (``dinotune export
--format onnx``) and ONNX Runtime with dynamic INT8 quantisation (``onnxruntime.quantization
.quantize_dynamic``: int8 weights of the MatMul / Gemm layers, activations quantised on the fly).

Models (``--tasks``): a classifier (``random:small``, LoRA, 224 px), the lightweight DETR-style
detector (``--lightweight`` on ``random:small``, 224 px here to keep the run short; the preset's own
size is 518) and, with ``--tasks ...,segment``, an FPN segmenter (LoRA). Each is trained for one
epoch on a few images first (random weights: speed does not depend on them): the real ones of
``--data shared`` (hymenoptera, coco_tiny; the segmenter always uses synthetic masks) or the
synthetic ones of ``--data synthetic`` (``_synthetic.py``: nothing to download). Every variant
computes the same thing: the graph module the export writes (model + the tensor part of the
post-processing, each task's ``export.py``) on the same preprocessed batch.

With ``--device cuda`` the variants are PyTorch on the GPU (LoRA unmerged and merged in fp32, merged
under bf16 autocast) and ONNX Runtime's CUDA execution provider (the fp32 export, and with
``--onnx-fp16`` the ``half`` export); dynamic INT8 is a CPU technique (its integer matmuls run on
the CPU provider) and is left out. Inputs go in and outputs come back as numpy arrays for every
variant, so each timing includes the host-device copies a deployment pays. Onnxruntime's CUDA
provider needs the ``onnxruntime-gpu`` package and CUDA / cuDNN libraries it was built for: where
the session falls back to the CPU, its variants are reported as skipped with the reason.

- latency: batch 1, median of ``--repeats`` calls after warm-up;
- throughput: batch ``--batch`` (8 on the CPU, 32 on CUDA), images per second from the median of
  ``--repeats // 2`` calls;
- one variant runs at a time (warm-up first), in three rounds, so a passing load on a shared machine
  hits them alike;
- accuracy beside each variant, on real images (hymenoptera val / coco_tiny val) against PyTorch
  merged: classification top-1 agreement and the largest logit difference; detection the share of
  PyTorch's top-10 detections per image found again (same class, IoU > 0.5) and the largest score
  difference of those; segmentation the share of pixels with the same label and the largest logit
  difference.

    DINOTUNE_SHARED=../shared python benchmarks/bench_inference.py [--threads 2] [--repeats 20]
    python benchmarks/bench_inference.py --device cuda --data synthetic --tasks classify,detect,segment --onnx-fp16
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import _synthetic
import numpy as np
from _common import machine_info, shared_dataset

HERE = Path(__file__).resolve().parent
TASKS = ("classify", "detect", "segment")
VARIANTS = ("pytorch unmerged", "pytorch merged", "onnxruntime fp32", "onnxruntime int8 (dynamic)")
CUDA_VARIANTS = ("pytorch unmerged", "pytorch merged", "pytorch merged bf16", "onnxruntime-gpu fp32",
                 "onnxruntime-gpu fp16")
REFERENCE = "pytorch merged"  # what latency, throughput and accuracy are compared with
MODEL_NAMES = {"classify": "classifier ({model}, LoRA)", "detect": "lightweight DETR ({model})",
               "segment": "FPN segmenter ({model}, LoRA)"}


def small_class_folders(data: Path, out: Path, per_class: int) -> Path:
    """``per_class`` training images of each hymenoptera class, linked into ``out/train`` (+ val)."""
    for split in ("train", "val"):
        for folder in sorted((data / split).iterdir()):
            target = out / split / folder.name
            target.mkdir(parents=True, exist_ok=True)
            for image in sorted(folder.glob("*.jpg"))[:per_class]:
                (target / image.name).symlink_to(image.resolve())
    return out


def datasets(args: argparse.Namespace, tmp: Path) -> dict[str, Path]:
    """Each task's training data: the shared real images, or synthetic ones made in ``tmp``."""
    size = max(args.image_size, 56)
    synthetic = {"classify": lambda: _synthetic.class_folders(tmp / "classes", 8, size),
                 "detect": lambda: _synthetic.coco_folders(tmp / "coco", 8, size),
                 "segment": lambda: _synthetic.mask_folders(tmp / "masks", 8, size)}
    shared = {"classify": lambda: small_class_folders(shared_dataset("hymenoptera", args.hymenoptera), tmp / "ants", 8),
              "detect": lambda: shared_dataset("coco_tiny", args.coco)}
    makers = {**synthetic, **shared} if args.data == "shared" else synthetic
    return {task: makers[task]() for task in args.tasks}


def train_runs(args: argparse.Namespace, tmp: Path, data: dict[str, Path]) -> dict[str, Path]:
    import dinotune

    common = dict(model=args.model, epochs=1, batch_size=8, workers=0, progress=False, device=args.device,
                  image_size=args.image_size)
    options = {"classify": dict(adapter="lora"),
               "detect": dict(lightweight=True, subset=8, val_subset=4),
               "segment": dict(adapter="lora", decoder="fpn")}
    return {task: Path(dinotune.train(task=task, data=str(data[task]), out=str(tmp / task), **common,
                                      **options[task])["run_dir"])
            for task in args.tasks}


def eval_paths(task: str, args: argparse.Namespace, data: Path) -> list[Path]:
    """The evaluation images of ``task`` (real ones with ``--data shared``, where the task has them)."""
    if args.data == "shared" and task == "classify":
        paths = sorted((shared_dataset("hymenoptera", args.hymenoptera) / "val").rglob("*.jpg"))
        return paths[:: max(1, len(paths) // args.images)][: args.images]
    if args.data == "shared" and task == "detect":
        return sorted((shared_dataset("coco_tiny", args.coco) / "val2017").glob("*.jpg"))[: args.images // 2]
    return _synthetic.eval_images(task, data)


def real_inputs(task: str, info: Any, paths: list[Path]) -> list[tuple[np.ndarray, ...]]:
    """The evaluation images, preprocessed as the runtime does (each a tuple of graph inputs)."""
    from dinotune.runtime.inputs import read_image
    from dinotune.tasks.classify.runtime import classify_input
    from dinotune.tasks.detect.runtime import detect_input
    from dinotune.tasks.segment.runtime import segment_input

    out = []
    for p in paths:
        image = read_image(p, info.input, 0)
        if task == "classify":
            out.append((classify_input(image, info.image_size, info.input),))
        elif task == "detect":
            canvas, _ = detect_input(image, info.image_size, info.input)
            out.append((canvas, np.asarray(image.shape[:2], dtype=np.float32)))
        else:  # the graph's fixed square input
            out.append((segment_input(image, (info.image_size, info.image_size), info.patch_size, info.input)[0],))
    return out


def batch(items: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    return tuple(np.stack(parts) for parts in zip(*items))


Runner = Callable[..., list[np.ndarray]]


def torch_runner(graph: Any, device: str, bf16: bool = False) -> Runner:
    """``graph`` on ``device`` (bf16 autocast with ``bf16``), numpy in and out."""
    import contextlib

    import torch

    cast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def run_graph(*inputs: np.ndarray) -> list[np.ndarray]:
        with torch.inference_mode(), cast:
            out = graph(*(torch.from_numpy(x).to(device) for x in inputs))
        return [(t.float() if t.is_floating_point() else t).cpu().numpy()
                for t in (out if isinstance(out, tuple) else (out,))]
    return run_graph


def ort_session(path: Path, device: str, threads: int) -> tuple[Any, str | None]:
    """An onnxruntime session of ``path`` on ``device``'s provider, and None; or None and why not
    (the CUDA provider missing from this onnxruntime, or failing to load its libraries)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if not device.startswith("cuda"):
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"]), None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None, (f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (providers: "
                      f"{', '.join(ort.get_available_providers())}): install onnxruntime-gpu")
    index = int(device.split(":")[1]) if ":" in device else 0
    session = ort.InferenceSession(str(path), sess_options=options,
                                   providers=[("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"])
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return None, (f"onnxruntime-gpu {ort.__version__} could not start its CUDA provider (it fell back to "
                      f"{session.get_providers()[0]}; its log above names the missing library: onnxruntime-gpu "
                      "needs the CUDA / cuDNN major versions it was built for)")
    return session, None


def ort_runner(session: Any) -> Runner:
    names = [i.name for i in session.get_inputs()]
    return lambda *inputs: session.run(None, dict(zip(names, inputs)))


def runners(run: Path, folder: Path, args: argparse.Namespace, folder16: Path | None = None
            ) -> tuple[dict[str, Runner], dict[str, str]]:
    """Each variant as ``f(*inputs) -> [outputs]`` on numpy arrays, and the variants skipped with why."""
    import dinotune
    from dinotune.runtime import ExportInfo

    size = ExportInfo.read(folder).image_size
    graphs = {}
    for name, merge in (("pytorch unmerged", False), ("pytorch merged", True)):
        loaded = dinotune.load(run, device=args.device, merge=merge, precision="fp32")
        graphs[name] = loaded.task.export_graph(loaded, loaded.model, size).eval()
    fns = {name: torch_runner(graph, args.device) for name, graph in graphs.items()}
    skipped: dict[str, str] = {}
    if not args.device.startswith("cuda"):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        int8 = folder / "model.int8.onnx"
        quantize_dynamic(str(folder / "model.onnx"), str(int8), weight_type=QuantType.QInt8)
        fns["onnxruntime fp32"] = ort_runner(ort_session(folder / "model.onnx", "cpu", args.threads)[0])
        fns["onnxruntime int8 (dynamic)"] = ort_runner(ort_session(int8, "cpu", args.threads)[0])
        return fns, skipped
    fns["pytorch merged bf16"] = torch_runner(graphs["pytorch merged"], args.device, bf16=True)
    exports = {"onnxruntime-gpu fp32": folder, "onnxruntime-gpu fp16": folder16}
    for name, path in exports.items():
        if path is None:
            skipped[name] = "not asked for (--onnx-fp16 exports and times the half-precision graph)"
            continue
        session, why = ort_session(path / "model.onnx", args.device, args.threads)
        if session is None:
            skipped[name] = why
        else:
            fns[name] = ort_runner(session)
    return fns, skipped


def timed(fns: dict[str, Callable[..., Any]], inputs: tuple[np.ndarray, ...], repeats: int,
          rounds: int = 3, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each ``fn(*inputs)``: ``rounds`` rounds, in each every variant in turn runs
    ``warmup`` untimed calls and then its share of ``repeats`` timed ones. One variant runs at a
    time (onnxruntime's and torch's thread pools spin after a call, so interleaving them call by
    call would time each against the other's spinning threads), and the rounds spread a load that
    comes and goes on a shared machine over all variants alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    per_round = max(1, -(-repeats // rounds))
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(warmup):
                fn(*inputs)
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn(*inputs)
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    lt, rb = np.maximum(a[:2], b[:2]), np.minimum(a[2:], b[2:])
    inter = float(np.prod(np.clip(rb - lt, 0, None)))
    union = float(np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter)
    if union <= 0:  # degenerate boxes (clipped to a line at the border): the same box or not
        return float(np.allclose(a, b, atol=1e-2))
    return inter / union


def agreement(task: str, ref: list[np.ndarray], got: list[np.ndarray]) -> dict[str, float]:
    """Accuracy of ``got`` against PyTorch merged's ``ref`` outputs over all real images."""
    if task == "classify":
        return {"top1_agreement": float((ref[0].argmax(1) == got[0].argmax(1)).mean()),
                "max_logit_diff": float(np.abs(ref[0] - got[0]).max())}
    if task == "segment":  # B x K x h x w logits
        return {"pixel_agreement": float((ref[0].argmax(1) == got[0].argmax(1)).mean()),
                "max_logit_diff": float(np.abs(ref[0] - got[0]).max())}
    found, total, worst = 0, 0, 0.0
    for i in range(len(ref[0])):
        for j in range(min(10, ref[0].shape[1])):
            total += 1
            hits = [k for k in range(got[0].shape[1])
                    if got[1][i, k] == ref[1][i, j] and _iou(ref[2][i, j], got[2][i, k]) > 0.5]
            if hits:
                found += 1
                worst = max(worst, min(abs(float(got[0][i, k] - ref[0][i, j])) for k in hits))
    return {"top10_found": found / max(1, total), "max_score_diff": worst}


def bench_task(task: str, run: Path, args: argparse.Namespace, tmp: Path, data: Path
               ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """The rows of ``task``'s variants, and the variants skipped (``task``, ``variant``, ``reason``)."""
    import dinotune
    from dinotune.runtime import ExportInfo

    t0 = time.perf_counter()
    folder = dinotune.export(run, tmp / f"{task}-onnx", exporter=args.exporter)
    export_s = time.perf_counter() - t0
    folder16, half_failed = None, None
    if args.onnx_fp16 and args.device.startswith("cuda"):
        try:
            folder16 = dinotune.export(run, tmp / f"{task}-onnx-fp16", exporter=args.exporter, half=True)
        except Exception as exc:  # noqa: BLE001 - one variant lost, the others still measured
            half_failed = f"the half-precision export failed: {type(exc).__name__}: {str(exc)[:300]}"
    info = ExportInfo.read(folder)
    items = real_inputs(task, info, eval_paths(task, args, data))
    n = args.batch
    one, many = batch(items[:1]), batch((items * n)[:n])
    fns, skipped = runners(run, folder, args, folder16)
    if half_failed:
        skipped["onnxruntime-gpu fp16"] = half_failed
    outputs = {name: [np.concatenate(parts) for parts in zip(*(fn(*batch(items[i: i + n]))
                                                                for i in range(0, len(items), n)))]
               for name, fn in fns.items()}
    warmup = 5 if args.device.startswith("cuda") else 2  # the GPU's first calls pick kernels
    latency = timed(fns, one, args.repeats, warmup=warmup)
    per_batch = timed(fns, many, max(3, args.repeats // 2), warmup=max(1, warmup // 2))
    rows = []
    for name in fns:
        row = {"task": task, "variant": name, "latency_ms": round(1000 * latency[name], 3),
               "throughput_img_s": round(n / per_batch[name], 2), "batch": n, "images": len(items),
               "export_s": round(export_s, 1),
               **{k: round(v, 6) for k, v in agreement(task, outputs[REFERENCE], outputs[name]).items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    merged = next(r for r in rows if r["variant"] == REFERENCE)
    for r in rows:
        r["latency_ratio"] = round(r["latency_ms"] / merged["latency_ms"], 3)
        r["throughput_ratio"] = round(r["throughput_img_s"] / merged["throughput_img_s"], 3)
    return rows, [{"task": task, "variant": k, "reason": v} for k, v in skipped.items()]


def ort_info() -> dict[str, Any]:
    """The onnxruntime this run used: version, build device and providers."""
    import onnxruntime as ort

    return {"version": ort.__version__, "device": ort.get_device(), "providers": ort.get_available_providers(),
            "path": str(Path(ort.__file__).parent)}


def _accuracy(r: dict[str, Any]) -> str:
    if r["task"] == "classify":
        return f"top-1 agreement {r['top1_agreement']:.3f}, max logit diff {r['max_logit_diff']:.2e}"
    if r["task"] == "segment":
        return f"pixel agreement {r['pixel_agreement']:.4f}, max logit diff {r['max_logit_diff']:.2e}"
    return f"top-10 found {r['top10_found']:.3f}, max score diff {r['max_score_diff']:.2e}"


def write_results(rows: list[dict[str, Any]], skipped: list[dict[str, str]], args: argparse.Namespace,
                  machine: dict[str, Any], ort: dict[str, Any]) -> str:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("hymenoptera", "coco", "out")}
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "machine": machine, "onnxruntime": ort,
                                                    "rows": rows, "skipped": skipped}, indent=2))
    cuda = args.device.startswith("cuda")
    where = machine.get("gpu", "CUDA") if cuda else f"{args.threads} threads, CPU"
    images = ("real images (hymenoptera val, coco_tiny val; synthetic masks for segmentation)" if args.data == "shared"
              else "synthetic images (benchmarks/_synthetic.py)")
    lines = [f"# Inference speed: PyTorch vs ONNX Runtime ({args.model}, {args.image_size} px, {where})", "",
             "Same preprocessed batches, same graph module (model + tensor post-processing) for every variant, numpy "
             "in and out (GPU timings include the host-device copies); ratios are to PyTorch merged (latency: lower "
             f"is faster; throughput: higher is faster). Accuracy is against PyTorch merged (fp32) on {images}. "
             f"onnxruntime {ort['version']} ({ort['device']}). Machine: " + json.dumps(machine), "",
             f"| model | variant | batch-1 latency ms | ratio | batch-{args.batch} img/s | ratio | accuracy vs PyTorch merged |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        model = MODEL_NAMES[r["task"]].format(model=args.model)
        lines.append(f"| {model} | {r['variant']} | {r['latency_ms']:.2f} | {r['latency_ratio']:.2f} | "
                     f"{r['throughput_img_s']:.1f} | {r['throughput_ratio']:.2f} | {_accuracy(r)} ({r['images']} images) |")
    if skipped:
        lines += ["", "Not measured:", ""] + [f"- {s['task']}, {s['variant']}: {s['reason']}" for s in skipped]
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hymenoptera", default=None, help="default: $DINOTUNE_SHARED/data/hymenoptera")
    p.add_argument("--coco", default=None, help="default: $DINOTUNE_SHARED/data/coco_tiny")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=0, help="torch and onnxruntime threads (0: the CPU count)")
    p.add_argument("--repeats", type=int, default=20, help="timed batch-1 calls (the throughput batch: half as many)")
    p.add_argument("--images", type=int, default=48, help="real classification images for the accuracy columns "
                                                           "(detection: half as many)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N (trains, loads and runs there)")
    p.add_argument("--data", choices=["shared", "synthetic"], default="shared",
                   help="shared: the real images of $DINOTUNE_SHARED; synthetic: made here (a clean checkout)")
    p.add_argument("--tasks", default="classify,detect", help=f"comma-separated, of {','.join(TASKS)}")
    p.add_argument("--model", default="random:small", help="the backbone (random weights: no download)")
    p.add_argument("--batch", type=int, default=None, help="the throughput batch (default 8 CPU, 32 CUDA)")
    p.add_argument("--exporter", choices=["dynamo", "legacy"], default=None, help="default: dinotune export's")
    p.add_argument("--onnx-fp16", action="store_true", help="CUDA: also export with half=True and time it")
    p.add_argument("--out", default=None, help="path without suffix (default results/inference-<cpu|cuda>)")
    args = p.parse_args()
    import os

    import torch

    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.tasks or set(args.tasks) - set(TASKS):
        p.error(f"--tasks {','.join(args.tasks)}: choose among {','.join(TASKS)}")
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    args.batch = args.batch or (32 if cuda else 8)
    args.out = args.out or str(HERE / "results" / f"inference-{'cuda' if cuda else 'cpu'}")
    args.threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    if cuda:
        _preload_cuda_libraries()
    rows, skipped = [], []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = datasets(args, tmp)
        runs = train_runs(args, tmp, data)
        for task, run in runs.items():
            task_rows, task_skipped = bench_task(task, run, args, tmp, data[task])
            rows += task_rows
            skipped += task_skipped
    print(write_results(rows, skipped, args, machine_info(args.device), ort_info()))


def _preload_cuda_libraries() -> None:
    """onnxruntime-gpu 1.21+ can load the CUDA / cuDNN libraries of the nvidia-* pip packages
    (those torch installs) before its first CUDA session; older versions find them on the
    library path or not at all (the session then says so)."""
    try:
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls") and "CUDAExecutionProvider" in ort.get_available_providers():
            ort.preload_dlls()
    except Exception as exc:  # noqa: BLE001 - the session reports what is missing
        print(f"onnxruntime.preload_dlls: {exc}", flush=True)


if __name__ == "__main__":
    main()
