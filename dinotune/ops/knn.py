"""The weighted k-nearest-neighbour classifier of the DINO papers (Caron et al. 2021, Oquab et al. 2023).

Embeddings are L2-normalised; each query's ``k`` most cosine-similar training embeddings vote for
their labels with weight ``exp(sim / T)``; the classes are ranked by their summed votes. Top-1 is
right when the first class is the query's label, top-5 when it is among the first ``min(5, classes)``.

Ties, made deterministic: among training embeddings equally similar to a query, the one earlier in
the training set is the nearer neighbour (a stable sort), and among classes with equal votes the
one first in sorted label order ranks first. Computed in float64 with numpy.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dinotune.errors import ConfigError


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def knn_scores(train: np.ndarray, train_labels: Sequence[str], queries: np.ndarray, k: int,
               temperature: float = 0.07, chunk: int = 1024) -> tuple[list[str], np.ndarray]:
    """``(classes, votes)``: the sorted class names of ``train_labels`` and the ``Q x classes``
    summed vote weights of each query's ``k`` nearest training embeddings."""
    n = len(train_labels)
    if k < 1:
        raise ConfigError(f"--k must be at least 1, got {k}")
    if k > n:
        raise ConfigError(f"--k {k} is more than the {n} training embeddings; use --k {n} or less")
    if temperature <= 0:
        raise ConfigError(f"--temperature must be positive, got {temperature}")
    if len(train) != n:
        raise ValueError(f"{len(train)} training embeddings but {n} labels")
    classes = sorted(set(train_labels))
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index[c] for c in train_labels], dtype=np.int64)
    t = _normalise(train)
    q = _normalise(queries)
    votes = np.zeros((len(q), len(classes)), dtype=np.float64)
    for start in range(0, len(q), chunk):
        sim = q[start:start + chunk] @ t.T
        nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]  # ties: the earlier training row first
        weight = np.exp(np.take_along_axis(sim, nearest, axis=1) / temperature)
        rows = np.repeat(np.arange(len(sim)), k)
        np.add.at(votes[start:start + chunk], (rows, y[nearest].reshape(-1)), weight.reshape(-1))
    return classes, votes


def knn_classify(train: np.ndarray, train_labels: Sequence[str], queries: np.ndarray, query_labels: Sequence[str],
                 ks: Sequence[int] = (10, 20, 100, 200), temperature: float = 0.07) -> dict[str, dict[str, float]]:
    """``{"k=K": {"top1": ..., "top5": ...}}`` (fractions in [0, 1]) for each ``k`` in ``ks``.
    A query whose label is not among the training labels counts as wrong."""
    if not len(query_labels):
        raise ConfigError("k-NN needs labelled query (val) embeddings; there are none")
    out: dict[str, dict[str, float]] = {}
    for k in ks:
        classes, votes = knn_scores(train, train_labels, queries, k, temperature)
        ranked = np.argsort(-votes, axis=1, kind="stable")  # ties: the class first in sorted order
        index = {c: i for i, c in enumerate(classes)}
        truth = np.array([index.get(c, -1) for c in query_labels])
        top5 = ranked[:, :min(5, len(classes))]
        out[f"k={k}"] = {"top1": float(np.mean(ranked[:, 0] == truth)),
                         "top5": float(np.mean((top5 == truth[:, None]).any(axis=1)))}
    return out
