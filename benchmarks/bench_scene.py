"""Tiled prediction of large scenes (``predict --tile``): peak memory and time against scene size, and
how many small objects tiling finds that resizing the whole scene loses.

**memory** (``--part memory``): a tiny detection run and a tiny segmentation run (``random:tiny``,
trained for one epoch on synthetic shapes: what they predict does not matter here) predict RGB
GeoTIFF scenes of 2048², 8192² and 20480² pixels (EPSG:32633, 10 m pixels, written block by block)
with ``dinotune predict RUN scene.tif --tile 512 --overlap 0.2`` (detection: ``--out preds.geojson``,
segmentation: ``--out labels.tif``), each a fresh ``python -m dinotune`` process (``--threads 1``
by default: comparable on a shared machine). Wall and CPU time of the whole process; peak RSS is the
kernel's high-water mark of that one child (``ru_maxrss`` from ``os.wait4``, read by a small wrapper
process that forks it: a child forked from this large process would inherit its high-water mark),
with VmRSS polled every 0.25 s from ``/proc`` to show how the resident set moves during the run. A
plain ``predict`` of one 512² picture gives the fixed cost (interpreter, torch, the run).

**small-objects** (``--part small-objects``): two DETR-style detectors (``random:tiny``, 224 px)
trained on the first 16 coco_tiny training images only: ``--overfit 16`` (no augmentation) and the
same images with the default augmentation (``--coco-augment-epochs 0`` leaves it out). Quality does
not matter: each finds the objects of those images, and is compared with itself. Reference:
per-image prediction of the 16 images (boxes scoring >= ``--score``). The images are laid on a 4 x 4
grid (each at its own size, top-left in a cell of the largest side), so every object becomes small
relative to the scene. The mosaic is predicted resized whole (a PNG, plain ``predict``) and tiled
(a GeoTIFF, ``--tile`` = the run's image size and = the cell side, overlap 0.2 and 0, nms and union
merge). Recall = the fraction of reference boxes, moved into mosaic pixels, matched by a mosaic
detection of the same class with IoU >= 0.5 (greedy by score, each detection matching at most one
reference box), also split into the images some tile frames exactly and the others; recall against
the COCO ground truth beside it.

    python benchmarks/bench_scene.py --part memory                      # ~7 min on 2 quiet cores
    DINOTUNE_SHARED=../shared python benchmarks/bench_scene.py --part small-objects   # ~10 min
    DINOTUNE_SHARED=../shared python benchmarks/bench_scene.py          # both: results/scene-cpu.{json,md}
    python benchmarks/bench_scene.py --render                           # the .md again from the .json

``--work DIR`` keeps the trained runs (and, with ``--keep``, the scenes) for a later call to reuse.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from _common import machine_info, shared_dataset

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

BLOCK = 512  # GeoTIFF block side of the generated scenes
SMALL = 512  # side of the picture whose plain prediction gives the fixed cost
SMALL_OBJECT_IMAGES = 16
DETR = dict(hidden_dim=128, num_heads=4, ffn_dim=256, decoder_layers=3, num_queries=50, sampling_points=4)


# ----------------------------------------------------------------------------------- measuring
# A fresh interpreter that runs the command and reports its rusage: a child forked from this (large)
# process would inherit its high-water mark (Linux keeps the pre-exec mm's peak in ru_maxrss).
WRAPPER = """import json, os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, ru = os.wait4(pid, 0)
json.dump({"code": os.waitstatus_to_exitcode(status), "maxrss_kb": ru.ru_maxrss, "user": ru.ru_utime,
           "sys": ru.ru_stime}, open(sys.argv[1], "w"))
"""


def measure(argv: list[str], log: Path, env: dict[str, str] | None = None, poll: float = 0.25) -> dict[str, Any]:
    """Wall seconds, CPU seconds and peak RSS of ``python -m dinotune ARGV`` in its own process:
    ``peak_rss_mb`` is the kernel's ``ru_maxrss`` of that child, read with ``os.wait4`` by a small
    wrapper process that forked it; ``polled_*`` the VmRSS seen every ``poll`` seconds (MB, the
    shape of the curve). Output goes to ``log``; a failure exits with its tail."""
    samples: list[tuple[float, float]] = []
    usage_file = log.with_suffix(".rusage.json")
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", WRAPPER, str(usage_file), sys.executable, "-m", "dinotune",
                                 *argv], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        done = threading.Event()

        def sample() -> None:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            while not done.is_set():
                try:
                    for pid in children.read_text().split():
                        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                            if line.startswith("VmRSS:"):
                                samples.append((time.perf_counter() - t0, int(line.split()[1]) * 1024 / 1e6))
                except (OSError, ValueError, IndexError):
                    pass
                done.wait(poll)

        poller = threading.Thread(target=sample, daemon=True)
        poller.start()
        proc.wait()
        seconds = time.perf_counter() - t0
        done.set()
        poller.join()
    usage = json.loads(usage_file.read_text()) if usage_file.is_file() else {"code": proc.returncode}
    if proc.returncode != 0 or usage["code"] != 0:
        sys.exit(f"dinotune {' '.join(argv)} failed ({usage['code']}):\n" + log.read_text()[-3000:])
    rss = [mb for _, mb in samples]
    return {"seconds": round(seconds, 2), "cpu_s": round(usage["user"] + usage["sys"], 2),
            "peak_rss_mb": round(usage["maxrss_kb"] * 1024 / 1e6, 1),
            "polled_max_mb": round(max(rss), 1) if rss else None,
            # the resident set at a quarter, half and three quarters of the run: flat, or growing?
            "polled_at_quarters_mb": [round(_at(samples, seconds * q), 1) for q in (0.25, 0.5, 0.75)] if rss else None}


def _at(samples: list[tuple[float, float]], t: float) -> float:
    return min(samples, key=lambda s: abs(s[0] - t))[1]


def beside() -> dict[str, Any]:
    """What else ran on the machine: the load average and the busiest other processes."""
    mine = {os.getpid(), os.getppid()}
    try:
        out = subprocess.run(["ps", "-eo", "pid,ppid,pcpu,rss,args", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[1:]
    except (OSError, subprocess.SubprocessError):
        out = []
    procs = []
    for line in out:
        pid, ppid, cpu, rss, args = line.split(None, 4)
        if int(pid) in mine or int(ppid) in mine or float(cpu) < 10:
            continue
        procs.append({"cpu_percent": float(cpu), "rss_mb": round(int(rss) / 1000), "command": args[:160]})
    return {"loadavg": list(os.getloadavg()), "processes": procs[:6]}


# ------------------------------------------------------------------------------------- runs
def tiny_run(task: str, work: Path, image_size: int) -> Path:
    """A ``random:tiny`` run of ``task`` trained one epoch on synthetic shapes (reused when ``work``
    already holds it)."""
    import _synthetic
    import dinotune

    run = work / f"run-{task}-{image_size}"
    if (run / "best_metrics.json").is_file():
        return run
    shutil.rmtree(run, ignore_errors=True)
    data = work / f"data-{task}"
    shutil.rmtree(data, ignore_errors=True)
    make = _synthetic.coco_folders if task == "detect" else _synthetic.mask_folders
    make(data, 8, image_size)
    dinotune.train(task=task, data=str(data), out=str(run), model="random:tiny", image_size=image_size, epochs=1,
                   batch_size=4, adapter="full", workers=0, progress=False, device="cpu", report_to="none")
    return run


def write_scene(path: Path, side: int) -> Path:
    """An RGB uint8 GeoTIFF ``side`` x ``side`` (EPSG:32633, 10 m pixels, 512² deflate blocks,
    BigTIFF when needed), written block by block: smooth gradients, a ripple and a few bright
    squares per block (cheap, not constant, and compressible)."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    if path.is_file():
        return path
    tmp = path.with_suffix(".part.tif")
    profile = dict(driver="GTiff", width=side, height=side, count=3, dtype="uint8", crs="EPSG:32633",
                   transform=from_origin(400_000, 6_000_000, 10, 10), tiled=True, blockxsize=BLOCK, blockysize=BLOCK,
                   compress="deflate", BIGTIFF="IF_SAFER")
    with rasterio.open(tmp, "w", **profile) as ds:
        for r in range(0, side, BLOCK):
            for c in range(0, side, BLOCK):
                h, w = min(BLOCK, side - r), min(BLOCK, side - c)
                ds.write(scene_block(r, c, h, w, side), window=Window(c, r, w, h))
    tmp.rename(path)
    return path


def scene_block(r: int, c: int, h: int, w: int, side: int) -> np.ndarray:
    y, x = np.mgrid[r: r + h, c: c + w].astype(np.float32)
    block = np.stack([x * (255.0 / side), y * (255.0 / side),
                      128 + 60 * np.sin(x / 97.0) * np.cos(y / 131.0)]).astype(np.uint8)
    rng = np.random.default_rng(r * 1_000_003 + c)
    for _ in range(3):
        s = int(rng.integers(8, 64))
        if s < h and s < w:
            y0, x0 = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
            block[:, y0: y0 + s, x0: x0 + s] = rng.integers(200, 256, (3, 1, 1))
    return block


def small_picture(path: Path) -> Path:
    from PIL import Image

    if not path.is_file():
        Image.fromarray(scene_block(0, 0, SMALL, SMALL, SMALL).transpose(1, 2, 0)).save(path)
    return path


def run_config(run: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())


# ----------------------------------------------------------------------------------- part a
def memory_part(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from dinotune.geo.tiles import tile_windows

    runs = {task: tiny_run(task, work, args.image_size) for task in ("detect", "segment")}
    outputs = {"detect": "preds.geojson", "segment": "labels.tif"}
    common = ["--device", "cpu", "--threads", str(args.threads)]
    small = small_picture(work / "small.png")
    baseline = {}
    for task, run in runs.items():
        out = work / f"baseline-{task}.json"
        baseline[task] = measure(["predict", str(run), str(small), "--out", str(out), *common],
                                 work / f"baseline-{task}.log")
        print(f"baseline {task}: {baseline[task]}", flush=True)
    rows = []
    for side in args.sizes:
        t0 = time.perf_counter()
        scene = write_scene(work / f"scene-{side}.tif", side)
        write_s = time.perf_counter() - t0
        print(f"scene {side}^2 written in {write_s:.1f} s ({scene.stat().st_size / 1e6:.1f} MB on disk)", flush=True)
        tiles = len(tile_windows(side, side, args.tile, args.overlap))
        for task, run in runs.items():
            out = work / f"{side}-{outputs[task]}"
            argv = ["predict", str(run), str(scene), "--tile", str(args.tile), "--overlap", str(args.overlap),
                    "--out", str(out), *common]
            load = beside()
            m = measure(argv, work / f"{side}-{task}.log")
            extra = {}
            if task == "detect":
                props = json.loads(out.read_text()).get("properties", {}).get("tiling", {})
                extra = {"found": props.get("found"), "merged": props.get("merged")}
                assert props.get("tiles") == tiles, (props, tiles)
            mp = side * side / 1e6
            net_cpu = m["cpu_s"] - baseline[task]["cpu_s"]  # CPU seconds the scene adds to the fixed cost
            row = {"task": task, "side": side, "megapixels": round(mp, 2), "tiles": tiles, **m,
                   "s_per_mp": round(m["seconds"] / mp, 3), "tiles_per_s": round(tiles / m["seconds"], 2),
                   "net_cpu_s": round(net_cpu, 2), "net_cpu_s_per_mp": round(net_cpu / mp, 3),
                   "tiles_per_cpu_s": round(tiles / net_cpu, 2) if net_cpu > 0 else None,
                   "rss_above_baseline_mb": round(m["peak_rss_mb"] - baseline[task]["peak_rss_mb"], 1),
                   "scene_file_mb": round(scene.stat().st_size / 1e6, 1), "output_mb": round(out.stat().st_size / 1e6, 2),
                   "beside": load, **extra}
            rows.append(row)
            print(f"{task:7s} {side:5d}^2 {tiles:5d} tiles {m['seconds']:8.1f} s  peak RSS {m['peak_rss_mb']:7.1f} MB "
                  f"(polled {m['polled_at_quarters_mb']})  load {load['loadavg'][0]:.2f}", flush=True)
            out.unlink(missing_ok=True)
        if not args.keep and side > 2048:
            scene.unlink()
    for task in runs:
        first = next((r for r in rows if r["task"] == task), None)
        for r in rows:
            if r["task"] == task and first:
                r["area_ratio"] = round(r["megapixels"] / first["megapixels"], 2)
                r["time_ratio"] = round(r["seconds"] / first["seconds"], 2)
                r["rss_ratio"] = round(r["peak_rss_mb"] / first["peak_rss_mb"], 3)
        mine = [r for r in rows if r["task"] == task]
        for a, b in zip(mine, mine[1:]):  # the slope between sizes: equal slopes = time linear in area
            b["marginal_cpu_s_per_mp"] = round((b["cpu_s"] - a["cpu_s"]) / (b["megapixels"] - a["megapixels"]), 4)
            b["marginal_s_per_mp"] = round((b["seconds"] - a["seconds"]) / (b["megapixels"] - a["megapixels"]), 4)
    settings = {"tile": args.tile, "overlap": args.overlap, "image_size": args.image_size, "threads": args.threads,
                "model": "random:tiny", "runs": {task: _run_summary(run) for task, run in runs.items()},
                "scene": f"RGB uint8 GeoTIFF, EPSG:32633, 10 m pixels, {BLOCK}x{BLOCK} deflate blocks, BIGTIFF=IF_SAFER",
                "rss": "ru_maxrss of the child from os.wait4 (kernel high-water mark, one process); "
                       "VmRSS polled every 0.25 s for the quarters", "megabyte": "10^6 bytes"}
    return {"settings": settings, "baseline": baseline, "rows": rows}


def _run_summary(run: Path) -> dict[str, Any]:
    cfg = run_config(run)
    model, infer = cfg.get("model", {}), cfg.get("inference", {})
    keep = ("head", "decoder", "num_queries", "decoder_layers", "hidden_dim", "fpn_dim")
    if model.get("decoder") != "fpn":
        keep = tuple(k for k in keep if k != "fpn_dim")
    return {"image_size": cfg["backbone"]["image_size"], **{k: model[k] for k in keep if k in model},
            "batch_size": infer.get("batch_size"), "window_batch": infer.get("window_batch"),
            "top_k": infer.get("top_k")}


# ----------------------------------------------------------------------------------- part b
def coco_run(work: Path, data: Path, args: argparse.Namespace, kind: str, ids: list[int]) -> dict[str, Any]:
    """The small-objects run of ``kind`` (trained once, reused from ``work``): ``overfit`` = ``--overfit
    16`` (the first 16 training images, no augmentation, evaluated on themselves); ``augment`` = the same
    16 images (``--subset-file``) with the default augmentation (flip, zoom-out, crops)."""
    import dinotune

    epochs = args.coco_epochs if kind == "overfit" else args.coco_augment_epochs
    run = work / f"coco-{kind}{SMALL_OBJECT_IMAGES}-{args.coco_size}-{epochs}"
    timing = run / "bench_train_seconds.json"
    if not (run / "best_metrics.json").is_file():
        shutil.rmtree(run, ignore_errors=True)
        extra: dict[str, Any]
        if kind == "overfit":
            extra = dict(overfit=SMALL_OBJECT_IMAGES, eval_every=max(1, epochs // 3))
        else:
            subset = work / f"subset{SMALL_OBJECT_IMAGES}.json"
            subset.write_text(json.dumps({"image_ids": ids}))
            extra = dict(subset_file=str(subset), eval_every=epochs)
        t0 = time.perf_counter()
        dinotune.train(task="detect", data=str(data), out=str(run), model="random:tiny", adapter="full",
                       image_size=args.coco_size, epochs=epochs, batch_size=8, workers=0, progress=False,
                       device="cpu", lr=5e-4, backbone_lr=2e-4, warmup_epochs=10, report_to="none", **DETR, **extra)
        timing.write_text(json.dumps({"seconds": round(time.perf_counter() - t0, 1)}))
    seconds = json.loads(timing.read_text())["seconds"] if timing.is_file() else None
    metrics = json.loads((run / "best_metrics.json").read_text())
    return {"kind": kind, "path": run, "epochs": epochs, "train_seconds": seconds,
            "summary": _run_summary(run), "val_metrics": {k: metrics.get(k) for k in ("AP", "AP50")}}


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of ``xyxy`` boxes ``a`` (n x 4) against ``b`` (m x 4)."""
    if not len(a) or not len(b):
        return np.zeros((len(a), len(b)))
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def recall(refs: list[dict], preds: list[dict], iou: float = 0.5) -> dict[str, Any]:
    """Greedy matching by score: each prediction (best first) takes the unmatched reference box of its
    class it overlaps most, if IoU >= ``iou``. ``refs`` / ``preds``: ``{"box": xyxy, "cls", "score"}``."""
    taken = np.zeros(len(refs), bool)
    ref_boxes = np.array([r["box"] for r in refs], np.float64).reshape(-1, 4)
    ref_cls = np.array([r["cls"] for r in refs])
    matched = 0
    for p in sorted(preds, key=lambda d: -d["score"]):
        if not len(refs):
            break
        ious = iou_matrix(np.array([p["box"]], np.float64), ref_boxes)[0]
        ious[(ref_cls != p["cls"]) | taken] = -1
        j = int(ious.argmax())
        if ious[j] >= iou:
            taken[j] = True
            matched += 1
    return {"references": len(refs), "detections": len(preds), "matched": matched,
            "recall": round(matched / len(refs), 4) if refs else None,
            "unmatched_detections": len(preds) - matched}


def _boxes(record: dict, dx: float = 0.0, dy: float = 0.0, min_score: float = 0.0) -> list[dict]:
    out = []
    for d in record["detections"]:
        if d["score"] >= min_score:
            x, y, w, h = d["bbox"]
            out.append({"box": [x + dx, y + dy, x + dx + w, y + dy + h], "cls": d["category"], "score": d["score"]})
    return out


def small_objects_part(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import rasterio
    from PIL import Image
    from rasterio.transform import from_origin

    from dinotune.tasks.detect.data import find_detection_data

    data = shared_dataset("coco_tiny", args.data)
    source = find_detection_data(str(data), "train", min_box_size=1.0)  # the detect config's default
    chosen = source.images[:SMALL_OBJECT_IMAGES]  # what --overfit trains on
    names = {c["id"]: c["name"] for c in source.categories}
    cols = math.ceil(math.sqrt(len(chosen)))
    rows_n = math.ceil(len(chosen) / cols)
    cell = max(max(im.width, im.height) for im in chosen)
    mosaic = np.zeros((rows_n * cell, cols * cell, 3), np.uint8)
    offsets, truth = {}, []
    for i, im in enumerate(chosen):
        dy, dx = (i // cols) * cell, (i % cols) * cell
        pixels = np.asarray(Image.open(im.path).convert("RGB"))
        mosaic[dy: dy + pixels.shape[0], dx: dx + pixels.shape[1]] = pixels
        offsets[im.path.resolve()] = (dx, dy)
        truth += [{"box": [a.bbox[0] + dx, a.bbox[1] + dy, a.bbox[2] + dx, a.bbox[3] + dy],
                   "cls": names[a.category_id], "score": 1.0} for a in source.annotations.get(im.id, [])
                  if not a.iscrowd]
    png, tif = work / "mosaic.png", work / "mosaic.tif"
    Image.fromarray(mosaic).save(png)
    with rasterio.open(tif, "w", driver="GTiff", width=mosaic.shape[1], height=mosaic.shape[0], count=3,
                       dtype="uint8", crs="EPSG:32633", transform=from_origin(400_000, 6_000_000, 10, 10), tiled=True,
                       blockxsize=BLOCK, blockysize=BLOCK, compress="deflate") as ds:
        ds.write(mosaic.transpose(2, 0, 1))
    print(f"mosaic {mosaic.shape[1]} x {mosaic.shape[0]} ({cols} x {rows_n} cells of {cell} px), "
          f"{len(truth)} ground-truth boxes", flush=True)
    kinds = ["overfit"] + (["augment"] if args.coco_augment_epochs > 0 else [])
    runs = [small_objects_run(coco_run(work, data, args, kind, [im.id for im in chosen]), chosen, offsets, truth,
                              png, tif, mosaic.shape[:2], args) for kind in kinds]
    return {"settings": {"images": [im.path.name for im in chosen], "grid": [cols, rows_n], "cell": cell,
                         "mosaic": [mosaic.shape[1], mosaic.shape[0]], "score_threshold": args.score,
                         "top_k": args.top_k, "iou": 0.5},
            "ground_truth_boxes": len(truth), "runs": runs}


def small_objects_run(run: dict[str, Any], chosen: list, offsets: dict, truth: list[dict], png: Path, tif: Path,
                      shape: tuple[int, int], args: argparse.Namespace) -> dict[str, Any]:
    """One run's per-image reference and its recall on the mosaic, resized whole and tiled."""
    import dinotune
    from dinotune.geo.tiles import tile_windows

    loaded = dinotune.load(run["path"], device="cpu")
    size = run["summary"]["image_size"]
    options = dict(top_k=args.top_k, score_threshold=args.score, draw_threshold=args.score)
    refs = []
    for record in loaded.predict([str(im.path) for im in chosen], **options):
        dx, dy = offsets[Path(record["image"]).resolve()]
        refs += [dict(b, cell=(dx, dy)) for b in _boxes(record, dx, dy, args.score)]
    side, cell = max(shape), max(max(im.width, im.height) for im in chosen)
    variants = [{"name": "per-image (reference)", "mode": "per-image", "preds": refs, "seconds": None}]
    t0 = time.perf_counter()
    whole = loaded.predict(str(png), **options)[0]
    variants.append({"name": f"resized whole ({side} px -> {size} px)", "mode": "resized",
                     "preds": _boxes(whole, min_score=args.score), "seconds": time.perf_counter() - t0})
    for tile in dict.fromkeys([size, cell]):
        for overlap, merge in ((0.2, "nms"), (0.0, "nms"), (0.2, "union")):
            t0 = time.perf_counter()
            record = loaded.predict(str(tif), tile=str(tile), overlap=overlap, merge=merge, **options)[0]
            label = "the run's image size" if tile == size else "the cell side"
            windows = tile_windows(shape[0], shape[1], tile, overlap)
            # cells some tile frames exactly as the image was framed alone (its origin, the cell's side)
            framed = {(w.col, w.row) for w in windows} if tile == cell else set()
            variants.append({"name": f"tiled {tile} px ({label}), overlap {overlap:g}, {merge}", "mode": "tiled",
                             "tile": tile, "overlap": overlap, "merge": merge, "tiles": len(windows),
                             "framed": framed,
                             "preds": _boxes(record, min_score=args.score), "seconds": time.perf_counter() - t0,
                             "tiling": record.get("tiling")})
    rows = []
    for v in variants:
        vs_ref, vs_gt = recall(refs, v["preds"]), recall(truth, v["preds"])
        framed = v.pop("framed", set())
        split = {}
        if v["mode"] == "tiled":  # recall of the images some tile frames exactly, and of the others
            split = {"framed_images": len({r["cell"] for r in refs} & framed),
                     "recall_framed": recall([r for r in refs if r["cell"] in framed], v["preds"])["recall"],
                     "recall_not_framed": recall([r for r in refs if r["cell"] not in framed], v["preds"])["recall"]}
        rows.append({k: v[k] for k in v if k != "preds"} | split | {
            "seconds": round(v["seconds"], 2) if v["seconds"] is not None else None,
            "vs_reference": vs_ref, "vs_ground_truth": vs_gt})
        print(f"{run['kind']:8s} {v['name']:58s} recall vs per-image {vs_ref['recall']}  vs GT {vs_gt['recall']}  "
              f"({vs_ref['detections']} detections)", flush=True)
    scores = [b["score"] for b in refs]
    return {"kind": run["kind"], "run": {k: v for k, v in run.items() if k != "path"}, "reference_boxes": len(refs),
            "reference_score_median": round(float(np.median(scores)), 3) if scores else None, "rows": rows}


# ------------------------------------------------------------------------------------ report
def markdown(summary: dict[str, Any]) -> str:
    m = summary["machine"]
    lines = ["# Tiled prediction of large scenes (CPU)", "",
             f"Machine: {m.get('cpu_model')}, {os.cpu_count()} cores, {m['platform']}, torch {m['torch']}, "
             f"device {m['device']}.", ""]
    mem = summary.get("memory")
    if mem:
        s = mem["settings"]
        lines += ["## Peak memory and time against scene size", "",
                  f"`{mem['command']}` ({_code(mem)})", "",
                  f"`dinotune predict RUN scene.tif --tile {s['tile']} --overlap {s['overlap']} --device cpu "
                  f"--threads {s['threads']}`, each a fresh process; detection `--out preds.geojson`, segmentation "
                  f"`--out labels.tif`. Runs: `random:tiny` trained one epoch at {s['image_size']} px on synthetic "
                  f"shapes (detection: {_describe_run(s['runs']['detect'])}; segmentation: "
                  f"{_describe_run(s['runs']['segment'])}). Scenes: {s['scene']}, written block by block. "
                  f"Peak RSS: {s['rss']}; MB = 10^6 bytes. Seconds: wall clock of the whole process (start-up "
                  "included). CPU s: user + system time of the process, which other jobs on a shared machine move "
                  "far less than wall time; net CPU s = that minus the baseline process's (what the scene adds, "
                  "plus the geo libraries a plain predict does not load); marginal CPU s / MP = the CPU time added "
                  "from the previous size to this one, per added megapixel (equal along the rows: time linear in "
                  "area).", "",
                  "Baseline (the fixed cost: interpreter, torch, the run; plain `predict` of one "
                  f"{SMALL}x{SMALL} picture):", "",
                  "| task | seconds | CPU s | peak RSS MB |", "|---|---|---|---|"]
        lines += [f"| {t} | {b['seconds']} | {b['cpu_s']} | {b['peak_rss_mb']} |" for t, b in mem["baseline"].items()]
        lines += ["", "| task | scene | megapixels | tiles | seconds | s / MP | tiles / s | CPU s | net CPU s / MP | "
                  "tiles / net CPU s | peak RSS MB | above baseline MB | RSS at 1/4, 1/2, 3/4 of the run MB | "
                  "area ratio | time ratio | RSS ratio | marginal CPU s / MP | load avg |",
                  "|" + "---|" * 18]
        for r in mem["rows"]:
            lines.append(f"| {r['task']} | {r['side']}² | {r['megapixels']} | {r['tiles']} | {r['seconds']} | "
                         f"{r['s_per_mp']} | {r['tiles_per_s']} | {r['cpu_s']} | {r['net_cpu_s_per_mp']} | "
                         f"{r['tiles_per_cpu_s']} | {r['peak_rss_mb']} | {r['rss_above_baseline_mb']} | "
                         f"{', '.join(str(v) for v in r['polled_at_quarters_mb'] or [])} | {r.get('area_ratio')} | "
                         f"{r.get('time_ratio')} | {r.get('rss_ratio')} | {r.get('marginal_cpu_s_per_mp', '-')} | "
                         f"{r['beside']['loadavg'][0]:.2f} |")
        lines += ["", "Detection: boxes found in all tiles / after merging: " + "; ".join(
            f"{r['side']}²: {r['found']} / {r['merged']}" for r in mem["rows"] if r["task"] == "detect") + "."]
    small = summary.get("small_objects")
    if small and "runs" in small:
        s = small["settings"]
        lines += ["", "## Small objects: a mosaic of coco_tiny images", "", f"`{small['command']}` ({_code(small)})", "",
                  f"Mosaic: the first {len(s['images'])} coco_tiny training images on a {s['grid'][0]} x "
                  f"{s['grid'][1]} grid of {s['cell']} px cells ({s['mosaic'][0]} x {s['mosaic'][1]} px; each image "
                  "at its own size, top-left in its cell, black around), as a GeoTIFF (tiled prediction) and a PNG "
                  f"(resized whole). Every prediction keeps the boxes scoring >= {s['score_threshold']} "
                  f"(top-k {s['top_k']}). Reference: each run's per-image predictions of the same images, moved into "
                  f"mosaic pixels. Recall: reference boxes matched by a detection of the same class with IoU >= "
                  f"{s['iou']} (greedy by score, one reference per detection); beside it the same against the "
                  f"{small['ground_truth_boxes']} non-crowd ground-truth boxes. Both runs are `random:tiny` DETR-style "
                  "detectors trained on those 16 images only (batch 8, full FT, lr 5e-4): they know these images, "
                  "which is all a recall-against-per-image comparison needs. An image is *framed* by a tile when a "
                  "tile starts at its cell's corner with the cell's side: that tile shows the model what per-image "
                  "prediction showed it, black padding aside.", ""]
        for r in small["runs"]:
            run = r["run"]
            what = ("`--overfit 16` (no augmentation, evaluated on the same images: AP50 "
                    f"{_metric(run['val_metrics'], 'AP50')}, AP {_metric(run['val_metrics'], 'AP')})"
                    if r["kind"] == "overfit" else
                    "`--subset-file` of the same 16 images with the default augmentation (flip, zoom-out, "
                    "crops keeping boxes)")
            lines += [f"**{r['kind']}** run: {what}; {_describe_run(run['summary'])}; {run['epochs']} epochs, "
                      f"{run['train_seconds']} s. Reference: {r['reference_boxes']} boxes (median score "
                      f"{r['reference_score_median']}).", "",
                      "| prediction | tiles | detections | recall vs per-image | matched | images framed by a tile: "
                      "recall | other images: recall | recall vs ground truth | seconds |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for row in r["rows"]:
                ref, gt = row["vs_reference"], row["vs_ground_truth"]
                framed = (f"{row['framed_images']}: {row['recall_framed']}" if row.get("framed_images") else
                          "0" if row["mode"] == "tiled" else "-")
                lines.append(f"| {row['name']} | {row.get('tiles', '-')} | {ref['detections']} | {ref['recall']} | "
                             f"{ref['matched']} / {ref['references']} | {framed} | {row.get('recall_not_framed', '-')} "
                             f"| {gt['recall']} | {row['seconds'] or '-'} |".replace("| None |", "| - |"))
            lines.append("")
    lines += ["", "## Beside it", ""]
    for title, key in (("Memory part", "memory"), ("Small-objects part", "small_objects")):
        part = summary.get(key)
        if not part or "beside" not in part:
            continue
        seen = [part["beside"]["start"], *(r["beside"] for r in part.get("rows", []) if "beside" in r),
                part["beside"]["end"]]
        loads = [b["loadavg"][0] for b in seen]
        procs = sorted({p["command"][:90] for b in seen for p in b["processes"]})
        lines.append(f"- {title}: 1-minute load average {min(loads):.2f}-{max(loads):.2f} at the start, before each "
                     "measurement and at the end (2 cores; the benchmark's own process counts 1); other processes "
                     "above 10 % CPU at those moments: " + ("; ".join(f"`{c}`" for c in procs) or "none") + ".")
    if summary.get("note"):
        lines.append(f"- {summary['note']}")
    lines += ["", "## What this shows", "", what_this_shows(summary)]
    if summary.get("comment"):  # findings added by hand to the JSON's "comment" (kept across reruns)
        lines += ["", summary["comment"]]
    return "\n".join(lines).rstrip() + "\n"


def what_this_shows(summary: dict[str, Any]) -> str:
    """The measured ratios in words."""
    parts = []
    mem = summary.get("memory")
    for task in ("detect", "segment"):
        rows = [r for r in (mem or {}).get("rows", []) if r["task"] == task]
        if len(rows) < 2:
            continue
        a, b = rows[0], rows[-1]
        slopes = " -> ".join(str(r["marginal_cpu_s_per_mp"]) for r in rows[1:])
        parts.append(f"{task}: from {a['side']}² to {b['side']}² the area grows {b['area_ratio']}x, the wall time "
                     f"{b['time_ratio']}x ({a['s_per_mp']} -> {b['s_per_mp']} s per megapixel: the ~"
                     f"{mem['baseline'][task]['seconds']:.0f} s start-up weighs less as scenes grow); the CPU time "
                     f"added per added megapixel is {slopes} s from one size to the next; peak RSS "
                     f"grows {b['rss_ratio']}x ({a['peak_rss_mb']} -> {b['peak_rss_mb']} MB, "
                     f"{a['rss_above_baseline_mb']} -> {b['rss_above_baseline_mb']} MB above the "
                     f"{mem['baseline'][task]['peak_rss_mb']} MB of the one-picture process).")
        if len(rows) > 2:  # the two largest: start-up noise is small beside what they add
            c = rows[-2]
            parts.append(f"Between {c['side']}² and {b['side']}² (area x{b['megapixels'] / c['megapixels']:.2f}): "
                         f"wall time x{b['seconds'] / c['seconds']:.2f}, CPU time x{b['cpu_s'] / c['cpu_s']:.2f}, "
                         f"peak RSS x{b['peak_rss_mb'] / c['peak_rss_mb']:.3f}.")
    if mem and mem.get("rows"):
        side = max(r["side"] for r in mem["rows"])
        peaks = {r["task"]: r["peak_rss_mb"] for r in mem["rows"] if r["side"] == side}
        verdict = "under" if max(peaks.values()) < 1500 else "above"
        parts.append(f"The {side}² scene peaks at " + ", ".join(f"{v} MB ({t})" for t, v in peaks.items())
                     + f": {verdict} 1500 MB.")
    small = summary.get("small_objects")
    runs = (small or {}).get("runs", [])
    if runs:
        def pick(run: dict, mode: str, tile: str = "", overlap: float = 0.0) -> dict:
            return next(r for r in run["rows"] if r["mode"] == mode and (
                mode != "tiled" or (r["tile"] == run["run"]["summary"]["image_size"]) == (tile == "size")
                and r["overlap"] == overlap and r["merge"] == "nms"))

        def each(key: Any) -> str:
            return " / ".join(str(key(r)) for r in runs)

        names = " / ".join(r["kind"] for r in runs)
        parts.append(
            f"Small objects (runs {names}), recall of the per-image boxes: resized whole "
            f"{each(lambda r: pick(r, 'resized')['vs_reference']['recall'])}; tiled at the cell side, overlap 0 "
            f"{each(lambda r: pick(r, 'tiled', 'cell', 0.0)['vs_reference']['recall'])}, overlap 0.2 "
            f"{each(lambda r: pick(r, 'tiled', 'cell', 0.2)['vs_reference']['recall'])} (images a tile frames "
            f"exactly {each(lambda r: pick(r, 'tiled', 'cell', 0.2)['recall_framed'])}, the others "
            f"{each(lambda r: pick(r, 'tiled', 'cell', 0.2)['recall_not_framed'])}); tiled at the run's image size, "
            f"overlap 0.2 {each(lambda r: pick(r, 'tiled', 'size', 0.2)['vs_reference']['recall'])}.")
    return " ".join(parts)


def _code(part: dict[str, Any]) -> str:
    git = part.get("git") or {}
    return f"commit {git.get('commit', '?')}" + (", library changes not committed" if git.get("library_changes") else "")


def _describe_run(run: dict[str, Any]) -> str:
    parts = [f"{run['image_size']} px"]
    for key in ("head", "decoder", "num_queries", "decoder_layers", "hidden_dim", "fpn_dim", "batch_size",
                "window_batch", "top_k"):
        if run.get(key) is not None:
            parts.append(f"{key} {run[key]}")
    return ", ".join(parts)


def _metric(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key, metrics.get("metrics", {}).get(key) if isinstance(metrics.get("metrics"), dict) else None)
    return f"{value:.3f}" if isinstance(value, (int, float)) else "?"


def git_state() -> dict[str, Any]:
    """The commit measured, and whether the library had uncommitted changes."""
    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "--short", "HEAD"), "library_changes": bool(git("status", "--short", "dinotune"))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--part", choices=("memory", "small-objects", "all"), default="all")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 8192, 20480], help="scene sides (pixels)")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=float, default=0.2)
    p.add_argument("--image-size", type=int, default=112, help="training size of the tiny runs (memory part)")
    p.add_argument("--threads", type=int, default=1,
                   help="--threads of each predict (1: comparable on a shared machine; 0: dinotune's auto)")
    p.add_argument("--data", help="coco_tiny folder (default: $DINOTUNE_SHARED/data/coco_tiny)")
    p.add_argument("--coco-size", type=int, default=224, help="image size of the small-objects run")
    p.add_argument("--coco-epochs", type=int, default=150, help="epochs of the --overfit 16 run (2 steps each)")
    p.add_argument("--coco-augment-epochs", type=int, default=300,
                   help="epochs of the augmented run on the same 16 images (0: leave it out)")
    p.add_argument("--score", type=float, default=0.3, help="score threshold of every box counted")
    p.add_argument("--top-k", type=int, default=1000)
    p.add_argument("--work", help="scratch folder (runs, scenes; reused when given; default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the generated scenes larger than 2048²")
    p.add_argument("--note", default="", help="what ran beside the benchmark, for the report")
    p.add_argument("--render", action="store_true", help="only rewrite the .md from the existing .json")
    args = p.parse_args()
    out = Path(args.out_dir) / "scene-cpu"
    if args.render:
        out.with_suffix(".md").write_text(markdown(json.loads(out.with_suffix(".json").read_text())))
        return 0
    if args.part in ("small-objects", "all"):
        shared_dataset("coco_tiny", args.data)  # fail early, before the long part
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    summary["machine"] = machine_info("cpu")
    argv = sys.argv[1:]
    for flag in ("--work", "--out-dir"):  # scratch and output paths of this machine, not part of the recipe
        if flag in argv and argv.index(flag) + 1 < len(argv):
            argv[argv.index(flag) + 1] = "DIR"
    command = "python benchmarks/bench_scene.py " + " ".join(argv)
    temp = None if args.work else tempfile.TemporaryDirectory(prefix="bench-scene-")
    work = Path(args.work or temp.name)
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.part in ("memory", "all"):
            start = beside()
            summary["memory"] = memory_part(args, work) | {"command": command, "git": git_state(),
                                                           "beside": {"start": start, "end": beside()}}
        if args.part in ("small-objects", "all"):
            start = beside()
            summary["small_objects"] = small_objects_part(args, work) | {
                "command": command, "git": git_state(), "beside": {"start": start, "end": beside()}}
    finally:
        if temp is not None:
            temp.cleanup()
        elif not args.keep:
            for scene in work.glob("scene-*.tif"):
                if scene.name != "scene-2048.tif":
                    scene.unlink()
    if args.note:
        summary["note"] = args.note
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
