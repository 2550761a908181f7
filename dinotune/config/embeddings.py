"""Defaults of the embedding commands: ``dinotune embed``, ``knn``, ``index``, ``search``,
``duplicates`` and ``map``. Their flags are made from these fields; how a model embeds an image
(``EmbeddingOptions``) is shared by every command that runs one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dinotune.config.base import device_option, opt, threads_option

_MODEL_HELP = "a backbone (--model forms) or a dinotune run folder"


@dataclass
class EmbeddingOptions:
    """How a backbone spec or a run embeds images (an index or an embeddings file keeps its own)."""

    pool: Literal["cls", "mean", "both"] = opt("cls", "cls: class token after the final norm; mean: mean patch "
                                               "token; both: the two concatenated")
    image_size: int = opt(224, "crop size in pixels for a backbone spec (a run uses its own --image-size)", ge=1)
    batch_size: int = opt(32, "images per forward pass", ge=1)
    workers: int = opt(0, "data-loading worker processes", ge=0)
    device: str = device_option()
    threads: int = threads_option()


@dataclass
class EmbedConfig(EmbeddingOptions):
    """Defaults of ``dinotune embed`` (one embedding per image into a parquet file)."""

    model: str = opt("", _MODEL_HELP, positional=True, metavar="MODEL")
    data: str = opt("", "a folder: train/ val/ split folders and / or class folders, or a plain folder of images",
                    positional=True, metavar="DATA")
    out: str = opt("", "the parquet file to write; an existing one of the same settings is completed "
                   "(only missing images are embedded)", required=True)


@dataclass
class KnnConfig(EmbeddingOptions):
    """Defaults of ``dinotune knn`` (the DINO k-NN protocol)."""

    source: str = opt("", "a backbone (--model forms), a dinotune run folder, or an embeddings .parquet file "
                      "written by dinotune embed", positional=True, metavar="MODEL")
    data: str = opt("", "train/ and val/ class folders to embed (not needed with an embeddings file)")
    k: list[int] = opt([10, 20, 100, 200], "neighbour counts to score, one result each", ge=1)
    temperature: float = opt(0.07, "vote weight exp(similarity / T)", gt=0)
    out: str = opt("", "the JSON result file", default_text="EMB.knn.json beside an embeddings file, RUN/knn.json "
                   "in a run, else knn.json")


@dataclass
class IndexConfig:
    """Defaults of ``dinotune index`` (a FAISS index of an embeddings file)."""

    embeddings: str = opt("", "an embeddings .parquet file written by dinotune embed", positional=True,
                          metavar="EMB")
    out: str = opt("", "the index folder to write (index.faiss, items.parquet, index.json)", required=True)
    kind: Literal["auto", "flat", "hnsw"] = opt("auto", "flat: exact inner product; hnsw: approximate graph "
                                                "search; auto: exact up to a size measured in benchmarks/")
    threads: int = threads_option()


@dataclass
class SearchConfig:
    """Defaults of ``dinotune search`` (the nearest images of an index to query images)."""

    index: str = opt("", "an index folder written by dinotune index", positional=True, metavar="INDEX")
    images: list[str] = opt([], "query image files and / or folders", positional=True)
    k: int = opt(10, "hits per query", ge=1)
    out: str = opt("", "also write the JSON result to this file", default_text="printed only")
    picture: str = opt("search.png", "the picture of each query beside its hits (a PNG path; '' for none)")
    batch_size: int = opt(32, "query images per forward pass", ge=1)
    device: str = device_option()
    threads: int = threads_option()


@dataclass
class DuplicatesConfig(EmbeddingOptions):
    """Defaults of ``dinotune duplicates`` (near-duplicate images, leaks across splits first)."""

    data: str = opt("", "a data folder (split and / or class folders, or plain) or an embeddings .parquet file",
                    positional=True, metavar="DATA")
    model: str = opt("facebook/dinov2-small", _MODEL_HELP + " (unused with an embeddings file)")
    threshold: float = opt(0.95, "report pairs whose cosine similarity is at least this", gt=0, le=1)
    neighbours: int = opt(10, "nearest images examined per image (a group of more copies may miss pairs)", ge=1)
    out: str = opt("duplicates.json", "the JSON report of every pair")
    show: int = opt(20, "pairs printed", ge=0)


@dataclass
class MapConfig(EmbeddingOptions):
    """Defaults of ``dinotune map`` (a 2-D picture of a dataset's embeddings and its outliers)."""

    data: str = opt("", "a data folder (class folders give the colours) or an embeddings .parquet file",
                    positional=True, metavar="DATA")
    model: str = opt("facebook/dinov2-small", _MODEL_HELP + " (unused with an embeddings file)")
    out: str = opt("map.png", "the picture; the outliers are written beside it as JSON (same name, .json)")
    method: Literal["auto", "pca", "umap"] = opt("auto", "the projection: pca, umap (pip install umap-learn) or "
                                                 "auto (umap when installed)")
    outliers: int = opt(20, "list this many images farthest from their class", ge=0)
    seed: int = opt(0, "random seed of UMAP")
