"""The sweep's table: one row per trial, read off its run folder, written as Markdown and CSV.

Columns: the trial, its settings, the monitored metric at its best epoch, trainable parameters,
peak memory (MB: the CUDA allocator's peak on a GPU, the process's peak RSS elsewhere, the largest
``sys/peak_memory_mb`` of its epochs), throughput (``sys/images_per_s``, the mean over epochs),
wall time (seconds its processes ran, start-up included) and its status.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from dinotune.engine.logging import read_metrics
from dinotune.engine.run_folder import RunLayout
from dinotune.utils import atomic_write_text


@dataclass
class Row:
    """One trial (or one head of a linear grid) in the table; None where a value is unknown."""

    name: str
    settings: dict[str, str]
    metric: float | None = None
    trainable: int | None = None
    peak_memory_mb: float | None = None
    images_per_s: float | None = None
    wall_s: float | None = None
    status: str = "pending"
    run_dir: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.status == "done"


def monitored(best: dict[str, Any], monitor: str, recorded: dict[str, Any] | None = None) -> tuple[str, float | None]:
    """The key and value the trainer picked ``best`` by: the key ``results.json`` records
    (``recorded``, its ``monitor``: the task may choose by the data, ``--monitor`` may name another),
    else ``val/<monitor>``, or the training loss when the run had no validation data."""
    chosen = recorded.get("key") if isinstance(recorded, dict) else None
    for key in ([chosen] if isinstance(chosen, str) else [f"val/{monitor}", "train/loss"]):
        value = best.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return key, float(value)
    return (chosen if isinstance(chosen, str) else f"val/{monitor}"), None


def read_row(name: str, settings: dict[str, str], run_dir: Path, monitor: str, status: str,
             wall_s: float | None) -> Row:
    """A trial's row from its run folder (``results.json`` for the metric and parameter count,
    ``metrics.jsonl`` for memory, speed and, without a recorded wall time, the epochs' times)."""
    row = Row(name, dict(settings), status=status, wall_s=wall_s, run_dir=str(run_dir))
    records = read_metrics(run_dir) if run_dir.is_dir() else []
    peaks = [r["sys/peak_memory_mb"] for r in records if isinstance(r.get("sys/peak_memory_mb"), (int, float))]
    speeds = [r["sys/images_per_s"] for r in records if isinstance(r.get("sys/images_per_s"), (int, float))]
    row.peak_memory_mb = round(max(peaks), 1) if peaks else None
    row.images_per_s = round(sum(speeds) / len(speeds), 2) if speeds else None
    if row.wall_s is None and records:
        row.wall_s = round(sum(float(r.get("time_s", 0.0)) for r in records), 2)
    results = RunLayout(run_dir).results
    if status == "done" and results.is_file():
        summary = json.loads(results.read_text())
        key, row.metric = monitored(summary.get("best") or {}, monitor, summary.get("monitor"))
        row.extra["metric_key"] = key
        params = summary.get("parameters") or {}
        row.trainable = params.get("trainable")
    return row


def _fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec) if isinstance(value, (int, float)) else str(value)


def columns(rows: Sequence[Row], metric_name: str) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r.settings))
    return ["trial", *keys, f"{metric_name} (best)", "trainable params", "peak memory MB", "img/s", "wall s", "status"]


def _cells(row: Row, keys: list[str]) -> list[Any]:
    return [row.name, *[row.settings.get(k, "") for k in keys], row.metric, row.trainable, row.peak_memory_mb,
            row.images_per_s, row.wall_s, row.status]


def markdown(rows: Sequence[Row], metric_name: str, notes: Sequence[str] = ()) -> str:
    """The table as Markdown, with ``notes`` (collapsed settings, the best trial) under it."""
    header = columns(rows, metric_name)
    keys = header[1:-6]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [row.name, *[row.settings.get(k, "") for k in keys], _fmt(row.metric, ".4f"),
                 _fmt(row.trainable, ","), _fmt(row.peak_memory_mb, ".1f"),
                 _fmt(row.images_per_s, ".2f" if (row.images_per_s or 0) < 10 else ".1f"),
                 _fmt(row.wall_s, ".1f"), row.status]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    text = "\n".join(lines) + "\n"
    if notes:
        text += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    return text


def write_csv(rows: Sequence[Row], metric_name: str, path: Path) -> Path:
    """The table as CSV, numbers unformatted (empty where unknown)."""
    header = columns(rows, metric_name)
    keys = header[1:-6]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["trial", *keys, metric_name, "trainable_params", "peak_memory_mb", "images_per_s", "wall_s",
                     "status"])
    for row in rows:
        writer.writerow(["" if c is None else c for c in _cells(row, keys)])
    atomic_write_text(path, buf.getvalue())
    return path


def write_tables(rows: Sequence[Row], metric_name: str, out_dir: Path, notes: Sequence[str] = ()) -> list[Path]:
    """``results.md`` and ``results.csv`` in ``out_dir``."""
    md = out_dir / "results.md"
    atomic_write_text(md, markdown(rows, metric_name, notes))
    return [md, write_csv(rows, metric_name, out_dir / "results.csv")]
