"""Embedding a list of images, resumably and across ``torchrun`` processes.

One process: the rows of an existing file of the same settings are kept, only missing paths are
embedded, and the file is rewritten after every ``save_every`` images, so a kill loses at most that
many and the next call goes on from there.

Under ``torchrun`` each process embeds every ``world_size``-th missing image into its own part
file (``OUT.parts/part-R-of-W.parquet``, completed the same way when a launch is repeated); once
all are done, process 0 assembles the parts in the one-process order into ``OUT`` and removes
them, so the file does not depend on the number of processes. Without an output file the parts
travel through the process group instead (``knn`` from a model).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dinotune.embed.features import POOLS, Item, embed_images
from dinotune.embed.model import backbone_for, dinotune_version, model_name
from dinotune.embed.store import Embeddings, append, existing_rows, read_embeddings, write_embeddings
from dinotune.engine import distributed
from dinotune.engine.logging import progress as progress_bar
from dinotune.errors import ConfigError
from dinotune.utils import info

# The image size of a backbone spec when none is given (a run uses its own).
DEFAULT_IMAGE_SIZE = 224


def _empty(meta: dict[str, Any]) -> Embeddings:
    return Embeddings([], [], [], np.zeros((0, 0), np.float32), meta)


def parts_folder(out: Path) -> Path:
    """Where the processes of a ``torchrun`` launch keep their parts of ``out``."""
    return out.with_name(out.name + ".parts")


def _assemble(base: Embeddings, todo: Sequence[Item], parts: Sequence[Embeddings], meta: dict[str, Any]
              ) -> Embeddings:
    """``base`` followed by ``todo``'s rows in ``todo``'s order, taken from ``parts``."""
    where: dict[str, tuple[Embeddings, int]] = {}
    for part in parts:
        for i, path in enumerate(part.paths):
            where[path] = (part, i)
    missing = [item.path for item in todo if item.path not in where]
    if missing:  # a process failed before its part was complete
        raise ConfigError(f"{len(missing)} image(s) missing from the processes' parts, e.g. {missing[0]}; "
                          "run the command again to complete them")
    if not todo:
        return append(base, [], [], [], np.zeros((0, 0), np.float32), meta)
    vectors = np.stack([where[item.path][0].vectors[where[item.path][1]] for item in todo])
    return append(base, [i.path for i in todo], [i.split for i in todo], [i.label for i in todo], vectors, meta)


def embed_items(model: str | Path, items: Sequence[Item], *, pool: str, image_size: int | None, batch_size: int,
                workers: int, device: str, progress: bool, out: Path | None = None,
                save_every: int = 4096) -> Embeddings:
    """The embeddings of ``items`` under ``model`` (see ``dinotune.embed.model``), in ``items``'
    order after the rows ``out`` already held. With ``out`` the file is written (and completed when
    it exists); under ``torchrun`` every process returns the whole result."""
    if pool not in POOLS:
        raise ConfigError(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if save_every < 1:
        raise ConfigError(f"save_every must be at least 1, got {save_every}")
    ctx = distributed.current()
    backbone, run_size, bands = backbone_for(model, [Path(i.path) for i in items], device)
    image_size = image_size or run_size or DEFAULT_IMAGE_SIZE
    meta = {"model": model_name(model), "pool": pool, "image_size": int(image_size),
            "in_channels": int(bands.in_channels), "version": dinotune_version()}
    base = (existing_rows(out, meta) if out is not None else None) or _empty(meta)
    done = set(base.paths)
    todo = [i for i in items if i.path not in done]
    if done and ctx.is_main:
        info(f"embed: {out} has {len(done)} rows; embedding the {len(todo)} missing image(s)")
    mine = todo[ctx.rank::ctx.world_size] if ctx.enabled else todo
    target = out
    own = base
    if ctx.enabled:
        own = _empty(meta)
        if out is not None:
            target = parts_folder(out) / f"part-{ctx.rank}-of-{ctx.world_size}.parquet"
            own = existing_rows(target, meta) or own
    have = set(own.paths) if ctx.enabled else done
    work = [i for i in mine if i.path not in have]
    bar = progress_bar(None, progress and ctx.is_main, total=len(work), desc="embed", unit="img")
    try:
        for start in range(0, len(work), save_every):
            part = work[start:start + save_every]
            vectors = embed_images(backbone, [i.path for i in part], image_size, pool=pool, spec=bands,
                                   batch_size=batch_size, workers=workers, bar=bar)
            own = append(own, [i.path for i in part], [i.split for i in part], [i.label for i in part], vectors, meta)
            if target is not None:
                write_embeddings(target, own)
    finally:
        bar.close()
    if not ctx.enabled:
        if out is not None and not work:  # nothing new: the file still gets this version's settings
            write_embeddings(out, append(own, [], [], [], np.zeros((0, 0), np.float32), meta))
        return own
    if out is None:
        return _assemble(base, todo, distributed.gather_objects(own), meta)
    distributed.barrier()
    if ctx.is_main:
        folder = parts_folder(out)
        parts = [existing_rows(p, meta) for p in sorted(folder.glob("part-*.parquet"))]  # same settings only
        write_embeddings(out, _assemble(base, todo, [p for p in parts if p is not None], meta))
        shutil.rmtree(folder, ignore_errors=True)
    distributed.barrier()
    return read_embeddings(out)
