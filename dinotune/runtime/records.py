"""Prediction records as the text of ``dinotune predict``'s JSON or CSV files, per task, without
torch: the same text each task's ``format_predictions`` writes (a test holds the two together).

- classification: JSON top-k per image; CSV one row per image (``image, class_1, score_1, ...``);
- detection: COCO results JSON (a flat list, test-dev style, each with ``file_name``); CSV one row
  per detection;
- segmentation: JSON list; CSV one row per image and class (pixel fraction).
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from dinotune.errors import ConfigError

FORMATS = ("json", "csv")


def format_predictions(task: str, results: list[dict[str, Any]], fmt: str) -> str:
    """``results`` (the records of ``task``) as the text of a ``fmt`` (json / csv) file."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown output format {fmt!r}: choose json or csv")
    return {"classify": _classify, "detect": _detect, "segment": _segment}[task](results, fmt)


def _classify(results: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(results, indent=2) + "\n"
    k = max((len(r["predictions"]) for r in results), default=0)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image"] + [c for i in range(1, k + 1) for c in (f"class_{i}", f"score_{i}")])
    for r in results:
        w.writerow([r["image"]] + [v for p in r["predictions"] for v in (p["class"], f"{p['score']:.6f}")])
    return buf.getvalue()


def _detect(results: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        flat = [{"image_id": r["image_id"], "file_name": r["image"], "category_id": d["category_id"],
                 "bbox": d["bbox"], "score": d["score"]} for r in results for d in r["detections"]]
        return json.dumps(flat) + "\n"
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", "image_id", "category", "category_id", "score", "x", "y", "width", "height"])
    for r in results:
        for d in r["detections"]:
            w.writerow([r["image"], r["image_id"], d["category"], d["category_id"], d["score"], *d["bbox"]])
    return buf.getvalue()


def _segment(results: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(results, indent=2) + "\n"
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", "mask", "class", "fraction"])
    for r in results:
        for name, frac in r["classes"].items():
            w.writerow([r["image"], r["mask"] or "", name, frac])
    return buf.getvalue()
