"""The k-NN evaluation of a pretraining run: the usual way to watch self-supervised training.

Every epoch with ``--val-data`` (labelled ``train/`` and ``val/`` class folders) the backbone's class
tokens of the ``train/`` images classify the ``val/`` images by the DINO k-NN protocol
(``dinotune.ops.knn``), at the run's image size with the evaluation transform. Each process embeds
its shard; the parts are gathered and scored once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dinotune.data.bands import InputSpec, read_input
from dinotune.data.images import readable_images
from dinotune.data.splits import split_dirs
from dinotune.engine.device import autocast, to_device
from dinotune.engine.logging import progress
from dinotune.errors import ConfigError
from dinotune.ops.knn import knn_classify


class KnnImages(Dataset):
    """The labelled images of ``--val-data``: ``{"image", "query" (val: True, train: False), "label"}``."""

    def __init__(self, items: Sequence[tuple[Path, bool, int]], classes: list[str], transform: Any, spec: InputSpec):
        self.items, self.classes, self.transform, self.spec = list(items), classes, transform, spec

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, query, label = self.items[i]
        image = self.transform(read_input(path, layout=self.spec.layout)).as_subclass(torch.Tensor)
        return {"image": image, "query": query, "label": label}


def knn_items(root: Path) -> tuple[list[tuple[Path, bool, int]], list[str]]:
    """``train/`` and ``val/`` class folders of ``root`` -> ``(path, is val, class index)`` and the classes."""
    splits = split_dirs(root)
    if "train" not in splits or "val" not in splits:
        raise ConfigError(f"--val-data {root}: needs train/ and val/ class folders for the k-NN evaluation")
    per_split = {s: {c.name: readable_images(c) for c in sorted(splits[s].iterdir()) if c.is_dir()}
                 for s in ("train", "val")}
    classes = sorted(per_split["train"])
    if len(classes) < 2:
        raise ConfigError(f"--val-data {root}: train/ needs at least two class folders, found {len(classes)}")
    index = {c: i for i, c in enumerate(classes)}
    items = [(p, split == "val", index.get(c, -1)) for split in ("train", "val")
             for c, paths in per_split[split].items() for p in paths]
    return items, classes


@torch.no_grad()
def class_tokens(backbone: Any, loader: DataLoader, device: torch.device, precision: str, show_progress: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(N x D class tokens, N is-val flags, N class indices)`` of this process's ``loader`` (``KnnImages``)."""
    vectors, queries, labels = [], [], []
    for batch in progress(loader, show_progress, desc="k-NN", unit="batch"):
        batch = to_device(batch, device)
        with autocast(device, precision):
            cls = backbone(batch["image"]).cls
        vectors.append(cls.float().cpu().numpy())
        queries.append(batch["query"].cpu().numpy())
        labels.append(batch["label"].cpu().numpy())
    if not vectors:
        return None
    return np.concatenate(vectors), np.concatenate(queries), np.concatenate(labels)


def knn_metrics(parts: Sequence[Any], k: int, temperature: float) -> dict[str, float]:
    """``{"knn_top1", "knn_top5"}`` of every process's ``class_tokens``: val classified by train."""
    parts = [p for p in parts if p is not None]
    vectors = np.concatenate([p[0] for p in parts])
    query = np.concatenate([p[1] for p in parts]).astype(bool)
    labels = [str(x) for x in np.concatenate([p[2] for p in parts])]
    train = [i for i in range(len(labels)) if not query[i]]
    val = [i for i in range(len(labels)) if query[i]]
    k = min(k, len(train))
    scores = knn_classify(vectors[train], [labels[i] for i in train], vectors[val], [labels[i] for i in val],
                          (k,), temperature)[f"k={k}"]
    return {"knn_top1": scores["top1"], "knn_top5": scores["top5"]}
