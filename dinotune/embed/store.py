"""The embeddings file: one parquet row per image.

Columns ``path`` (string), ``split`` (string, ``""`` outside split folders), ``label`` (string,
``""`` when unlabelled) and ``embedding`` (list<float32>). The schema metadata holds the settings
under ``dinotune`` (JSON): ``model``, ``pool``, ``image_size``, ``in_channels``, ``dim`` and the
dinotune ``version``. A second ``dinotune embed`` into the same file keeps its rows and embeds only
the missing paths, provided the settings (all but the version) are the same; the file is always
rewritten whole, through a temporary file and ``os.replace``, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dinotune.errors import ConfigError, DataError

META_KEY = b"dinotune"
# settings that must agree for a file to be completed rather than refused
SETTINGS = ("model", "pool", "image_size", "in_channels")


@dataclass
class Embeddings:
    """The rows of an embeddings file: ``vectors`` is ``N x D`` float32."""

    paths: list[str]
    splits: list[str]
    labels: list[str]
    vectors: np.ndarray
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.paths)

    def where(self, split: str) -> "Embeddings":
        keep = [i for i, s in enumerate(self.splits) if s == split]
        return Embeddings([self.paths[i] for i in keep], [self.splits[i] for i in keep],
                          [self.labels[i] for i in keep], self.vectors[keep], self.meta)


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow is a dependency
        raise ConfigError("embedding files need pyarrow: pip install 'dinotune[embed]'") from exc
    return pa, pq


def read_embeddings(path: str | Path) -> Embeddings:
    """An embeddings file written by ``write_embeddings``. Raises DataError on other files."""
    pa, pq = _pyarrow()
    path = Path(path).expanduser()
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"{path}: not a readable parquet file ({exc})") from exc
    raw = (table.schema.metadata or {}).get(META_KEY)
    missing = {"path", "split", "label", "embedding"} - set(table.column_names)
    if raw is None or missing:
        raise DataError(f"{path}: not a dinotune embeddings file (written by dinotune embed)")
    meta = json.loads(raw)
    column = table.column("embedding").combine_chunks()
    n = len(table)
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    dim = int(meta.get("dim") or (len(values) // n if n else 0))
    if n and len(values) != n * dim:
        raise DataError(f"{path}: embeddings of different lengths")
    return Embeddings(table.column("path").to_pylist(), table.column("split").to_pylist(),
                      table.column("label").to_pylist(), values.reshape(n, dim), meta)


def write_embeddings(path: str | Path, rows: Embeddings) -> Path:
    """Write ``rows`` to ``path`` atomically (a temporary file beside it, then ``os.replace``)."""
    pa, pq = _pyarrow()
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    vectors = np.ascontiguousarray(rows.vectors, dtype=np.float32)
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    offsets = pa.array(np.arange(len(rows) + 1, dtype=np.int32) * dim, type=pa.int32())
    embedding = pa.ListArray.from_arrays(offsets, flat, type=pa.list_(pa.float32()))
    meta = dict(rows.meta, dim=dim)
    table = pa.table({
        "path": pa.array(rows.paths, type=pa.string()),
        "split": pa.array(rows.splits, type=pa.string()),
        "label": pa.array(rows.labels, type=pa.string()),
        "embedding": embedding,
    }).replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def existing_rows(path: Path, meta: dict[str, Any]) -> Embeddings | None:
    """The rows of ``path`` to keep when completing it with ``meta``'s settings; None when there is
    no file. Refuses (ConfigError) a file made with other settings."""
    if not path.is_file():
        return None
    old = read_embeddings(path)
    differ = [k for k in SETTINGS if old.meta.get(k) != meta.get(k)]
    if differ:
        what = ", ".join(f"{k}={old.meta.get(k)!r} (now {meta.get(k)!r})" for k in differ)
        raise ConfigError(f"{path} was written with other settings: {what}; pass another --out or delete the file")
    return old


def append(old: Embeddings | None, paths: Sequence[str], splits: Sequence[str], labels: Sequence[str],
           vectors: np.ndarray, meta: dict[str, Any]) -> Embeddings:
    """``old``'s rows followed by the new ones, with ``meta`` (the current version)."""
    if old is None or not len(old):
        return Embeddings(list(paths), list(splits), list(labels), np.asarray(vectors, np.float32), meta)
    if len(vectors) == 0:
        return Embeddings(old.paths, old.splits, old.labels, old.vectors, meta)
    return Embeddings(old.paths + list(paths), old.splits + list(splits), old.labels + list(labels),
                      np.concatenate([old.vectors, vectors]).astype(np.float32), meta)
