"""PNG plots for run folders: confusion matrices, training curves, bar charts.

Figures are built with matplotlib's object-oriented API on an Agg canvas instead of
``pyplot``: that renders on headless servers without touching the process-wide backend (a
user's notebook keeps its own), keeps no global figure registry to leak, and never opens a
window. Each PNG is written atomically (temporary file in the same folder, then
``os.replace``), so a dashboard or a crash never leaves a truncated image behind.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from dinotune.utils import atomic_write_bytes

__all__ = ["plot_confusion_matrix", "plot_training_curves", "plot_bars"]

DPI = 120
# Past this many classes the per-cell counts are unreadable and only add clutter.
MAX_ANNOTATED_CLASSES = 30
# Caps keep a 1000-class matrix from becoming a 100-megapixel PNG.
MAX_FIG_INCHES = 30.0


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` to PNG bytes and write them atomically to ``path``."""
    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _as_float(value: Any) -> float | None:
    """``value`` as a finite float, or ``None`` for strings, bools, None, NaN and inf."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _placeholder(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_confusion_matrix(
    confusion: Sequence[Sequence[int]] | np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    normalize: bool = True,
    title: str = "Confusion matrix",
) -> Path:
    """Save a confusion matrix as a PNG heat map.

    Args:
        confusion: ``K x K`` counts, rows are true classes and columns predictions (the
            ``confusion`` entry of ``ClassificationMetrics.compute()``).
        class_names: ``K`` tick labels.
        path: output PNG; parent folders are created.
        normalize: colour each row by its fraction of that true class (recall on the
            diagonal), so rare classes are as visible as frequent ones; otherwise colour by
            raw counts. The cell text is always the raw count.
        title: figure title.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: ``confusion`` is not square or does not match ``class_names``.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion must be a square K x K matrix, got shape {cm.shape}")
    k = cm.shape[0]
    names = [str(n) for n in class_names]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k} x {k} confusion matrix")

    if normalize:
        row_sums = cm.sum(axis=1, keepdims=True)
        # Rows of classes absent from the data stay 0 instead of 0/0.
        colours = np.divide(cm, row_sums, out=np.zeros_like(cm), where=row_sums > 0)
        vmax = 1.0
    else:
        colours = cm
        vmax = max(float(cm.max()), 1.0)

    side = min(max(5.0, 2.5 + 0.35 * k), MAX_FIG_INCHES)
    fig = _new_figure(side + 1.2, side)  # extra width for the colour bar
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(colours, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class" if normalize else "count")

    label_size = float(np.clip(10 - 0.1 * (k - 40), 5, 10))  # 10 pt up to 40 classes, then smaller
    step = max(1, math.ceil(k / 100))  # beyond ~100 labels, show every n-th
    ticks = np.arange(0, k, step)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels([names[i] for i in ticks], rotation=45, ha="right", rotation_mode="anchor", fontsize=label_size)
    ax.set_yticklabels([names[i] for i in ticks], fontsize=label_size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)

    if k <= MAX_ANNOTATED_CLASSES:
        text_size = float(np.clip(12 - 0.2 * k, 6, 10))
        for i in range(k):
            for j in range(k):
                # White text on dark cells, black on light ones.
                dark = colours[i, j] > 0.5 * vmax
                ax.text(
                    j, i, f"{int(cm[i, j])}", ha="center", va="center",
                    color="white" if dark else "black", fontsize=text_size,
                )
    fig.tight_layout()
    return _save(fig, path)


# Counts written beside validation metrics: bookkeeping, and on a shared axis they flatten every score.
_COUNT_KEYS = ("count", "pixels", "images")
# Line styles for many series on one axis: no two series share colour and dash pattern.
_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
            "tab:gray", "tab:olive", "tab:cyan")
_DASHES = ("-", "--", ":", "-.")
# and a marker shape each, so lines that cross or lie close stay apart in print and for colour-blind eyes
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def _metric_family(name: str) -> str:
    """The panel a validation metric goes to: COCO's AP and AR families apart (each has a dozen
    members of different scale), everything else together."""
    if name.startswith("AP") or name == "map50":
        return "average precision (AP family)"
    if name.startswith("AR"):
        return "average recall (AR family)"
    return "validation metrics"


def training_curve_panels(history: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """``{panel title: {series key: (epochs, values)}}`` for ``plot_training_curves``: the total
    losses on their own axis (``train/loss``, ``val/loss``), the loss components on another (they
    are small next to the weighted total), and validation metrics by family."""
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for idx, record in enumerate(history):
        if not isinstance(record, Mapping):
            continue
        x = _as_float(record.get("epoch"))
        x = float(idx + 1) if x is None else x
        for key, value in record.items():
            # val_ema/*: the same metrics of the weights' moving average (--ema), drawn beside val/*
            if not isinstance(key, str) or not key.startswith(("train/", "val/", "val_ema/")):
                continue
            name = key.split("/", 1)[1]
            if name == "loss":
                title = "loss"
            elif "loss" in name:
                title = "loss components"
            elif key.startswith(("val/", "val_ema/")) and not name.endswith(_COUNT_KEYS):
                title = _metric_family(name)
            else:
                continue
            y = _as_float(value)
            if y is None:
                continue
            xs, ys = panels.setdefault(title, {}).setdefault(key, ([], []))
            xs.append(x)
            ys.append(y)
    return panels


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Save the curves of a run against the epoch, one panel per kind of number.

    Args:
        history: per-epoch records as written to ``metrics.jsonl``, e.g.
            ``{"epoch": 1, "train/loss": 0.9, "val/loss": 1.0, "val/top1": 0.5, "lr/head": 1e-3}``.
            Panels (see ``training_curve_panels``): the total loss, the loss components (when the
            task logs any), and the validation metrics by family (detection: AP family, AR family,
            the rest). Other keys (``lr/*``, counts) are left out. A record without ``"epoch"``
            is placed at its 1-based position; missing keys, strings, lists, NaN and inf are
            skipped, so partial or resumed histories still plot.
        path: output PNG; parent folders are created.

    Returns:
        ``path`` as a ``Path``.
    """
    return _save(training_curves_figure(history), path)


def training_curves_figure(history: Sequence[Mapping[str, Any]]) -> Figure:
    """The figure ``plot_training_curves`` saves (see there): epochs as whole-number ticks, every
    series in its own colour, dash and marker; a series equal to another is drawn dashed over it
    and labelled ``key (= other)``."""
    panels = training_curve_panels(history)
    order = ["loss", "loss components", "average precision (AP family)", "average recall (AR family)",
             "validation metrics"]
    titles = [t for t in order if t in panels] or ["loss"]
    if "validation metrics" not in panels and not any("family" in t for t in titles):
        titles.append("validation metrics")  # an empty panel says there were none
    cols = min(3, len(titles))
    rows = math.ceil(len(titles) / cols)
    fig = _new_figure(5.0 * cols + 1.0, 4.2 * rows)
    for i, title in enumerate(titles):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_title(title)
        series = panels.get(title, {})
        if not series:
            _placeholder(ax, "no loss values" if title == "loss" else "no validation metrics")
            continue
        drawn: list[tuple[str, np.ndarray, np.ndarray]] = []
        for j, key in enumerate(sorted(series)):
            xs, ys = series[key]
            order_ = np.argsort(xs, kind="stable")
            x, y = np.asarray(xs)[order_], np.asarray(ys)[order_]
            # a series equal to one already drawn (balanced accuracy is macro recall) would hide it:
            # it is drawn dashed, thinner, and says which one it equals
            twin = next((k for k, x0, y0 in drawn if x0.shape == x.shape and np.array_equal(x0, x)
                         and np.allclose(y0, y, rtol=0, atol=1e-9)), None)
            drawn.append((key, x, y))
            # Markers make a one-epoch run visible; for long runs they only add noise.
            ax.plot(x, y, label=key if twin is None else f"{key} (= {twin})", color=_COLOURS[j % len(_COLOURS)],
                    linestyle="--" if twin else _DASHES[(j // len(_COLOURS)) % len(_DASHES)],
                    linewidth=1.0 if twin else 1.6, marker=_MARKERS[j % len(_MARKERS)] if len(xs) <= 50 else None,
                    markersize=3.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2 if len(series) > 6 else 1)
    fig.tight_layout()
    return fig


def plot_bars(values: Mapping[str, float], path: str | Path, title: str, ylabel: str) -> Path:
    """Save a labelled bar chart, e.g. per-class F1 or benchmark speed ratios.

    Up to 15 bars are drawn vertically; more are drawn horizontally (in the given order,
    top to bottom) so long label lists stay readable. Each bar carries its value.

    Args:
        values: label -> value; non-finite or non-numeric values are drawn as an empty bar
            labelled ``n/a``.
        path: output PNG; parent folders are created.
        title: figure title.
        ylabel: name of the value axis (the x axis when the bars are horizontal).

    Returns:
        ``path`` as a ``Path``.
    """
    labels = [str(k) for k in values]
    nums = [_as_float(v) for v in values.values()]
    heights = [0.0 if v is None else v for v in nums]
    texts = ["n/a" if v is None else f"{v:.3g}" for v in nums]
    n = len(labels)
    horizontal = n > 15

    if horizontal:
        fig = _new_figure(8.0, min(max(4.0, 0.28 * n + 1.5), MAX_FIG_INCHES))
    else:
        fig = _new_figure(min(max(5.0, 0.6 * n + 2.0), MAX_FIG_INCHES), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    if n == 0:
        _placeholder(ax, "no values")
    elif horizontal:
        pos = np.arange(n)
        bars = ax.barh(pos, heights, color="tab:blue")
        ax.set_yticks(pos)
        ax.set_yticklabels(labels, fontsize=8)
        ax.invert_yaxis()  # first entry on top, as it reads in the dict
        ax.set_xlabel(ylabel)
        ax.bar_label(bars, labels=texts, padding=2, fontsize=7)
        ax.margins(x=0.12)
        ax.grid(True, axis="x", alpha=0.3)
    else:
        pos = np.arange(n)
        bars = ax.bar(pos, heights, color="tab:blue")
        ax.set_xticks(pos)
        ax.set_xticklabels(labels, rotation=30 if n > 4 else 0, ha="right" if n > 4 else "center", fontsize=9)
        ax.set_ylabel(ylabel)
        ax.bar_label(bars, labels=texts, padding=2, fontsize=8)
        ax.margins(y=0.12)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_image_grid(images: Sequence[Any], titles: Sequence[str], path: str | Path,
                    colours: Sequence[str] | None = None, columns: int = 6) -> Path:
    """Thumbnails (PIL images or ``H x W x 3`` arrays) with a title each, e.g. predicted vs true
    class; ``colours`` tints the titles (green right, red wrong)."""
    n = max(1, len(images))
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig = _new_figure(2.0 * cols, 2.2 * rows)
    for i, image in enumerate(images):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(np.asarray(image), cmap="gray" if np.asarray(image).ndim == 2 else None)
        ax.set_title(titles[i], fontsize=9, color=(colours[i] if colours else "black"))
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path)


def plot_curve(x: Sequence[float], y: Sequence[float], path: str | Path, title: str, xlabel: str,
               ylabel: str, label: str | None = None) -> Path:
    """One line plot on [0, 1] axes (e.g. a precision-recall curve)."""
    fig = _new_figure(5.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(list(x), list(y), label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if label:
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_histogram(values: Sequence[float], path: str | Path, title: str, xlabel: str, bins: int = 40) -> Path:
    """A histogram (e.g. of detection confidences); an empty input gives a labelled empty chart."""
    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    if len(values):
        ax.hist(list(values), bins=bins, color="#4c72b0")
    else:
        _placeholder(ax, "no values")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_grouped_bars(table: Mapping[str, Mapping[str, float]], path: str | Path, title: str) -> Path:
    """Bars of several metrics (x groups) for several models (colours): ``{model: {metric: value}}``."""
    models = list(table)
    metrics = list(dict.fromkeys(m for row in table.values() for m in row))
    fig = _new_figure(max(6.0, 1.2 * len(metrics) * max(1, len(models)) * 0.5 + 2), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(1, len(models))
    for i, model in enumerate(models):
        xs = [j + i * width - 0.4 + width / 2 for j in range(len(metrics))]
        ys = [_as_float(table[model].get(m)) or 0.0 for m in metrics]
        ax.bar(xs, ys, width=width, label=model)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(metrics, rotation=30, ha="right")
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
