"""Turn a ``--model`` string into a transformers DINOv2 or DINOv3 model.

Accepted forms: a hub id, a local Hugging Face folder, an official ``.pth`` checkpoint (DINOv2 or
DINOv3 layout, told apart by its tensors), or ``random:<size>[-reg4]`` / ``random:dinov3-<size>``.
The hub path fails fast when the hub cannot be reached: transformers' own retries take about 50 s
to give up, and the user needs a hint, not a trace. The DINOv3 repos are gated: a refused download
(HTTP 401 / 403) says how to get access instead of showing huggingface_hub's trace.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import torch
from transformers import AutoConfig, AutoModel, PreTrainedModel

from dinotune.backbone.convert import load_official_checkpoint
from dinotune.backbone.families import family_for
from dinotune.backbone.registry import DINOV3_PREFIX, RANDOM_SPECS, arch_config, model_choices_text, random_choices_for
from dinotune.errors import BackboneLoadError
from dinotune.utils import warn


def load_backbone_model(spec: str, init_seed: int = 0) -> PreTrainedModel:
    """Load a DINOv2 (``Dinov2Model`` / ``Dinov2WithRegistersModel``) or DINOv3
    (``DINOv3ViTModel``) model in eval mode."""
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


# The name the DINOv2-only releases used; it loads either family.
load_dinov2 = load_backbone_model


def _random_model(spec: str, init_seed: int) -> PreTrainedModel:
    name = spec.split(":", 1)[1]
    try:
        cfg = arch_config(name)
    except KeyError:
        raise BackboneLoadError(
            f"unknown random size {name!r}: choose one of {', '.join(RANDOM_SPECS)}"
        ) from None
    arch = f"{family_for(cfg).display_name}-{name.removeprefix(DINOV3_PREFIX)}"
    warn(
        f"--model {spec}: the {arch} architecture with RANDOM weights (seed {init_seed}), "
        "not pretrained features; use it for tests and demos only"
    )
    # A fixed seed makes the "base weights" reproducible, so a saved adapter + head can be put
    # back on the very same random backbone without storing it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = AutoModel.from_config(cfg)
    model.config._name_or_path = spec
    return model.eval()


def _check_family(model_type: str, where: str) -> None:
    try:
        family_for(model_type)
    except BackboneLoadError as exc:
        raise BackboneLoadError(f"{where}: {exc}") from None


# A run folder whose task leaves a backbone behind (self-supervised pretraining) keeps it here.
RUN_BACKBONE = "backbone"


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers without its progress bars (loading or writing a local folder takes a blink; a
    bar per call would bury dinotune's own lines), restored as they were."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _from_folder(path: Path) -> PreTrainedModel:
    if not (path / "config.json").is_file() and (path / RUN_BACKBONE / "config.json").is_file():
        path = path / RUN_BACKBONE  # a pretraining run: its backbone, as `--model RUN` means
    if not (path / "config.json").is_file():
        raise BackboneLoadError(
            f"{path} has no config.json: a local backbone must be a Hugging Face model folder "
            "(save_pretrained / huggingface-cli download output) or a dinotune pretrain run"
        )
    cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    _check_family(cfg.model_type, str(path))
    try:
        with no_progress_bars():
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


def _refusal(exc: BaseException) -> tuple[str | None, int | None]:
    """What the hub refused, read off ``exc`` and the exceptions it was raised from (transformers
    wraps huggingface_hub's errors in an OSError): ``"gated"`` (a gated repo, access not granted),
    ``"denied"`` (another HTTP 401 / 403), ``"missing"`` (no such repo, or a private one) or None;
    and the HTTP status when one was given."""
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    seen: set[int] = set()
    kind: str | None = None
    status: int | None = None
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        status = status or getattr(getattr(exc, "response", None), "status_code", None)
        if isinstance(exc, GatedRepoError) or "gated repo" in str(exc).lower():
            kind = "gated"
        elif isinstance(exc, RepositoryNotFoundError):
            kind = kind or "missing"
        elif isinstance(exc, HfHubHTTPError) and status in (401, 403):
            kind = kind or "denied"
        exc = exc.__cause__ or exc.__context__
    return kind, status


def _hub_error(repo_id: str, exc: BaseException) -> BackboneLoadError:
    kind, status = _refusal(exc)
    http = f"HTTP {status}" if status else "HTTP 401 / 403"
    page = f"https://huggingface.co/{repo_id}"
    access = (f"accept the licence on the model page {page} (signed in to your Hugging Face account), "
              "then log in here with `huggingface-cli login` or set HF_TOKEN to a token of that account")
    if kind == "gated":
        return BackboneLoadError(
            f"{repo_id!r} is a gated model and this machine has no access to it ({http}). To get access: "
            f"{access}. Without access: a local copy with --model DIR, or random weights with "
            f"--model {random_choices_for(repo_id)}"
        )
    if kind == "denied":
        return BackboneLoadError(
            f"the Hugging Face hub refused to send {repo_id!r} ({http}: not logged in, or a token without "
            f"access). If it is gated: {access}"
        )
    if kind == "missing":
        return BackboneLoadError(
            f"{repo_id!r} was not found on the Hugging Face hub (a typo? a private repo needs "
            f"`huggingface-cli login` or HF_TOKEN); --model takes {model_choices_text()}"
        )
    return BackboneLoadError(f"could not download {repo_id!r} from the hub: {exc}")


def _from_hub(repo_id: str) -> PreTrainedModel:
    try:  # the local cache first: works offline, costs no request
        cfg = AutoConfig.from_pretrained(repo_id, local_files_only=True)
        _check_family(cfg.model_type, repo_id)
        return AutoModel.from_pretrained(repo_id, local_files_only=True).eval()
    except OSError:
        pass
    if not hub_reachable():
        raise BackboneLoadError(
            f"cannot reach the Hugging Face hub to download {repo_id!r} (offline, or "
            "HF_HUB_OFFLINE is set) and it is not in the local cache. On a machine with network run "
            f"`huggingface-cli download {repo_id} --local-dir DIR`, copy DIR here and pass "
            f"--model DIR; or try an architecture with random weights: --model {random_choices_for(repo_id)} "
            "(tiny: 4 blocks, quick on a CPU)"
        )
    try:
        cfg = AutoConfig.from_pretrained(repo_id)
        _check_family(cfg.model_type, repo_id)
        return AutoModel.from_pretrained(repo_id).eval()
    except OSError as exc:  # huggingface_hub's HTTP errors are OSErrors too
        raise _hub_error(repo_id, exc) from None
