"""Turn a ``--model`` string into a transformers DINOv2 model.

Accepted forms: a hub id, a local Hugging Face folder, an official ``.pth`` checkpoint, or
``random:<size>[-reg4]``. The hub path fails fast when the hub cannot be reached: transformers'
own retries take about 50 s to give up, and the user needs a hint, not a trace.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModel, PreTrainedModel

from dinotune.backbone.convert import load_official_checkpoint
from dinotune.backbone.registry import (
    ARCHS,
    DINOV2_MODEL_TYPES,
    RANDOM_SPECS,
    arch_config,
    model_choices_text,
)
from dinotune.errors import BackboneLoadError
from dinotune.utils import warn



def load_dinov2(spec: str, init_seed: int = 0) -> PreTrainedModel:
    """Load a DINOv2 model (``Dinov2Model`` or ``Dinov2WithRegistersModel``) in eval mode."""
    spec = spec.strip()
    if spec.startswith("random:"):
        return _random_model(spec, init_seed)
    path = Path(spec).expanduser()
    if path.suffix in (".pth", ".pt"):
        if not path.is_file():
            raise BackboneLoadError(f"checkpoint file not found: {path}")
        return load_official_checkpoint(path)
    if path.is_dir():
        return _from_folder(path)
    if path.exists():
        raise BackboneLoadError(
            f"{path} is a file but not a .pth checkpoint; --model takes {model_choices_text()}"
        )
    if _looks_like_hub_id(spec):
        return _from_hub(spec)
    raise BackboneLoadError(f"unknown --model {spec!r}: expected {model_choices_text()}")


def _random_model(spec: str, init_seed: int) -> PreTrainedModel:
    name = spec.split(":", 1)[1]
    try:
        cfg = arch_config(name)
    except KeyError:
        raise BackboneLoadError(
            f"unknown random size {name!r}: choose one of {', '.join(RANDOM_SPECS)}"
        ) from None
    warn(
        f"--model {spec}: the DINOv2-{name} architecture with RANDOM weights (seed {init_seed}), "
        "not pretrained features; use it for tests and demos only"
    )
    # A fixed seed makes the "base weights" reproducible, so a saved adapter + head can be put
    # back on the very same random backbone without storing it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = AutoModel.from_config(cfg)
    model.config._name_or_path = spec
    return model.eval()


def _check_dinov2(model_type: str, where: str) -> None:
    if model_type not in DINOV2_MODEL_TYPES:
        raise BackboneLoadError(
            f"{where} holds a {model_type!r} model, not DINOv2 ({' or '.join(DINOV2_MODEL_TYPES)})"
        )


def _from_folder(path: Path) -> PreTrainedModel:
    if not (path / "config.json").is_file():
        raise BackboneLoadError(
            f"{path} has no config.json: a local backbone must be a Hugging Face model folder "
            "(save_pretrained / huggingface-cli download output)"
        )
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    _check_dinov2(cfg.model_type, str(path))
    try:
        return AutoModel.from_pretrained(path, local_files_only=True).eval()
    except OSError as exc:
        raise BackboneLoadError(f"{path}: cannot load the weights ({exc})") from None


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and " " not in spec


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _from_hub(repo_id: str) -> PreTrainedModel:
    try:  # the local cache first: works offline, costs no request
        cfg = AutoConfig.from_pretrained(repo_id, local_files_only=True)
        _check_dinov2(cfg.model_type, repo_id)
        return AutoModel.from_pretrained(repo_id, local_files_only=True).eval()
    except OSError:
        pass
    if not hub_reachable():
        sizes = "|".join(ARCHS)
        raise BackboneLoadError(
            f"cannot reach the Hugging Face hub to download {repo_id!r} (offline, or "
            "HF_HUB_OFFLINE is set) and it is not in the local cache. On a machine with network run "
            f"`huggingface-cli download {repo_id} --local-dir DIR`, copy DIR here and pass "
            f"--model DIR; or try an architecture with random weights: --model random:{{{sizes}}} "
            "(tiny: 4 blocks, quick on a CPU)"
        )
    try:
        cfg = AutoConfig.from_pretrained(repo_id)
        _check_dinov2(cfg.model_type, repo_id)
        return AutoModel.from_pretrained(repo_id).eval()
    except OSError as exc:
        raise BackboneLoadError(f"could not download {repo_id!r} from the hub: {exc}") from None
