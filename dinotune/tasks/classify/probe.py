"""Linear-probe fast path: frozen-backbone features extracted once, cached on disk, reused.

With ``--adapter none`` and no augmentation, the backbone computes the same features every
epoch; running it once and training the head on the cache gives the same result as the online
path at a fraction of the cost. The cache key covers the base weights, the image size, the
pooling and every file (path, size, modification time), so a stale cache is never read. A cache
file that does not fit its dataset (damaged, edited, or written by other code: rows, width, dtypes,
labels, non-finite values) is extracted again, with one warning naming it.
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
from dinotune.errors import CheckpointError
from dinotune.tasks.classify.heads import pooled_dim
from dinotune.utils import file_mode, info, warn


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
    features = torch.cat(feats)
    bad = int((~torch.isfinite(features).all(dim=1)).sum())
    if bad:  # not the learning rate's fault, and not worth caching
        raise CheckpointError(f"the frozen backbone gives NaN or infinite features for {bad} of {len(features)} "
                              f"images ({precision} precision): its weights hold such values, or {precision} "
                              "overflows (try --precision fp32)")
    return features, torch.cat(labels)


def feature_width(model: torch.nn.Module) -> int | None:
    """The width of ``model.features`` rows, read off the model without running it: a ``Classifier``
    pools ``backbone.embed_dim`` by its ``pool``; ``AllPools`` gives ``n_layers`` class tokens and a
    mean patch token. None for another model."""
    dim = getattr(getattr(model, "backbone", None), "embed_dim", None)
    if not isinstance(dim, int):
        return None
    if isinstance(getattr(model, "pool", None), str):
        return pooled_dim(dim, model.pool)
    n_layers = getattr(model, "n_layers", None)
    return (n_layers + 1) * dim if isinstance(n_layers, int) else None


def dataset_labels(dataset: Dataset) -> set[int] | None:
    """The labels a dataset's items may have (None: not known without reading every item)."""
    items = getattr(dataset, "items", None)
    if items is not None:
        return {int(label) for _, label in items}
    label_map = getattr(dataset, "label_map", None)
    return set(label_map.values()) if label_map else None


def check_cache(tensors: dict[str, torch.Tensor], rows: int, width: int | None,
                labels: set[int] | None) -> str | None:
    """Why the tensors of a cache file do not fit its dataset, or None when they do: ``features``
    ``rows x width`` finite float32, ``labels`` ``rows`` int64 among ``labels``, nothing else."""
    if set(tensors) != {"features", "labels"}:
        return f"holds tensors {sorted(tensors)}, not features and labels"
    f, y = tensors["features"], tensors["labels"]
    if f.dtype != torch.float32 or y.dtype != torch.int64:
        return f"features are {f.dtype} and labels {y.dtype}, not float32 and int64"
    if f.dim() != 2 or y.dim() != 1 or len(f) != rows or len(y) != rows:
        return (f"features {' x '.join(map(str, f.shape))} and labels {' x '.join(map(str, y.shape))} for a dataset "
                f"of {rows} images")
    if width is not None and f.shape[1] != width:
        return f"features are {f.shape[1]} wide, the model gives {width}"
    strange = sorted(v for v in y.unique().tolist() if v < 0 or (labels is not None and v not in labels))
    if strange:
        return f"labels {', '.join(map(str, strange[:5]))} are not among the dataset's"
    if not bool(torch.isfinite(f).all()):
        return "features hold NaN or infinite values"
    return None


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
        cached = _read_cache(path, len(dataset), feature_width(model), dataset_labels(dataset))
        if cached is not None:
            info(f"{split}: {len(cached)} cached features from {path}")
            return cached
    feats, labels = extract_features(model, dataset, batch_size=batch_size, workers=workers,
                                     device=device, precision=precision, show_progress=show_progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    save_file({"features": feats.contiguous(), "labels": labels.contiguous()}, str(tmp))
    os.chmod(tmp, file_mode())  # safetensors writes 0600; a shared cache must be readable by the team
    os.replace(tmp, path)  # readers never see half a cache file
    info(f"{split}: cached {len(labels)} x {feats.shape[1]} features in {path}")
    return FeatureDataset(feats, labels)


def _read_cache(path: Path, rows: int, width: int | None, labels: set[int] | None) -> FeatureDataset | None:
    """The cached features at ``path``, or None (after one warning naming it) when the file cannot be
    read or does not fit the dataset: it is then extracted again and replaced."""
    expected = 16 + rows * ((width or 0) * 4 + 8) + 4096  # header + float32 rows + int64 labels, with room
    if width is not None and path.stat().st_size > 2 * expected:
        why = f"{path.stat().st_size:,} bytes for {rows} rows of {width} features"
    else:
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors' errors have no common base; a damaged file is a miss
            why = f"cannot be read: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        else:
            why = check_cache(tensors, rows, width, labels)
            if why is None:
                return FeatureDataset(tensors["features"], tensors["labels"])
    warn(f"{path}: feature cache does not fit its dataset ({why}); extracting the features again")
    return None
