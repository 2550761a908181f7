"""Images -> one embedding each under a ``DinoBackbone``.

``find_items`` reads a data folder into ``(path, split, label)`` items: split folders (``train/``,
``val/`` or an alias, ``test/``; COCO's ``train2017/``; YOLO's ``images/train/``) are read one by
one, each either a class-folder tree (the label is the class folder's name) or a plain folder
(images directly inside: no label); a folder without split folders is read the same way with the
split left empty. A CSV lists images (a path column, an optional label column; ``train.csv`` gives
the split ``train``). Files and lists of files are plain.
``embed_images`` runs the backbone over them in batches with the evaluation transform (short side
``image_size * 256/224``, centre crop ``image_size``) and pools the last layer's tokens after the
final norm: ``cls`` (the class token), ``mean`` (the mean patch token) or ``both`` (the two
concatenated, class token first).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dinotune.data.arrays import BandLayout
from dinotune.data.bands import InputSpec, read_input
from dinotune.data.images import readable_images
from dinotune.data.image_lists import LIST_SUFFIXES, read_labelled_csv
from dinotune.data.splits import SPLIT_ALIASES, split_dirs
from dinotune.data.transforms import classify_eval_transform
from dinotune.errors import ConfigError

POOLS = ("cls", "mean", "both")


@dataclass(frozen=True)
class Item:
    """One image: its path (absolute), split (``""`` outside split folders) and label (``""`` when unlabelled)."""

    path: str
    split: str
    label: str


def _folder_items(folder: Path, split: str) -> list[Item]:
    """A class-folder tree (no image directly inside, images in sub-folders: label = the first
    sub-folder's name) or a plain folder (label empty)."""
    paths = readable_images(folder)
    plain = any(p.parent == folder for p in paths)
    items = []
    for p in paths:
        rel = p.relative_to(folder)
        label = "" if plain or len(rel.parts) < 2 else rel.parts[0]
        items.append(Item(str(p.absolute()), split, label))
    return items


# COCO's year-suffixed split folders (train2017, val2017)
_SPLIT_FOLDER = re.compile(r"^(?P<name>[a-z]+?)(?:\d{4})?$")


def _split_folders(root: Path) -> dict[str, Path]:
    """The split folders of ``root`` by canonical name: ``train/``, ``val/`` (or an alias) and
    ``test/``, else COCO's ``train2017/`` ..., else YOLO's ``images/train/`` ...; empty when none."""
    found = split_dirs(root)
    if found:
        return found
    for base in (root, root / "images"):
        named: dict[str, Path] = {}
        for child in sorted(base.iterdir()) if base.is_dir() else ():
            match = _SPLIT_FOLDER.match(child.name.lower())
            split = next((s for s, names in SPLIT_ALIASES.items() if match and match["name"] in names), None)
            if split and child.is_dir():
                named.setdefault(split, child)
        if named:
            return named
    return {}


def _list_items(path: Path) -> list[Item]:
    """The images a CSV lists (a path column, an optional label column); a CSV named like a split
    (``train.csv``, ``val.csv``) gives that split."""
    pairs, skipped = read_labelled_csv(path, require_label=False)
    skipped.print("listed images")
    readable = {str(p.absolute()) for p in readable_images([p for p, _ in pairs])} if pairs else set()
    split = next((s for s, names in SPLIT_ALIASES.items() if path.stem.lower() in names), "")
    return [Item(str(p.absolute()), split, label) for p, label in pairs if str(p.absolute()) in readable]


def find_items(data: str | Path | Sequence[str | Path]) -> list[Item]:
    """The images of ``data`` with their split and label (see the module docstring), in a fixed
    order (split, then path; a CSV's row order). Unreadable files are reported and skipped
    (``readable_images``)."""
    if not isinstance(data, (str, Path)):
        return [Item(str(p.absolute()), "", "") for p in readable_images(list(data))]
    root = Path(data).expanduser()
    if root.is_file() and root.suffix.lower() in LIST_SUFFIXES and root.suffix.lower() != ".txt":
        return _list_items(root)
    if not root.is_dir():
        return [Item(str(p.absolute()), "", "") for p in readable_images(root)]
    splits = _split_folders(root)
    if not splits:
        return _folder_items(root, "")
    return [item for split, folder in splits.items() for item in _folder_items(folder, split)]


def pool_features(features, pool: str) -> torch.Tensor:
    """``B x C`` (``B x 2C`` for ``both``) from a backbone's ``Features``."""
    if pool == "cls":
        return features.cls
    if pool == "mean":
        return features.patch_mean
    if pool == "both":
        return torch.cat([features.cls, features.patch_mean], dim=1)
    raise ConfigError(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}")


class _Images(Dataset):
    def __init__(self, paths: Sequence[str], transform, layout: BandLayout):
        self.paths, self.transform, self.layout = list(paths), transform, layout

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        x = self.transform(read_input(Path(self.paths[index]), layout=self.layout))
        return x.as_subclass(torch.Tensor)


@torch.no_grad()
def embed_images(backbone, paths: Sequence[str | Path], image_size: int, *, pool: str = "cls",
                 spec: InputSpec | None = None, batch_size: int = 32, workers: int = 0,
                 bar: Iterable | None = None) -> np.ndarray:
    """``len(paths) x D`` float32 embeddings of ``paths`` under ``backbone`` (put in eval mode for
    the call), in the order given. ``bar``: a progress bar to ``update`` by each batch's size."""
    if pool not in POOLS:
        raise ConfigError(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    backbone.check_image_size(image_size, "--image-size")
    spec = spec or InputSpec()
    dataset = _Images([str(p) for p in paths], classify_eval_transform(image_size, spec), spec.layout)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    param = next(backbone.parameters())
    was_training = backbone.training
    backbone.eval()
    out = []
    try:
        for x in loader:
            feats = backbone(x.to(device=param.device, dtype=param.dtype))
            out.append(pool_features(feats, pool).float().cpu().numpy())
            if bar is not None:
                bar.update(len(x))
    finally:
        backbone.train(was_training)
    width = out[0].shape[1] if out else 0
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, width), np.float32)
