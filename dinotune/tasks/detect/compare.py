"""``dinotune compare``: several detectors, the same images, the same metric code, one table.

Every detector turns image paths into detections in original pixels with the dataset's own
category ids; nothing else is detector-specific. Each is then scored by ``detection_metrics``
(the COCO AP suite and the single-object metrics, as in training-time evaluation), so a DETR
run, a single-object run and a YOLO model are judged identically. Runs arrive loaded
(``dinotune.api.compare`` loads them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import torch

from dinotune.ops import box_ops
from dinotune.tasks.base import TrainedRun
from dinotune.tasks.detect.coco import DetectionSource
from dinotune.tasks.detect.data import choose_subset, find_detection_data, restrict, scan_source
from dinotune.tasks.detect.evaluation import detection_metrics
from dinotune.utils import info, warn, write_json

SHOWN = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "accuracy", "f1", "mean_iou", "map50"]


@dataclass
class Detections:
    """One image's detections: ``boxes`` ``N x 4`` xyxy original pixels, ``scores`` ``N``,
    ``category_ids`` ``N`` (the dataset's ids)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    category_ids: torch.Tensor


class Detector(Protocol):
    name: str

    def detect(self, paths: Sequence[Path]) -> list[Detections]: ...


class RunDetector:
    """A loaded dinotune detection run (DETR-style or single-object); ``batch_size`` None: the
    run's own inference batch size."""

    def __init__(self, loaded: TrainedRun, name: str, batch_size: int | None = None):
        if loaded.cfg.task != "detect":
            raise ValueError(f"{name} is a {loaded.cfg.task} run, not a detection run")
        self.loaded = loaded
        self.name = f"dinotune:{name} ({loaded.cfg.model.head})"
        self.batch_size = batch_size

    def detect(self, paths: Sequence[Path]) -> list[Detections]:
        preds = self.loaded.predict(list(paths), batch_size=self.batch_size)
        by_path = {p["image"]: p for p in preds}
        out = []
        for path in paths:
            dets = by_path[str(path)]["detections"]
            boxes = torch.tensor([d["bbox"] for d in dets], dtype=torch.float32).reshape(-1, 4)
            out.append(Detections(box_ops.xywh_to_xyxy(boxes), torch.tensor([d["score"] for d in dets]),
                                  torch.tensor([d["category_id"] for d in dets], dtype=torch.int64)))
        return out


class YoloDetector:
    """An ultralytics YOLO model (``.pt`` weights or a model ``.yaml`` with random weights).

    YOLO class names are matched to the dataset's category names (COCO-trained YOLO and COCO use
    the same names); classes the dataset lacks are dropped and counted."""

    def __init__(self, weights: str, categories: list[dict[str, Any]], image_size: int, device: str = "auto",
                 conf: float = 0.001):
        try:
            from ultralytics import YOLO
        except ImportError:
            raise ImportError("YOLO baselines need ultralytics: pip install 'dinotune[yolo]'") from None
        _undo_pil_patch()
        self.model = YOLO(weights)
        self.name = f"yolo:{Path(weights).name}"
        self.image_size, self.conf = image_size, conf
        self.device = None if device == "auto" else device
        by_name = {str(c["name"]).lower(): int(c["id"]) for c in categories}
        self.class_to_category = {int(k): by_name.get(str(v).lower()) for k, v in self.model.names.items()}
        self.dropped = 0

    def detect(self, paths: Sequence[Path]) -> list[Detections]:
        out = []
        for path in paths:  # one at a time: ultralytics batches lists of mixed sizes itself anyway
            r = self.model.predict(str(path), imgsz=self.image_size, conf=self.conf, device=self.device,
                                   verbose=False, max_det=100)[0]
            cls = r.boxes.cls.cpu().long().tolist()
            cats = [self.class_to_category.get(c) for c in cls]
            keep = torch.tensor([c is not None for c in cats], dtype=torch.bool)
            self.dropped += int((~keep).sum())
            out.append(Detections(r.boxes.xyxy.cpu().float()[keep], r.boxes.conf.cpu().float()[keep],
                                  torch.tensor([c for c in cats if c is not None], dtype=torch.int64)))
        return out


def _undo_pil_patch() -> None:
    """Importing ultralytics replaces ``PIL.Image.open`` with a wrapper that, on the first file PIL
    cannot identify, tries to pip-install a HEIF plugin and raises ModuleNotFoundError offline. That
    would turn dinotune's "report and skip" of a bad image into a crash, so put the original back."""
    try:
        from PIL import Image
        from ultralytics.utils import patches
    except ImportError:
        return
    original = getattr(patches, "_image_open", None)
    if original is not None and Image.open is not original:
        Image.open = original


def score(source: DetectionSource, detections: Sequence[Detections]) -> dict[str, Any]:
    """``detection_metrics`` of ``detections`` (one per source image, in order)."""
    results = []
    for im, det in zip(source.images, detections):
        for box, s, c in zip(box_ops.xyxy_to_xywh(det.boxes).tolist(), det.scores.tolist(), det.category_ids.tolist()):
            results.append({"image_id": im.id, "category_id": int(c), "bbox": [round(v, 2) for v in box],
                            "score": float(s)})
    return detection_metrics(source, results)


def compare(detectors: Sequence[Detector], source: DetectionSource, out_dir: Path) -> dict[str, Any]:
    """Score every detector on ``source``; write ``compare.json``, ``compare.md`` and charts."""
    from dinotune.viz.plots import plot_grouped_bars

    paths = [im.path for im in source.images]
    rows = {}
    for det in detectors:
        t0 = time.perf_counter()
        found = det.detect(paths)
        seconds = time.perf_counter() - t0
        metrics = score(source, found)
        metrics["images_per_s"] = len(paths) / seconds if seconds else None
        rows[det.name] = metrics
        info(f"{det.name}: AP {metrics.get('AP') or 0:.4f}, AP50 {metrics.get('AP50') or 0:.4f}, "
             f"single-object accuracy {metrics.get('accuracy', 0):.4f}")
    out_dir = Path(out_dir)
    write_json(out_dir / "compare.json", {"data": source.name, "images": len(paths), "detectors": rows})
    table = markdown_table(rows, source.name, len(paths))
    (out_dir / "compare.md").write_text(table)
    coco = {n: {k: r.get(k) for k in ("AP", "AP50", "AP75", "AR100")} for n, r in rows.items()}
    single = {n: {k: r.get(k) for k in ("accuracy", "f1", "mean_iou", "map50")} for n, r in rows.items()}
    plot_grouped_bars(coco, out_dir / "compare_coco.png", "COCO metrics (all objects)")
    plot_grouped_bars(single, out_dir / "compare_single_object.png", "single-object metrics (largest object)")
    return {"rows": rows, "table": table}


def markdown_table(rows: dict[str, dict[str, Any]], data: str, n_images: int) -> str:
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = [f"# Detector comparison on {data} ({n_images} images)", "",
             "COCO metrics use every ground-truth object (pycocotools); accuracy / F1 / mean IoU / mAP@0.5 "
             "compare each image's top detection with its largest object (single-object metrics).", "",
             "| detector | " + " | ".join(SHOWN) + " | images/s |", "|---" * (len(SHOWN) + 2) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(r.get(k)) for k in SHOWN) + f" | {cell(r.get('images_per_s'))} |")
    return "\n".join(lines) + "\n"


def run_compare(*, data: str, split: str, runs: Sequence[TrainedRun], run_names: Sequence[str],
                yolo: Sequence[str], out: Path, images: str, subset: int, subset_seed: int, device: str,
                yolo_image_size: int, batch_size: int | None, min_box_size: float, max_pixels: int) -> str:
    """Load the ground truth, wrap the detectors, compare, return the table."""
    if not runs and not yolo:
        raise ValueError("nothing to compare: pass --runs and/or --yolo")
    detectors: list[Detector] = [RunDetector(r, n, batch_size) for r, n in zip(runs, run_names)]
    categories = runs[0].bundle.categories if runs else None
    source = find_detection_data(data, "val" if split == "val" else "train", images, categories=categories,
                                 min_box_size=min_box_size)
    source = scan_source(source, "fast", max_pixels)
    if subset:
        source = restrict(source, choose_subset(source, subset, subset_seed))
    for d in detectors[1:]:
        if [c["id"] for c in d.loaded.bundle.categories] != [c["id"] for c in source.categories]:
            warn(f"{d.name} was trained on other categories than {detectors[0].name}; ids are matched as-is")
    detectors += [YoloDetector(w, source.categories, yolo_image_size, device) for w in yolo]
    result = compare(detectors, source, Path(out))
    info(f"wrote {Path(out) / 'compare.json'}, compare.md and charts")
    return result["table"]
