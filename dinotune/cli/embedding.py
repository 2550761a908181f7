"""The embedding commands: ``embed``, ``knn``, ``index``, ``search``, ``duplicates`` and ``map``
(their parsers, from ``dinotune.config.embeddings``, and what each prints)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dinotune.cli.flags import add_config_flags, command_config
from dinotune.config.embeddings import (
    DuplicatesConfig,
    EmbedConfig,
    IndexConfig,
    KnnConfig,
    MapConfig,
    SearchConfig,
)


def _embedding_options(cfg: Any, given: set[str]) -> dict[str, Any]:
    """How the command's model embeds: ``--image-size`` is the size for a backbone spec, so a run
    folder keeps its own unless the flag is given."""
    return {"pool": cfg.pool, "image_size": cfg.image_size if "image_size" in given else None,
            "batch_size": cfg.batch_size, "workers": cfg.workers, "device": _device(cfg.device)}


def _device(device: str) -> str:
    """Under torchrun each process embeds its share of the images on its own device."""
    from dinotune.cli.commands import _process_device
    from dinotune.engine import distributed

    return _process_device(device, distributed.setup(device))


def _main_process() -> bool:
    from dinotune.engine import distributed

    return distributed.current().is_main


def cmd_embed(ns: argparse.Namespace) -> int:
    from dinotune import api

    cfg, given = command_config(ns, EmbedConfig)
    path = api.embed(cfg.model, cfg.data, cfg.out, progress=True, **_embedding_options(cfg, given))
    if _main_process():
        print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_knn(ns: argparse.Namespace) -> int:
    from dinotune import api

    cfg, given = command_config(ns, KnnConfig)
    result = api.knn(cfg.source, data=cfg.data or None, k=cfg.k, temperature=cfg.temperature, progress=True,
                     out=cfg.out or None, **_embedding_options(cfg, given))
    if _main_process():
        print(json.dumps(result, indent=2))
    return 0


def cmd_index(ns: argparse.Namespace) -> int:
    from dinotune import api

    cfg, _ = command_config(ns, IndexConfig)
    print(f"wrote {api.build_index(cfg.embeddings, cfg.out, kind=cfg.kind)}", file=sys.stderr)
    return 0


def cmd_search(ns: argparse.Namespace) -> int:
    from dinotune import api
    from dinotune.utils import atomic_write_text

    cfg, _ = command_config(ns, SearchConfig)
    results = api.search(cfg.index, [Path(p) for p in cfg.images], k=cfg.k, picture=cfg.picture or None,
                         batch_size=cfg.batch_size, device=cfg.device)
    text = json.dumps(results, indent=2) + "\n"
    if cfg.out:
        atomic_write_text(Path(cfg.out), text)
        print(f"wrote {cfg.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if cfg.picture:
        print(f"wrote {cfg.picture}", file=sys.stderr)
    return 0


def cmd_duplicates(ns: argparse.Namespace) -> int:
    from dinotune import api

    cfg, given = command_config(ns, DuplicatesConfig)
    report = api.duplicates(cfg.data, model=cfg.model, threshold=cfg.threshold, neighbours=cfg.neighbours,
                            out=cfg.out or None, progress=True, **_embedding_options(cfg, given))
    if not _main_process():
        return 0
    print(f"{report['pairs']} pair(s) of {report['images']} images at cosine similarity >= {cfg.threshold:g}, "
          f"{report['leaks']} across splits (leakage)")
    for pair in report["results"][:cfg.show]:
        where = f"LEAK {pair['splits'][0]}/{pair['splits'][1]}" if pair["leak"] else "    "
        print(f"  {pair['similarity']:.4f}  {where:<16} {pair['a']}  {pair['b']}")
    if report["pairs"] > cfg.show:
        print(f"  ... {report['pairs'] - cfg.show} more")
    if cfg.out:
        print(f"wrote {cfg.out}", file=sys.stderr)
    return 0


def cmd_map(ns: argparse.Namespace) -> int:
    from dinotune import api

    cfg, given = command_config(ns, MapConfig)
    result = api.dataset_map(cfg.data, model=cfg.model, out=cfg.out, method=cfg.method, outliers=cfg.outliers,
                             seed=cfg.seed, progress=True, **_embedding_options(cfg, given))
    print(f"{result['images']} images, {result['classes']} classes, projected by {result['method']}")
    for row in result["outliers"][:10]:
        print(f"  outlier z={row['z']:.2f}  {row['label']:<20} {row['path']}")
    print(f"wrote {result['picture']} and {result['file']}", file=sys.stderr)
    return 0


def add_embedding_parsers(sub: Any) -> None:
    """The embedding commands on the ``dinotune`` sub-command parser ``sub``."""
    commands = [
        ("embed", EmbedConfig, cmd_embed, "one embedding per image into a parquet file (any backbone or run)",
         "One embedding per image (the class token after the final norm, the mean patch token, or both) into a "
         "parquet file with the columns path, split, label and embedding; a second call completes the file. Under "
         "torchrun the images are shared out between the processes."),
        ("knn", KnnConfig, cmd_knn, "the DINO k-NN accuracy of a backbone, a run or an embeddings file",
         "val/ images classified by their k nearest train/ images (cosine similarity, votes weighted "
         "exp(sim / T)); top-1 and top-5 per k, printed and saved as JSON."),
        ("index", IndexConfig, cmd_index, "a FAISS similarity index of an embeddings file",
         "A FAISS index of an embeddings file (exact inner product, or HNSW for large sets) with the paths it "
         "maps to and the model that made it, for dinotune search and dinotune serve --index."),
        ("search", SearchConfig, cmd_search, "the images of an index most similar to query images",
         "Each query image embedded with the index's model, its k most similar indexed images (path, score), "
         "as JSON and as a picture of the query beside its hits."),
        ("duplicates", DuplicatesConfig, cmd_duplicates, "near-duplicate images, train / val leakage first",
         "Pairs of images whose embeddings' cosine similarity is at least --threshold; pairs across splits "
         "(leakage between train and val) are listed first."),
        ("map", MapConfig, cmd_map, "a 2-D map of a dataset's embeddings, coloured by class, with outliers",
         "The embeddings projected to 2-D (PCA, or UMAP when installed) as a picture coloured by label, and the "
         "images farthest from their class listed."),
    ]
    for name, config, func, help_text, description in commands:
        parser = sub.add_parser(name, help=help_text, description=description)
        add_config_flags(parser, config)
        parser.set_defaults(func=func)
