"""Checkpoint folders, written atomically.

A checkpoint folder holds what rebuilds the model on top of the base backbone: ``config.yaml``,
``meta.json`` (task metadata such as class names, epoch, metrics, base-weights fingerprint),
``head.safetensors``, the adapter (PEFT files) or, for full fine-tuning, ``backbone.safetensors``,
and for ``last`` also ``trainer_state.pt`` (optimizer, scheduler, scaler, RNG, epoch). Never the
frozen backbone.

Atomicity: everything is written into ``.NAME.tmp``; then the old folder is renamed to
``.NAME.old``, the new one into place, and the old one removed. A crash at any point leaves
either ``NAME`` or ``.NAME.old`` complete, and ``resolve`` finds it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dinotune.adapters import load_adapter, save_adapter
from dinotune.config import AdapterConfig, save_yaml
from dinotune.errors import CheckpointError
from dinotune.utils import write_json

HEAD_WEIGHTS = "head.safetensors"
META = "meta.json"
TRAINER_STATE = "trainer_state.pt"



def save(
    folder: Path,
    model: nn.Module,
    cfg: Any,
    meta: dict[str, Any],
    trainer_state: dict[str, Any] | None = None,
) -> None:
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp")
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    head_sd = {k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}
    save_file(head_sd, str(tmp / HEAD_WEIGHTS))
    save_adapter(model.backbone, cfg.adapter, tmp)
    save_yaml(cfg, tmp / "config.yaml")
    write_json(tmp / META, meta)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / TRAINER_STATE)
    _swap(tmp, folder, old)


def copy(src: Path, dst: Path) -> None:
    """Make ``dst`` a checkpoint with ``src``'s weights (not its trainer state), atomically.

    Files are hard-linked where the file system allows: checkpoint files are never modified in
    place, only replaced, so sharing them is safe and a multi-GB backbone is not written twice.
    """
    src, dst = resolve(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.tmp")
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.name == TRAINER_STATE:
            continue
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copy2(f, tmp / f.name)
    _swap(tmp, dst, old)


def _swap(tmp: Path, folder: Path, old: Path) -> None:
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def resolve(folder: Path) -> Path:
    """``folder`` if complete, else the ``.old`` copy left by a crash during the swap."""
    folder = Path(folder)
    if (folder / META).is_file():
        return folder
    old = folder.with_name(f".{folder.name}.old")
    if (old / META).is_file():
        return old
    raise CheckpointError(f"no checkpoint at {folder} (no {META})")


def read_meta(folder: Path) -> dict[str, Any]:
    return json.loads((resolve(folder) / META).read_text())


def load_weights(folder: Path, model: nn.Module, adapter: AdapterConfig) -> None:
    """Load head and adapter weights from ``folder`` into an already-built, adapted ``model``."""
    folder = resolve(folder)
    head_sd = load_file(str(folder / HEAD_WEIGHTS))
    own = model.head.state_dict()
    wrong = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in head_sd.items() if k in own and v.shape != own[k].shape}
    if wrong:
        k, (saved, built) = next(iter(wrong.items()))
        raise CheckpointError(f"{folder / HEAD_WEIGHTS}: {k} has shape {saved} but the model expects {built}")
    missing, unexpected = model.head.load_state_dict(head_sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder / HEAD_WEIGHTS}: head does not fit (missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    load_adapter(model.backbone, adapter, folder)


def load_trainer_state(folder: Path) -> dict[str, Any]:
    path = resolve(folder) / TRAINER_STATE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: this checkpoint cannot resume training")
    # optimizer states and numpy RNG state are not plain tensors, so weights_only must be off;
    # the file is one this program wrote into the user's own run folder.
    return torch.load(path, map_location="cpu", weights_only=False)


def check_compatible(folder: Path, current: dict[str, Any]) -> None:
    """Refuse a checkpoint whose classes differ from the data's, naming both."""
    saved = read_meta(folder)
    if "num_classes" in saved and "num_classes" in current and saved["num_classes"] != current["num_classes"]:
        raise CheckpointError(
            f"{folder} was trained for {saved['num_classes']} classes but the data has "
            f"{current['num_classes']} ({', '.join(map(str, current.get('class_names', [])[:10]))})"
        )
    if saved.get("class_names") and current.get("class_names") and saved["class_names"] != current["class_names"]:
        raise CheckpointError(
            f"{folder} was trained on classes {saved['class_names'][:10]} but the data has "
            f"{current['class_names'][:10]}"
        )
