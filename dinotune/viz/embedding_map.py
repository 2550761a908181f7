"""The picture of a dataset map: one point per image at its 2-D coordinates, coloured by class, with
chosen rows (the outliers of ``dinotune.embed.projection``) ringed in black and named.

Plain arrays and lists in, a PNG out: the projection and the choice of rows stay in the embed layer,
this module only draws (matplotlib's object-oriented API on an Agg canvas, written atomically, as in
``dinotune.viz.plots``). Up to 10 classes take the ``tab10`` colours and up to 20 ``tab20``, with a
legend; past ``MAX_LEGEND_CLASSES`` a legend would hide the map, so there is none and the colours come
from a golden-ratio walk round the hue circle (neighbouring classes far apart in hue, the brightness
cycling through three levels so that classes a full turn apart still differ). Unlabelled points are
grey and drawn first, under the classes.
"""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib import colormaps

from dinotune.viz.plots import _new_figure, _save

__all__ = ["MAX_LEGEND_CLASSES", "MAX_NAMED", "map_figure"]

MAX_LEGEND_CLASSES = 20
# Highlighted rows named on the picture; the rest are ringed only (names of more would overlap)
MAX_NAMED = 10
UNLABELLED = (0.62, 0.62, 0.62)
_OFFSETS = ((7, 5), (7, -5), (-7, 5), (-7, -5))  # points, from the ringed point to its name


def _colours(k: int) -> list[tuple[float, float, float]]:
    """``k`` distinct RGB colours in ``[0, 1]``."""
    if k <= 10:
        return [tuple(c[:3]) for c in colormaps["tab10"].colors[:k]]
    if k <= 20:
        return [tuple(c[:3]) for c in colormaps["tab20"].colors[:k]]
    return [colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.8, (0.95, 0.72, 0.5)[i % 3]) for i in range(k)]


def _point_size(n: int) -> float:
    """Marker area (points^2): large for a few dozen images, small for tens of thousands."""
    return float(np.clip(4000.0 / max(n, 1), 1.5, 40.0))


def map_figure(coords: np.ndarray, labels: Sequence[str], path: str | Path, *, title: str,
               highlight: Sequence[int] = (), names: Sequence[str] | None = None,
               axis_label: str = "component", highlight_label: str = "highlighted") -> Path:
    """Save the scatter of ``coords`` coloured by ``labels`` as a PNG.

    Args:
        coords: ``N x 2`` point coordinates.
        labels: ``N`` class names, ``""`` for an unlabelled point (grey).
        path: output PNG, written atomically; parent folders are created.
        title: figure title (may hold a newline).
        highlight: row indices drawn with a black ring, e.g. outliers; the first ``MAX_NAMED`` are
            annotated with their file name.
        names: ``N`` paths or names for the annotations (the file name is shown); without them the
            row index is.
        axis_label: the axes are called ``"{axis_label} 1"`` and ``"{axis_label} 2"`` (``component``
            for PCA, ``UMAP`` for UMAP).
        highlight_label: the legend's name for the ringed points.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ValueError: ``coords`` is not ``N x 2``, or ``labels`` / ``names`` are not ``N`` long, or a
            highlighted index is out of range.
    """
    xy = np.asarray(coords, dtype=np.float64)
    n = len(labels)
    if xy.ndim != 2 or xy.shape[1] != 2 or len(xy) != n:
        raise ValueError(f"coords must be N x 2 for {n} labels, got shape {xy.shape}")
    if names is not None and len(names) != n:
        raise ValueError(f"{len(names)} names for {n} points")
    rings = [int(i) for i in highlight]
    if any(not 0 <= i < n for i in rings):
        raise ValueError(f"highlighted rows must lie in [0, {n}), got {rings}")

    classes = sorted({str(label) for label in labels if label})
    legend = len(classes) <= MAX_LEGEND_CLASSES
    fig = _new_figure(9.5 if legend and classes else 8.0, 7.0)
    ax = fig.add_subplot(1, 1, 1)
    size = _point_size(n)
    label_array = np.asarray([str(label) for label in labels], dtype=object)
    unlabelled = label_array == ""
    if unlabelled.any():
        ax.scatter(xy[unlabelled, 0], xy[unlabelled, 1], s=size, color=UNLABELLED, alpha=0.6, linewidths=0,
                   label=f"unlabelled ({int(unlabelled.sum()):,})")
    for name, colour in zip(classes, _colours(len(classes))):
        mask = label_array == name
        ax.scatter(xy[mask, 0], xy[mask, 1], s=size, color=colour, alpha=0.8, linewidths=0,
                   label=f"{name} ({int(mask.sum()):,})")
    if rings:
        ax.scatter(xy[rings, 0], xy[rings, 1], s=size * 2.5 + 40, facecolors="none", edgecolors="black",
                   linewidths=1.3, label=highlight_label, zorder=3)
        for j, i in enumerate(rings[:MAX_NAMED]):
            text = Path(names[i]).name if names is not None else f"#{i}"
            # turn the label round the point from one outlier to the next so neighbouring names overlap less
            dx, dy = _OFFSETS[j % len(_OFFSETS)]
            ax.annotate(text, xy[i], xytext=(dx, dy), textcoords="offset points", fontsize=7.5, zorder=4,
                        ha="left" if dx > 0 else "right", va="bottom" if dy > 0 else "top",
                        bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "0.6",
                              "alpha": 0.85})
    ax.set_xlabel(f"{axis_label} 1")
    ax.set_ylabel(f"{axis_label} 2")
    ax.set_title(title, fontsize=11)
    ax.grid(True, alpha=0.25)
    ax.set_axisbelow(True)
    if legend and (classes or unlabelled.any() or rings):
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, markerscale=max(1.0, 30 / size) ** 0.5,
                  frameon=False, borderaxespad=0.0)
    elif not legend:
        ax.text(1.0, -0.09, f"{len(classes):,} classes: colours only, no legend", transform=ax.transAxes,
                ha="right", va="top", fontsize=8, color="0.4")
    fig.tight_layout()
    return _save(fig, path)
