"""The embedding commands as Python calls (``dinotune.api`` re-exports them): ``embed``, ``knn``,
``build_index``, ``search``, ``duplicates`` and ``dataset_map``.

A model is a backbone spec or a dinotune run folder (``dinotune.embed.model``); a source may also
be an embeddings ``.parquet`` file written by ``embed``, so a large folder is embedded once and
scored, searched, de-duplicated and mapped from that file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from dinotune.config.embeddings import (
    DuplicatesConfig,
    EmbedConfig,
    IndexConfig,
    KnnConfig,
    MapConfig,
    SearchConfig,
)
from dinotune.embed.features import Item, find_items
from dinotune.embed.model import model_name
from dinotune.embed.pipeline import embed_items
from dinotune.embed.store import Embeddings, read_embeddings
from dinotune.engine import distributed
from dinotune.engine.run_folder import RunLayout
from dinotune.errors import ConfigError
from dinotune.utils import info, write_json

_E = EmbedConfig


def embed(model: str | Path, data: str | Path | Sequence[str | Path], out: str | Path, *,
          pool: str = _E.pool, image_size: int | None = None, batch_size: int = _E.batch_size,
          workers: int = _E.workers, device: str = _E.device, progress: bool = True,
          save_every: int = 4096) -> Path:
    """One embedding per image of ``data`` (``dinotune embed``) into the parquet file ``out``.

    ``model``: a backbone spec or a dinotune run folder (its backbone, adapter merged, at its own
    ``backbone.image_size`` unless ``image_size`` is given; a spec defaults to
    ``EmbedConfig.image_size``). ``data``: a folder with split folders (``train/``, ``val/``, ...)
    and / or class folders, a plain folder, or files (see ``dinotune.embed.features``). ``pool``:
    ``cls`` (class token after the final norm), ``mean`` (the mean patch token) or ``both``
    (concatenated). An existing ``out`` made with the same settings is completed: its rows are
    kept and only missing paths embedded (a file of other settings is refused). Under ``torchrun``
    the images are shared out between the processes and the file is the one-process file. The
    format is described in ``dinotune.embed.store``. Returns ``out``."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; name the .parquet file to write")
    embed_items(model, find_items(data), pool=pool, image_size=image_size, batch_size=batch_size,
                workers=workers, device=device, progress=progress, out=out, save_every=save_every)
    return out


def is_embeddings_file(source: str | Path) -> bool:
    path = Path(source).expanduser()
    return path.is_file() and path.suffix.lower() == ".parquet"


def _data_rows(data: str | Path, model: str | Path, *, what: str, splits: Sequence[str] = (),
               **options: Any) -> Embeddings:
    """The rows of ``data``: an embeddings file as written, or a data folder embedded by ``model``
    (only the ``splits`` named, when any)."""
    if is_embeddings_file(data):
        return read_embeddings(data)
    if not Path(data).expanduser().exists():
        raise ConfigError(f"{what}: {data} does not exist")
    return embed_items(model, [i for i in find_items(data) if not splits or i.split in splits], **options)


def _knn_out(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if is_embeddings_file(path):
        return path.with_suffix(".knn.json")
    return path / "knn.json" if RunLayout.is_run(path) else Path("knn.json")


def knn(source: str | Path, *, data: str | Path | None = None, k: Sequence[int] = tuple(KnnConfig().k),
        temperature: float = KnnConfig.temperature, pool: str = _E.pool, image_size: int | None = None,
        batch_size: int = _E.batch_size, workers: int = _E.workers, device: str = _E.device,
        progress: bool = True, out: str | Path | None = None, save: bool = True) -> dict[str, Any]:
    """The DINO k-NN protocol (``dinotune knn``): the ``val`` embeddings classified by their ``k``
    nearest ``train`` embeddings (cosine similarity of L2-normalised embeddings, each neighbour
    voting with weight ``exp(sim / temperature)``; see ``dinotune.ops.knn``).

    ``source``: a backbone spec or run folder, whose embeddings of ``data``'s ``train/`` and ``val/``
    class folders are computed (``pool``, ``image_size``, ... as for ``embed``), or a ``.parquet``
    file written by ``embed`` (``data`` then unused). Returns ``{"k=K": {"top1", "top5"}, ...,
    "train": n, "val": n, "classes": n, "temperature": T, "source": ..., "file": ...}``, also
    written as JSON to ``out`` (default: ``EMB.knn.json`` beside an embeddings file,
    ``RUN/knn.json`` in a run folder, else ``knn.json``; ``save=False`` writes nothing)."""
    from dinotune.ops.knn import knn_classify

    ks = [int(x) for x in k]
    if not ks:
        raise ConfigError("--k needs at least one value")
    if not data and not is_embeddings_file(source):
        raise ConfigError("knn: give a data folder to embed with the model, or an embeddings .parquet file")
    rows = _data_rows(source if is_embeddings_file(source) else data, source, what="knn", splits=("train", "val"),
                      pool=pool, image_size=image_size, batch_size=batch_size, workers=workers, device=device,
                      progress=progress)
    train, val = rows.where("train"), rows.where("val")
    if not len(train) or not len(val):
        raise ConfigError(f"knn: needs train and val images with labels (class folders under train/ and val/); "
                          f"got {len(train)} train and {len(val)} val")
    if any(label == "" for label in train.labels + val.labels):
        raise ConfigError("knn: some train / val images have no label (images outside class folders)")
    result: dict[str, Any] = knn_classify(train.vectors, train.labels, val.vectors, val.labels, ks, temperature)
    result.update(train=len(train), val=len(val), classes=len(set(train.labels)), temperature=temperature,
                  source=str(Path(source).expanduser()) if is_embeddings_file(source) else model_name(source),
                  model=rows.meta.get("model"), pool=rows.meta.get("pool"), image_size=rows.meta.get("image_size"))
    if save and distributed.current().is_main:
        path = Path(out).expanduser() if out else _knn_out(source)
        result["file"] = str(path)
        write_json(path, result)
    return result


def build_index(embeddings: str | Path, out: str | Path, *, kind: str = IndexConfig.kind) -> Path:
    """A FAISS index of an embeddings file (``dinotune index``) written into the folder ``out``:
    ``index.faiss`` (``faiss.write_index``), ``items.parquet`` (the path, split and label of each
    row) and ``index.json`` (the model and settings, so ``search`` embeds its queries alike).
    ``kind``: ``flat`` (exact), ``hnsw`` (approximate) or ``auto`` (exact up to
    ``dinotune.embed.index.EXACT_LIMIT`` rows). Returns ``out``."""
    from dinotune.embed import index as vector_index

    if not is_embeddings_file(embeddings):
        raise ConfigError(f"{embeddings}: not an embeddings .parquet file (write one with dinotune embed)")
    built = vector_index.build_index(read_embeddings(embeddings), kind=kind)
    out = vector_index.save_index(built, Path(out).expanduser())
    info(f"index: {len(built)} vectors, {built.meta['kind']} ({'exact' if built.meta['kind'] == 'flat' else 'approximate'})")
    return out


def search(index: str | Path, images: str | Path | Sequence[str | Path], *, k: int = SearchConfig.k,
           picture: str | Path | None = SearchConfig.picture, batch_size: int = SearchConfig.batch_size,
           device: str = SearchConfig.device, progress: bool = False) -> list[dict[str, Any]]:
    """The ``k`` images of ``index`` (a folder written by ``build_index``) most similar to each
    query image (``dinotune search``), the queries embedded with the index's model and settings.
    Returns one ``{"query": path, "hits": [{"rank", "path", "score", "label", "split"}, ...]}``
    per query, hits by cosine similarity, highest first (a query that is in the index comes first,
    with score 1). With ``picture`` (a PNG path) each query is drawn beside its hits."""
    from dinotune.data.images import readable_images
    from dinotune.embed import index as vector_index

    found = vector_index.load_index(Path(index).expanduser())
    meta = found.meta
    queries = [Item(str(p.absolute()), "", "") for p in readable_images(images)]
    rows = embed_items(meta["model"], queries, pool=meta["pool"], image_size=int(meta["image_size"]),
                       batch_size=batch_size, workers=0, device=device, progress=progress)
    if rows.vectors.shape[1] != int(meta["dim"]):
        raise ConfigError(f"the queries embed to {rows.vectors.shape[1]} values, the index holds {meta['dim']}")
    scores, ids = found.search(rows.vectors, k)
    results = [{"query": q.path, "hits": [
        {"rank": r + 1, "path": found.paths[i], "score": round(float(s), 6), "label": found.labels[i],
         "split": found.splits[i]} for r, (s, i) in enumerate(zip(row_scores, row_ids))]}
        for q, row_scores, row_ids in zip(queries, scores, ids)]
    if picture:
        from dinotune.embed.pictures import search_picture

        search_picture(results, Path(picture).expanduser())
    return results


def duplicates(data: str | Path, *, model: str | Path = DuplicatesConfig.model,
               threshold: float = DuplicatesConfig.threshold, neighbours: int = DuplicatesConfig.neighbours,
               out: str | Path | None = DuplicatesConfig.out, pool: str = _E.pool, image_size: int | None = None,
               batch_size: int = _E.batch_size, workers: int = _E.workers, device: str = _E.device,
               progress: bool = True) -> dict[str, Any]:
    """Near-duplicate images of ``data`` (``dinotune duplicates``): every pair whose cosine
    similarity is at least ``threshold`` among each image's ``neighbours`` nearest, pairs across
    splits (train / val leakage) first, then by similarity. ``data``: a data folder embedded by
    ``model``, or an embeddings file. Returns the report of
    ``dinotune.embed.duplicates.duplicates_report``, written as JSON to ``out`` when given."""
    from dinotune.embed.duplicates import duplicates_report, near_duplicates

    rows = _data_rows(data, model, what="duplicates", pool=pool, image_size=image_size, batch_size=batch_size,
                      workers=workers, device=device, progress=progress)
    report = duplicates_report(rows, near_duplicates(rows, threshold=threshold, neighbours=neighbours), threshold)
    if out and distributed.current().is_main:
        write_json(Path(out).expanduser(), report)
    return report


def dataset_map(data: str | Path, *, model: str | Path = MapConfig.model, out: str | Path = MapConfig.out,
                method: str = MapConfig.method, outliers: int = MapConfig.outliers, seed: int = MapConfig.seed,
                pool: str = _E.pool, image_size: int | None = None, batch_size: int = _E.batch_size,
                workers: int = _E.workers, device: str = _E.device, progress: bool = True) -> dict[str, Any]:
    """A map of ``data`` (``dinotune map``): its embeddings projected to 2-D (PCA, or UMAP when
    installed) drawn as a PNG at ``out``, coloured by label, with the ``outliers`` images farthest
    from their class listed and ringed (see ``dinotune.embed.projection``). ``data``: a data
    folder embedded by ``model``, or an embeddings file. Returns ``{"picture", "method", "images",
    "classes", "outliers": [...], "file"}``; the same is written beside the picture as JSON."""
    from dinotune.embed.projection import dataset_map as draw_map

    rows = _data_rows(data, model, what="map", pool=pool, image_size=image_size, batch_size=batch_size,
                      workers=workers, device=device, progress=progress)
    out = Path(out).expanduser()
    if out.is_dir() or not out.suffix:
        out = out / "map.png"
    result = draw_map(rows, out, method=method, top=outliers, seed=seed)
    result["file"] = str(out.with_suffix(".json"))
    write_json(out.with_suffix(".json"), result)
    return result
