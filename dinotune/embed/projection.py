"""A map of the dataset: every embedding as a point in 2-D, coloured by class, with the images that sit
farthest from their class ringed and named.

Projection. Vectors are L2-normalised first (the embeddings are compared by cosine everywhere else:
k-NN, search), then either

* ``pca``: the first two principal components, computed here with numpy (the eigenvectors of the
  ``D x D`` covariance, accumulated over row chunks in float64) rather than ``sklearn``'s PCA: it is
  exact and deterministic (no randomised solver above some size), holds ``D x D`` rather than an
  ``N x D`` float64 copy in memory, and skips importing scikit-learn for a dozen lines of algebra. The
  sign of each axis is fixed (its largest loading positive), so the same data gives the same picture;
* ``umap``: ``umap.UMAP(n_components=2, metric="cosine", random_state=seed)`` from the optional
  ``umap-learn`` package, which keeps neighbourhoods rather than variance (clusters separate better);
* ``auto``: umap when it is installed and there are at least ``MIN_UMAP_ROWS`` embeddings (UMAP builds a
  graph of 15 neighbours per point; on fewer points the graph is the whole set), pca otherwise.

Outliers, "farthest from their class": for every labelled class, the mean direction of its normalised
embeddings (the centroid, normalised) and each member's cosine distance to it, ``1 - cos``, in
``[0, 2]``. Classes differ in spread, so the rows are ranked by a robust z-score within their class:
``(distance - class median) / (1.4826 * class MAD)``; the median absolute deviation is used rather than
the standard deviation so the outliers being looked for do not widen the yardstick that measures them.
Where the MAD is 0 (more than half the class at one distance) the mean absolute deviation times 1.2533
stands in, and where that is 0 too (all at one distance) every z is 0. Unlabelled rows (label ``""``)
form no class and classes of fewer than 3 rows have no meaningful spread: both are left out. Typical
finds: mislabelled images, near-blank or corrupt ones, another domain mixed into a class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dinotune.embed.store import Embeddings
from dinotune.errors import ConfigError, DataError

__all__ = ["METHODS", "MIN_UMAP_ROWS", "dataset_map", "outliers", "project"]

METHODS = ("auto", "pca", "umap")
# Fewest embeddings UMAP is used for (``auto`` picks pca below, an explicit ``umap`` is refused)
MIN_UMAP_ROWS = 20
MIN_CLASS_ROWS = 3
# 1.4826 * MAD estimates the standard deviation of normal data; 1.2533 * mean absolute deviation too
MAD_SCALE = 1.4826
MEAN_AD_SCALE = 1.2533
# Spreads below this are rounding noise of equal distances, not a spread
_TINY = 1e-12
_CHUNK = 8192


def _normalise(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (``N x D``) scaled to unit length, in float64; zero rows stay zero."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def _pca(x: np.ndarray) -> np.ndarray:
    """``N x 2`` float32: the normalised rows of ``x`` (``N x D``) on their first two principal axes."""
    n, d = x.shape
    mean = np.zeros(d)
    for s in range(0, n, _CHUNK):
        mean += _normalise(x[s:s + _CHUNK]).sum(axis=0)
    mean /= n
    cov = np.zeros((d, d))
    for s in range(0, n, _CHUNK):
        c = _normalise(x[s:s + _CHUNK]) - mean
        cov += c.T @ c
    values, vectors = np.linalg.eigh(cov)  # ascending eigenvalues
    axes = vectors[:, ::-1][:, :2]  # D x 2, largest variance first
    if axes.shape[1] < 2:  # D == 1: the second axis carries nothing
        axes = np.pad(axes, ((0, 0), (0, 2 - axes.shape[1])))
    # the sign of an eigenvector is arbitrary: make each axis's largest loading positive
    big = np.argmax(np.abs(axes), axis=0)
    axes = axes * np.where(axes[big, np.arange(2)] < 0, -1.0, 1.0)
    out = np.empty((n, 2), dtype=np.float32)
    for s in range(0, n, _CHUNK):
        out[s:s + _CHUNK] = (_normalise(x[s:s + _CHUNK]) - mean) @ axes
    return out


def _umap_module(required: bool):
    """The ``umap`` module, or None when it is missing and not ``required`` (ConfigError if required)."""
    try:
        import umap
    except ImportError as exc:
        if required:
            raise ConfigError("method 'umap' needs umap-learn: pip install umap-learn "
                              "(or use method 'pca')") from exc
        return None
    return umap


def project(vectors: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """The 2-D map of ``vectors`` (see the module docstring).

    Args:
        vectors: ``N x D`` embeddings (any float dtype); they are L2-normalised here.
        method: one of ``METHODS``: ``pca``, ``umap`` (needs umap-learn and ``MIN_UMAP_ROWS`` rows) or
            ``auto`` (umap when both hold, else pca).
        seed: UMAP's ``random_state`` (pca is deterministic).

    Returns:
        ``(coords, used)``: ``N x 2`` float32 coordinates, row ``i`` for ``vectors[i]``, and the method
        used (``"pca"`` or ``"umap"``).

    Raises:
        ConfigError: an unknown method; ``umap`` asked for and not installed or given too few rows.
        DataError: fewer than 2 embeddings, not ``N x D``, or not finite.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown map method {method!r}; choose one of {', '.join(METHODS)}")
    x = np.asarray(vectors)
    if x.ndim != 2:
        raise DataError(f"embeddings must be an N x D array, got shape {x.shape}")
    n = len(x)
    if n < 2:
        raise DataError(f"a map needs at least 2 embeddings, got {n}")
    if not np.isfinite(x).all():
        raise DataError("the embeddings hold NaN or infinite values; embed the images again")
    if method == "umap" and n < MIN_UMAP_ROWS:
        raise ConfigError(f"method 'umap' needs at least {MIN_UMAP_ROWS} embeddings (it links each to 15 "
                          f"neighbours), got {n}; use method 'pca'")
    wanted = method == "umap" or (method == "auto" and n >= MIN_UMAP_ROWS)
    umap = _umap_module(required=method == "umap") if wanted else None
    if umap is None:
        return _pca(x), "pca"
    reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed)
    coords = np.asarray(reducer.fit_transform(_normalise(x).astype(np.float32)), dtype=np.float32)
    if coords.shape != (n, 2):
        raise RuntimeError(f"UMAP returned shape {coords.shape} for {n} embeddings, expected ({n}, 2)")
    return coords, "umap"


def _scores(rows: Embeddings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(index, distance, z)`` of every row in a class of at least ``MIN_CLASS_ROWS`` labelled rows:
    row indices into ``rows`` and their cosine distance to the class direction and robust z-score."""
    members: dict[str, list[int]] = {}
    for i, label in enumerate(rows.labels):
        if label:
            members.setdefault(label, []).append(i)
    index, distance, z = [], [], []
    for label in sorted(members):
        idx = members[label]
        if len(idx) < MIN_CLASS_ROWS:
            continue
        x = _normalise(rows.vectors[idx])
        centre = _normalise(x.mean(axis=0, keepdims=True))[0]  # the class's mean direction
        d = 1.0 - x @ centre
        deviation = np.abs(d - np.median(d))
        scale = MAD_SCALE * float(np.median(deviation))
        if scale <= _TINY:
            scale = MEAN_AD_SCALE * float(deviation.mean())
        zs = (d - np.median(d)) / scale if scale > _TINY else np.zeros_like(d)
        index.extend(idx)
        distance.append(d)
        z.append(zs)
    if not index:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    return np.asarray(index, np.int64), np.concatenate(distance), np.concatenate(z)


def _ranked(rows: Embeddings, top: int) -> list[tuple[int, float, float]]:
    """The ``top`` ``(row index, distance, z)`` with the largest z (ties: larger distance, then path)."""
    if top < 0:
        raise ConfigError(f"top must be 0 or more, got {top}")
    index, distance, z = _scores(rows)
    order = sorted(range(len(index)), key=lambda j: (-z[j], -distance[j], rows.paths[index[j]]))
    return [(int(index[j]), float(distance[j]), float(z[j])) for j in order[:top]]


def outliers(rows: Embeddings, top: int = 20) -> list[dict[str, Any]]:
    """The ``top`` rows farthest from their class (see the module docstring for the definition).

    Args:
        rows: the embeddings with their paths, splits and labels. Unlabelled rows and classes of fewer
            than ``MIN_CLASS_ROWS`` (3) rows are skipped; with no class left the list is empty.
        top: how many to return (0 or more).

    Returns:
        Up to ``top`` dicts, largest z-score first (ties: larger distance, then path), with keys
        ``path``, ``label``, ``split``, ``distance`` (cosine distance to the class's mean direction)
        and ``z`` (robust z-score within the class), both rounded to 6 decimals.
    """
    return _records(rows, _ranked(rows, top))


def _records(rows: Embeddings, ranked: list[tuple[int, float, float]]) -> list[dict[str, Any]]:
    return [{"path": rows.paths[i], "label": rows.labels[i], "split": rows.splits[i],
             "distance": round(d, 6), "z": round(z, 6)} for i, d, z in ranked]


def dataset_map(rows: Embeddings, out: str | Path, *, method: str = "auto", top: int = 20,
                seed: int = 0) -> dict[str, Any]:
    """Project ``rows``, find their outliers and draw both into the PNG ``out``.

    Args:
        rows: at least 2 embeddings.
        out: the PNG to write (atomically; parent folders are created).
        method: ``auto``, ``pca`` or ``umap`` (see ``project``).
        top: how many outliers to list and ring (the first 10 are named on the picture).
        seed: UMAP's random state.

    Returns:
        ``{"picture": str(out), "method": "pca" | "umap", "images": N, "classes": K (distinct non-empty
        labels), "outliers": [...]}`` with ``outliers`` as returned by ``outliers``.
    """
    from dinotune.viz.embedding_map import map_figure  # matplotlib only when a picture is drawn

    out = Path(out).expanduser()
    coords, used = project(rows.vectors, method=method, seed=seed)
    ranked = _ranked(rows, top)
    classes = len({label for label in rows.labels if label})
    n = len(rows)
    what = "UMAP" if used == "umap" else "PCA"
    title = f"{n:,} images, {classes:,} {'class' if classes == 1 else 'classes'} ({what}, cosine)"
    if ranked:
        title += f"\nringed: the {len(ranked)} farthest from their class"
    map_figure(coords, rows.labels, out, title=title, highlight=[i for i, _, _ in ranked],
               names=rows.paths, axis_label="UMAP" if used == "umap" else "component",
               highlight_label="farthest from class")
    return {"picture": str(out), "method": used, "images": n, "classes": classes,
            "outliers": _records(rows, ranked)}
