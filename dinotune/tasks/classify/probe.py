"""Linear-probe fast path: frozen-backbone features extracted once, cached on disk, reused.

With ``--adapter none`` and no augmentation, the backbone computes the same features every
epoch; running it once and training the head on the cache gives the same result as the online
path at a fraction of the cost. The cache key covers the base weights, the image size, the
pooling and every file (path, size, modification time), so a stale cache is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from dinotune.data.images import READER_VERSION
from dinotune.data.loader import make_loader
from dinotune.engine.device import autocast, to_device
from dinotune.engine.logging import progress
from dinotune.utils import file_mode, info


class FeatureDataset(Dataset):
    """Items ``{"features": D tensor, "label": int, "index": int}`` from an ``N x D`` matrix."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features = features
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"features": self.features[index], "label": int(self.labels[index]), "index": index}


def dataset_signature(dataset: Dataset) -> list[Any]:
    """What identifies the images of a dataset: paths with size and mtime, or the HF fingerprint."""
    items = getattr(dataset, "items", None)
    if items is not None:
        out = []
        for path, label in items:
            st = Path(path).stat()
            out.append([str(Path(path).resolve()), st.st_size, st.st_mtime_ns, label])
        return out
    ds = getattr(dataset, "ds", None)
    return [getattr(ds, "_fingerprint", None), len(dataset)]


@torch.no_grad()
def extract_features(model: torch.nn.Module, dataset: Dataset, *, batch_size: int, workers: int,
                     device: torch.device, precision: str, show_progress: bool = True,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model.features`` over ``dataset`` in order: ``N x D`` float32 features, ``N`` labels."""
    model.eval()
    loader = make_loader(dataset, batch_size, shuffle=False, workers=workers)
    feats, labels = [], []
    for batch in progress(loader, show_progress, desc="extracting features"):
        images = to_device(batch["image"], device)
        with autocast(device, precision):
            feats.append(model.features(images).float().cpu())
        labels.append(batch["label"])
    return torch.cat(feats), torch.cat(labels)


def cached_features(model: torch.nn.Module, dataset: Dataset, *, cache_dir: Path, split: str,
                    key_parts: dict[str, Any], batch_size: int, workers: int, device: torch.device,
                    precision: str, show_progress: bool = True) -> FeatureDataset:
    """Features of ``dataset`` from the cache, extracting and storing them on a miss."""
    # the reader's version too: a cache made before a change in how files become pixels (EXIF
    # orientation, 16-bit scaling) must not be reused
    blob = json.dumps({**key_parts, "precision": precision, "reader": READER_VERSION,
                       "items": dataset_signature(dataset)}, sort_keys=True, default=str)
    key = hashlib.sha1(blob.encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"{split}-{key}.safetensors"
    if path.is_file():
        tensors = load_file(str(path))
        info(f"{split}: {len(tensors['labels'])} cached features from {path}")
        return FeatureDataset(tensors["features"], tensors["labels"])
    feats, labels = extract_features(model, dataset, batch_size=batch_size, workers=workers,
                                     device=device, precision=precision, show_progress=show_progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    save_file({"features": feats.contiguous(), "labels": labels.contiguous()}, str(tmp))
    os.chmod(tmp, file_mode())  # safetensors writes 0600; a shared cache must be readable by the team
    os.replace(tmp, path)  # readers never see half a cache file
    info(f"{split}: cached {len(labels)} x {feats.shape[1]} features in {path}")
    return FeatureDataset(feats, labels)
