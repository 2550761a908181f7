"""The sweep's chart: the monitored metric against peak memory and against wall time (two panels),
the Pareto front of each marked and labelled: the trials no other trial beats at once on the metric
and on the cost.

Drawn with matplotlib's object-oriented API on an Agg canvas, as ``viz/plots.py`` draws: no
``pyplot`` state, no window, the PNG written atomically.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Literal, Sequence

from dinotune.sweep.table import Row
from dinotune.utils import atomic_write_bytes


def pareto_front(points: Sequence[tuple[float, float]], mode: Literal["max", "min"] = "max") -> list[int]:
    """Indices of the points ``(cost, metric)`` that no other point dominates: none has a cost as
    low and a metric as good (higher for ``max``, lower for ``min``) with one of them strictly
    better. Ordered by cost; of equal points the first is kept."""
    sign = 1.0 if mode == "max" else -1.0
    front = []
    for i, (cost, metric) in enumerate(points):
        dominated = False
        for j, (c2, m2) in enumerate(points):
            if j == i:
                continue
            no_worse = c2 <= cost and sign * m2 >= sign * metric
            better = c2 < cost or sign * m2 > sign * metric
            if (no_worse and better) or (c2 == cost and m2 == metric and j < i):
                dominated = True
                break
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def plot_pareto(rows: Sequence[Row], path: Path, metric_name: str, mode: Literal["max", "min"] = "max") -> Path:
    """``pareto.png``: metric against peak memory (left) and wall time (right) for the finished
    trials, the Pareto front of each panel joined by a line and its trials labelled."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12.0, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    panels = (("peak_memory_mb", "peak memory (MB)"), ("wall_s", "wall time (s)"))
    for k, (attr, label) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        shown = [r for r in rows if r.done and _finite(r.metric) and _finite(getattr(r, attr))]
        points = [(float(getattr(r, attr)), float(r.metric)) for r in shown]
        if not points:
            ax.text(0.5, 0.5, "no finished trial with this measurement", ha="center", va="center",
                    transform=ax.transAxes, color="0.4")
        else:
            front = pareto_front(points, mode)
            ax.scatter([p[0] for p in points], [p[1] for p in points], color="0.6", label="trial", zorder=2)
            ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "-o", color="#c44e52",
                    label="Pareto front", zorder=3)
            for i in front:
                ax.annotate(shown[i].name, points[i], textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color="#c44e52")
            ax.legend(loc="best", fontsize=8)
            ax.margins(x=0.2, y=0.1)  # room for the labels of the points at the edges
        ax.set_xlabel(label)
        ax.set_ylabel(f"{metric_name} (best, {'higher' if mode == 'max' else 'lower'} is better)")
        ax.set_title(f"{metric_name} vs {label.split(' (')[0]}")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)
