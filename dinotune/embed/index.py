"""A FAISS similarity index over the rows of an embeddings file, and its folder on disk.

Vectors are L2-normalised float32, so the inner product FAISS ranks by is the cosine similarity.
Two kinds: ``flat`` (``IndexFlatIP``) compares the query with every row, exact and instant to
build; ``hnsw`` (``IndexHNSWFlat``) walks a neighbour graph, approximate but its query time barely
grows with the row count. ``auto`` takes the exact index while one query stays a few milliseconds
(``EXACT_LIMIT``) and the graph above: see ``benchmarks/results/search-cpu.md``.

An index folder holds ``index.faiss`` (the FAISS index), ``items.parquet`` (path, split, label of
each row, in row order) and ``index.json`` (the embedding settings, the kind, the count, the graph
parameters, ``"format": 1``). Each file is written atomically and ``index.json`` last, so a folder
with ``index.json`` is complete. ``load_index`` treats the folder as untrusted: every file is
checked against ``index.json``, and ``index.faiss`` must be no larger than its claims allow before
FAISS reads it (FAISS's reader is not hardened against hostile files; the bound keeps memory to
what the row count and width explain).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinotune.embed.store import SETTINGS, Embeddings, _pyarrow
from dinotune.errors import ConfigError, DataError

KINDS = ("auto", "flat", "hnsw")
# One exact query (flat, 2 OpenMP threads) on the 2-core benchmark machine, median over 300
# (benchmarks/results/search-cpu.md): 1.6 ms at 10k x 384, 3.1 ms at 20k, 7.6 ms at 50k, 27 ms at
# 200k; 768 values: 2.2 ms at 10k, 5.1 ms at 20k, 12.8 ms at 50k. Up to 20k rows one exact answer
# stays well under 10 ms at either width and needs no build, so auto is exact there. A run beside
# other jobs (load ~3) measured exact queries 2-3x slower (64 ms at 200k); the graph barely moved.
EXACT_LIMIT = 20_000
# Graph parameters (same file): efConstruction 40 builds 200k x 384 in ~21 s; efSearch 128 finds
# recall@10 0.981 there (64: 0.957, 256: 0.982) at 0.28 ms a query, ~95x faster than exact.
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
HNSW_EF_SEARCH = 128
FORMAT = 1
FILES = ("index.faiss", "items.parquet", "index.json")


def _faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ConfigError("similarity search needs faiss: pip install 'dinotune[embed]'") from exc
    return faiss


def _normalise(x: np.ndarray) -> np.ndarray:
    """``x`` (N x D) as contiguous float32 rows of unit length; zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norm > 0, norm, 1.0), dtype=np.float32)


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force reference: ``(scores, ids)``, each ``Q x min(k, N)``, of the cosine-nearest rows
    of ``vectors`` (N x D) to each query (Q x D), descending; equal scores keep row order."""
    v, q = _normalise(vectors), _normalise(np.atleast_2d(queries))
    k = min(k, len(v))
    scores, ids = np.empty((len(q), k), dtype=np.float32), np.empty((len(q), k), dtype=np.int64)
    chunk = max(1, 2**25 // max(len(v), 1))  # ~128 MB of similarities at a time
    for start in range(0, len(q), chunk):
        sim = q[start:start + chunk] @ v.T
        top = np.argsort(-sim, axis=1, kind="stable")[:, :k]  # ties: the earlier row first
        scores[start:start + chunk], ids[start:start + chunk] = np.take_along_axis(sim, top, axis=1), top
    return scores, ids


@dataclass
class VectorIndex:
    """A FAISS ``index`` over rows ``0..count-1`` with each row's ``paths`` / ``splits`` / ``labels``.

    ``meta``: the embedding settings (``model``, ``pool``, ``image_size``, ``in_channels``, ``dim``),
    ``kind`` (``"flat"`` / ``"hnsw"``), ``count``, and for ``hnsw`` ``M``, ``efConstruction``, ``efSearch``.
    """

    index: Any
    paths: list[str]
    splits: list[str]
    labels: list[str]
    meta: dict[str, Any]

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)``: the ``k' = min(k, count)`` most cosine-similar rows to each query
        (``Q x D``, or one ``D`` vector), as ``Q x k'`` float32 descending and ``Q x k'`` int64."""
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        q = np.asarray(queries, dtype=np.float32)
        q = q[None] if q.ndim == 1 else q
        dim = int(self.index.d)
        if q.ndim != 2 or q.shape[1] != dim:
            raise ConfigError(f"queries of shape {tuple(np.shape(queries))} do not fit this index of {dim}-dimensional "
                              f"embeddings (model {self.meta.get('model')}); embed them with the same model")
        if not np.isfinite(q).all():
            raise ConfigError("a query holds NaN or infinite values")
        k = min(k, len(self))
        faiss, params = _faiss(), None
        if isinstance(self.index, faiss.IndexHNSWFlat) and k > self.index.hnsw.efSearch:
            # the graph keeps only efSearch candidates: fewer than k would leave -1 padding
            params = faiss.SearchParametersHNSW(efSearch=k)
        scores, ids = self.index.search(_normalise(q), k, params=params)
        missing = (ids < 0).any(axis=1)
        if missing.any():  # the graph found fewer than k rows (a sparse corner): answer those exactly
            rows = self.index.reconstruct_n(0, len(self))
            scores[missing], ids[missing] = exact_neighbours(rows, q[missing], k)
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)


def build_index(rows: Embeddings, kind: str = "auto") -> VectorIndex:
    """An index over ``rows.vectors`` (N x D): exact up to ``EXACT_LIMIT`` rows with ``auto``."""
    if kind not in KINDS:
        raise ConfigError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")
    n = len(rows)
    if n == 0:
        raise ConfigError("the embeddings file has no rows: there is nothing to index")
    vectors = np.asarray(rows.vectors)
    if vectors.ndim != 2 or len(vectors) != n:
        raise DataError(f"{n} rows but embeddings of shape {vectors.shape}")
    if not np.isfinite(vectors).all():
        bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
        raise DataError(f"{len(bad)} embeddings hold NaN or infinite values, the first of {rows.paths[bad[0]]}")
    faiss = _faiss()
    kind = kind if kind != "auto" else ("flat" if n <= EXACT_LIMIT else "hnsw")
    dim = vectors.shape[1]
    meta = {key: rows.meta.get(key) for key in SETTINGS}
    meta.update(dim=dim, kind=kind, count=n)
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
        meta.update(M=HNSW_M, efConstruction=HNSW_EF_CONSTRUCTION, efSearch=HNSW_EF_SEARCH)
    index.add(_normalise(vectors))
    return VectorIndex(index, list(rows.paths), list(rows.splits), list(rows.labels), meta)


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, then ``os.replace`` it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _ours(name: str) -> bool:
    """An index file, or the temporary name ``_atomic`` writes it under."""
    return name in FILES or any(name.startswith(f".{f}.") and name.endswith(".tmp") for f in FILES)


def is_index(folder: str | Path) -> bool:
    """Whether ``folder`` holds an ``index.json`` with a ``format`` key (written by ``save_index``)."""
    try:
        meta = json.loads((Path(folder).expanduser() / "index.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "format" in meta


def save_index(index: VectorIndex, folder: str | Path) -> Path:
    """Write ``index`` into ``folder`` (created; an earlier index folder is overwritten, a folder
    holding anything else is refused) and return the folder."""
    pa, pq = _pyarrow()
    faiss = _faiss()
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file; pass a folder for the index")
    # an index folder, or one a crashed save left with only index files in it, may be overwritten
    others = [p.name for p in folder.iterdir() if not _ours(p.name)] if folder.is_dir() else []
    if others and not is_index(folder):
        raise ConfigError(f"{folder} holds other files ({', '.join(sorted(others)[:3])}); "
                          "pass a new or empty folder for the index")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.json").unlink(missing_ok=True)  # incomplete until the new one is written
    _atomic(folder / "index.faiss", lambda tmp: faiss.write_index(index.index, str(tmp)))
    items = pa.table({name: pa.array(values, type=pa.string()) for name, values in
                      (("path", index.paths), ("split", index.splits), ("label", index.labels))})
    _atomic(folder / "items.parquet", lambda tmp: pq.write_table(items, tmp))
    meta = dict(index.meta, format=FORMAT, count=len(index))
    if meta.get("kind") == "hnsw":  # the value in use, should it have been tuned on the object
        meta["efSearch"] = int(index.index.hnsw.efSearch)
    _atomic(folder / "index.json", lambda tmp: tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n"))
    return folder


def _claims(path: Path) -> dict[str, Any]:
    """index.json's meta, its keys checked (DataError naming the file and key otherwise)."""
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise DataError(f"{path}: missing; not an index folder (written by save_index)") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object")
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: format {meta.get('format')!r} is not {FORMAT}, the one this dinotune reads")
    if meta.get("kind") not in ("flat", "hnsw"):
        raise DataError(f"{path}: 'kind' must be 'flat' or 'hnsw', got {meta.get('kind')!r}")
    # ranges wide enough for any real index, narrow enough that the size bound below stays meaningful
    whole = {"count": (1, 2**31 - 1), "dim": (1, 2**16)}
    whole |= {"M": (2, 256), "efSearch": (1, 2**16)} if meta.get("kind") == "hnsw" else {}
    for key, (low, high) in whole.items():
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise DataError(f"{path}: {key!r} must be a whole number from {low} to {high}, got {value!r}")
    return meta


def load_index(folder: str | Path) -> VectorIndex:
    """The index ``save_index`` wrote to ``folder``; DataError naming the file when one is missing,
    malformed, or disagrees with ``index.json``."""
    pa, pq = _pyarrow()
    faiss = _faiss()
    folder = Path(folder).expanduser()
    meta = _claims(folder / "index.json")
    count, dim = meta["count"], meta["dim"]
    for name in FILES:
        if not (folder / name).is_file():
            raise DataError(f"{folder / name}: missing; the index folder is incomplete")
    path = folder / "items.parquet"
    try:
        items = pq.read_table(path, columns=["path", "split", "label"])
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: not a readable items table with path, split, label ({exc})") from exc
    if len(items) != count:
        raise DataError(f"{path}: {len(items)} rows but index.json says {count}")
    columns = {name: items.column(name).to_pylist() for name in ("path", "split", "label")}
    if not all(isinstance(v, str) for values in columns.values() for v in values):
        raise DataError(f"{path}: path, split and label must all be strings")
    path = folder / "index.faiss"
    # the vectors, plus room for the graph's links (2M per row on level 0, far fewer above) and slack
    bound = count * dim * 4 + count * (meta.get("M", 0) * 2 * 2 * 8 + 64) + 2**20
    size = path.stat().st_size
    if size > bound:
        raise DataError(f"{path}: {size} bytes, more than the {bound} that index.json's {count} rows of "
                        f"{dim} values allow; the folder is damaged or not from save_index")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as exc:
        raise DataError(f"{path}: not a readable FAISS index ({str(exc).splitlines()[0][:300]})") from exc
    hnsw = meta["kind"] == "hnsw"
    if (index.ntotal, index.d) != (count, dim) or index.metric_type != faiss.METRIC_INNER_PRODUCT \
            or not isinstance(index, faiss.IndexHNSWFlat if hnsw else faiss.IndexFlat):
        raise DataError(f"{path}: {index.ntotal} vectors of {index.d} values ({type(index).__name__}), but "
                        f"index.json says {count} of {dim} ({meta['kind']}, inner product)")
    if hnsw:
        index.hnsw.efSearch = meta["efSearch"]
    return VectorIndex(index, columns["path"], columns["split"], columns["label"], meta)
