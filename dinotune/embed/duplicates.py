"""Near-duplicate images of an embeddings file, and the ones that leak across splits.

Two images whose embeddings are nearly parallel (cosine similarity at or above a threshold) are
near-duplicates: the same photo re-saved, resized, cropped a little. Where one is in ``train`` and
the other in ``val`` (different non-empty splits) the pair is a leak: validation then scores images
the model has already seen, and its numbers flatter the model. Leaks come first in the results.

Each row's nearest rows come from ``build_index`` (exact up to ``EXACT_LIMIT`` rows, the graph
above), so the cost is one k-nearest-neighbour search per row rather than all N^2 comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dinotune.embed.index import build_index
from dinotune.embed.store import Embeddings
from dinotune.errors import ConfigError


@dataclass
class Pair:
    """Rows ``a < b`` of the embeddings file, their cosine ``similarity``, and whether they ``leak``
    (different non-empty splits)."""

    a: int
    b: int
    similarity: float
    leak: bool


def near_duplicates(rows: Embeddings, threshold: float = 0.95, neighbours: int = 10,
                    kind: str = "auto") -> list[Pair]:
    """Every unordered pair of rows among each other's ``neighbours`` nearest with cosine similarity
    ``>= threshold``, once; leaks first, then by similarity descending, then by ``(a, b)``.

    Only each row's ``neighbours`` nearest rows are looked at, so a group of more than
    ``neighbours + 1`` copies of one image may miss some of its pairs (each copy still pairs with
    ``neighbours`` others); raise ``neighbours`` for heavily duplicated data.
    """
    if not 0 < threshold <= 1:
        raise ConfigError(f"the similarity threshold must be in (0, 1], got {threshold}")
    if neighbours < 1:
        raise ConfigError(f"neighbours must be at least 1, got {neighbours}")
    n = len(rows)
    if n < 2:
        return []
    index = build_index(rows, kind)
    # +1: a row usually finds itself first (not always: an exact copy may tie with it)
    scores, ids = index.search(rows.vectors, neighbours + 1)
    i = np.repeat(np.arange(n), ids.shape[1])
    j, s = ids.reshape(-1), scores.reshape(-1)
    keep = (j != i) & (s >= threshold)
    a, b, s = np.minimum(i, j)[keep], np.maximum(i, j)[keep], s[keep]
    # a pair seen from both rows once: the higher of its two (float-close) scores
    order = np.lexsort((-s, b, a))
    a, b, s = a[order], b[order], s[order]
    first = np.ones(len(a), dtype=bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    pairs = []
    for x, y, sim in zip(a[first].tolist(), b[first].tolist(), s[first].tolist()):
        sx, sy = rows.splits[x], rows.splits[y]
        pairs.append(Pair(x, y, min(sim, 1.0), bool(sx and sy and sx != sy)))
    pairs.sort(key=lambda p: (not p.leak, -p.similarity, p.a, p.b))
    return pairs


def duplicates_report(rows: Embeddings, pairs: list[Pair], threshold: float) -> dict[str, Any]:
    """JSON-ready: ``images``, ``threshold``, ``pairs`` and ``leaks`` (counts), and ``results``: per
    pair ``a`` / ``b`` (paths), ``similarity`` (6 decimals), ``splits``, ``labels``, ``leak``."""
    results = [{"a": rows.paths[p.a], "b": rows.paths[p.b], "similarity": round(float(p.similarity), 6),
                "splits": [rows.splits[p.a], rows.splits[p.b]], "labels": [rows.labels[p.a], rows.labels[p.b]],
                "leak": p.leak} for p in pairs]
    return {"images": len(rows), "threshold": threshold, "pairs": len(pairs),
            "leaks": sum(p.leak for p in pairs), "results": results}
