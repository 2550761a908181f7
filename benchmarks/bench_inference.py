"""Inference speed of one model four ways, on one machine in one run: PyTorch with the LoRA adapter
unmerged, PyTorch merged (what ``dinotune predict`` runs), ONNX Runtime fp32 (``dinotune export
--format onnx``) and ONNX Runtime with dynamic INT8 quantisation (``onnxruntime.quantization
.quantize_dynamic``: int8 weights of the MatMul / Gemm layers, activations quantised on the fly).

Two models: a classifier (``random:small``, LoRA, 224 px) and the lightweight DETR-style detector
(``--lightweight`` on ``random:small``, 224 px here to keep the run short; the preset's own size is
518). Each is trained for one epoch on a few real images first (random weights: speed does not depend
on them). Every variant computes the same thing: the graph module the export writes (model + the
tensor part of the post-processing, each task's ``export.py``) on the same preprocessed batch.

- latency: batch 1, median of ``--repeats`` calls after warm-up;
- throughput: batch 8, images per second from the median of ``--repeats // 2`` calls;
- one variant runs at a time (warm-up first), in three rounds, so a passing load on a shared machine
  hits them alike;
- accuracy beside each variant, on real images (hymenoptera val / coco_tiny val) against PyTorch
  merged: classification top-1 agreement and the largest logit difference; detection the share of
  PyTorch's top-10 detections per image found again (same class, IoU > 0.5) and the largest score
  difference of those.

    DINOTUNE_SHARED=../shared python benchmarks/bench_inference.py [--threads 2] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from _common import machine_info, shared_dataset

HERE = Path(__file__).resolve().parent
VARIANTS = ("pytorch unmerged", "pytorch merged", "onnxruntime fp32", "onnxruntime int8 (dynamic)")


def small_class_folders(data: Path, out: Path, per_class: int) -> Path:
    """``per_class`` training images of each hymenoptera class, linked into ``out/train`` (+ val)."""
    for split in ("train", "val"):
        for folder in sorted((data / split).iterdir()):
            target = out / split / folder.name
            target.mkdir(parents=True, exist_ok=True)
            for image in sorted(folder.glob("*.jpg"))[:per_class]:
                (target / image.name).symlink_to(image.resolve())
    return out


def train_runs(args: argparse.Namespace, tmp: Path) -> dict[str, Path]:
    import dinotune

    common = dict(model="random:small", epochs=1, batch_size=8, workers=0, progress=False, device="cpu",
                  image_size=args.image_size)
    cls_data = small_class_folders(shared_dataset("hymenoptera", args.hymenoptera), tmp / "ants", 8)
    classify = dinotune.train(task="classify", data=str(cls_data), adapter="lora", out=str(tmp / "classify"), **common)
    detect = dinotune.train(task="detect", data=str(shared_dataset("coco_tiny", args.coco)), lightweight=True,
                            subset=8, val_subset=4, out=str(tmp / "detect"), **common)
    return {"classify": Path(classify["run_dir"]), "detect": Path(detect["run_dir"])}


def real_inputs(task: str, info: Any, args: argparse.Namespace) -> list[tuple[np.ndarray, ...]]:
    """The real evaluation images, preprocessed as the runtime does (each a tuple of graph inputs)."""
    from dinotune.runtime.inputs import read_image
    from dinotune.tasks.classify.runtime import classify_input
    from dinotune.tasks.detect.runtime import detect_input

    if task == "classify":
        paths = sorted((shared_dataset("hymenoptera", args.hymenoptera) / "val").rglob("*.jpg"))
        paths = paths[:: max(1, len(paths) // args.images)][: args.images]
        return [(classify_input(read_image(p, info.input, 0), info.image_size, info.input),) for p in paths]
    paths = sorted((shared_dataset("coco_tiny", args.coco) / "val2017").glob("*.jpg"))[: args.images // 2]
    out = []
    for p in paths:
        image = read_image(p, info.input, 0)
        canvas, _ = detect_input(image, info.image_size, info.input)
        out.append((canvas, np.asarray(image.shape[:2], dtype=np.float32)))
    return out


def batch(items: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    return tuple(np.stack(parts) for parts in zip(*items))


def runners(run: Path, folder: Path, threads: int) -> dict[str, Callable[..., list[np.ndarray]]]:
    """Each variant as ``f(*inputs) -> [outputs]`` on numpy arrays."""
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import dinotune
    from dinotune.runtime import ExportInfo

    size = ExportInfo.read(folder).image_size
    graphs = {}
    for name, merge in (("pytorch unmerged", False), ("pytorch merged", True)):
        loaded = dinotune.load(run, device="cpu", merge=merge)
        graphs[name] = loaded.task.export_graph(loaded, loaded.model, size).eval()

    def torch_runner(graph: torch.nn.Module) -> Callable[..., list[np.ndarray]]:
        def run_graph(*inputs: np.ndarray) -> list[np.ndarray]:
            with torch.inference_mode():
                out = graph(*(torch.from_numpy(x) for x in inputs))
            return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]
        return run_graph

    int8 = folder / "model.int8.onnx"
    quantize_dynamic(str(folder / "model.onnx"), str(int8), weight_type=QuantType.QInt8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads

    def ort_runner(path: Path) -> Callable[..., list[np.ndarray]]:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda *inputs: session.run(None, dict(zip(names, inputs)))

    return {"pytorch unmerged": torch_runner(graphs["pytorch unmerged"]),
            "pytorch merged": torch_runner(graphs["pytorch merged"]),
            "onnxruntime fp32": ort_runner(folder / "model.onnx"),
            "onnxruntime int8 (dynamic)": ort_runner(int8)}


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


def bench_task(task: str, run: Path, args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    import dinotune
    from dinotune.runtime import ExportInfo

    t0 = time.perf_counter()
    folder = dinotune.export(run, tmp / f"{task}-onnx")
    export_s = time.perf_counter() - t0
    info = ExportInfo.read(folder)
    items = real_inputs(task, info, args)
    one, eight = batch(items[:1]), batch((items * 8)[:8])
    fns = runners(run, folder, args.threads)
    outputs = {name: [np.concatenate(parts) for parts in zip(*(fn(*batch(items[i: i + 8]))
                                                                for i in range(0, len(items), 8)))]
               for name, fn in fns.items()}
    latency = timed(fns, one, args.repeats)
    per_batch = timed(fns, eight, max(3, args.repeats // 2), warmup=1)
    rows = []
    for name in fns:
        row = {"task": task, "variant": name, "latency_ms": round(1000 * latency[name], 2),
               "throughput_img_s": round(8 / per_batch[name], 2), "images": len(items), "export_s": round(export_s, 1),
               **{k: round(v, 6) for k, v in agreement(task, outputs["pytorch merged"], outputs[name]).items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    merged = next(r for r in rows if r["variant"] == "pytorch merged")
    for r in rows:
        r["latency_ratio"] = round(r["latency_ms"] / merged["latency_ms"], 3)
        r["throughput_ratio"] = round(r["throughput_img_s"] / merged["throughput_img_s"], 3)
    return rows


def write_results(rows: list[dict[str, Any]], args: argparse.Namespace, machine: dict[str, Any]) -> str:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("hymenoptera", "coco", "out")}
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "machine": machine, "rows": rows}, indent=2))
    lines = [f"# Inference speed: PyTorch vs ONNX Runtime ({args.image_size} px, {args.threads} threads, CPU)", "",
             "Same preprocessed batches, same graph module (model + tensor post-processing) for every variant; ratios "
             "are to PyTorch merged (latency: lower is faster; throughput: higher is faster). Accuracy is against "
             "PyTorch merged on real images (hymenoptera val, coco_tiny val). Machine: " + json.dumps(machine), "",
             "| model | variant | batch-1 latency ms | ratio | batch-8 img/s | ratio | accuracy vs PyTorch merged |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        acc = (f"top-1 agreement {r['top1_agreement']:.3f}, max logit diff {r['max_logit_diff']:.2e}"
               if r["task"] == "classify" else
               f"top-10 found {r['top10_found']:.3f}, max score diff {r['max_score_diff']:.2e}")
        model = "classifier (random:small, LoRA)" if r["task"] == "classify" else "lightweight DETR (random:small)"
        lines.append(f"| {model} | {r['variant']} | {r['latency_ms']:.1f} | {r['latency_ratio']:.2f} | "
                     f"{r['throughput_img_s']:.1f} | {r['throughput_ratio']:.2f} | {acc} ({r['images']} images) |")
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hymenoptera", default=None, help="default: $DINOTUNE_SHARED/data/hymenoptera")
    p.add_argument("--coco", default=None, help="default: $DINOTUNE_SHARED/data/coco_tiny")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--threads", type=int, default=0, help="torch and onnxruntime threads (0: the CPU count)")
    p.add_argument("--repeats", type=int, default=20, help="timed batch-1 calls (batch 8: half as many)")
    p.add_argument("--images", type=int, default=48, help="real classification images for the accuracy columns "
                                                           "(detection: half as many)")
    p.add_argument("--out", default=str(HERE / "results" / "inference-cpu"))
    args = p.parse_args()
    import os

    import torch

    args.threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        runs = train_runs(args, tmp)
        for task, run in runs.items():
            rows += bench_task(task, run, args, tmp)
    print(write_results(rows, args, machine_info("cpu")))


if __name__ == "__main__":
    main()
