"""Checkpoint folders: written atomically, read without running anything from them.

A checkpoint folder holds what rebuilds the model on top of the base backbone: ``config.yaml``,
``meta.json`` (task metadata such as class names, epoch, metrics, base-weights fingerprint),
``head.safetensors``, the adapter (PEFT files) or, for full fine-tuning, ``backbone.safetensors``,
for N-band input the widened patch embedding (``input_embedding.safetensors``; ``meta.json``
keeps the bands and their statistics under ``input``), and for ``last`` also
``trainer_state.safetensors`` (optimizer, scheduler, scaler, RNG, epoch, the EMA of the weights
and the early-stopping counters). With ``--ema``, ``best`` may hold the averaged weights:
``meta.json`` says which (``"weights": "raw"`` / ``"ema"``).
Never the frozen backbone.

Nothing in a checkpoint is pickled: tensors are safetensors, everything else JSON or YAML (the
trainer state keeps its plain data as JSON in its safetensors header). A run folder received from
someone else therefore cannot run code when it is resumed or loaded. ``trainer_state.pt`` files
of older versions were pickles and are refused, never opened.

Atomicity: everything is written into ``.NAME.tmp``; then the old folder is renamed to
``.NAME.old``, the new one into place, and the old one removed. A crash at any point leaves
either ``NAME`` or ``.NAME.old`` complete, and ``resolve`` finds it. A failed save (a full disk)
removes ``.NAME.tmp`` and says so; the previous checkpoint is untouched.

Reading a damaged file (e.g. truncated by an interrupted copy) raises a ``CheckpointError`` that
names the file and says whether the run's other checkpoint (``best`` / ``last``) is usable.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dinotune.adapters import adapter_for, load_adapter, save_adapter
from dinotune.backbone.channels import INPUT_EMBEDDING_WEIGHTS
from dinotune.config import AdapterConfig, ConfigError, save_yaml
from dinotune.config.io import load_run_config
from dinotune.data.input_spec import InputSpec
from dinotune.engine.run_folder import BEST, CHECKPOINT_META, CONFIG_FILE, LAST
from dinotune.errors import CheckpointError, DinotuneError
from dinotune.utils import file_mode, space_problem, write_json

HEAD_WEIGHTS = "head.safetensors"
META = CHECKPOINT_META
CONFIG = CONFIG_FILE
TRAINER_STATE = "trainer_state.safetensors"
LEGACY_TRAINER_STATE = "trainer_state.pt"  # a pickle, written by older versions: never loaded
_STATE_KEY = "dinotune_trainer_state"  # the trainer state's plain data, JSON in the safetensors header
_STATE_FIELDS = ("epoch", "phase", "global_step", "best", "optimizer", "scheduler", "rng")


# ------------------------------------------------------------------------------------- saving
def save(
    folder: Path,
    model: nn.Module,
    cfg: Any,
    meta: dict[str, Any],
    trainer_state: dict[str, Any] | None = None,
) -> None:
    """Write the checkpoint ``folder`` atomically (the previous one stays if anything fails)."""
    with _staging(Path(folder)) as tmp:
        head_sd = {k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}
        save_file(head_sd, str(tmp / HEAD_WEIGHTS))
        save_adapter(model.backbone, cfg.adapter, tmp)
        save_yaml(cfg, tmp / CONFIG)
        write_json(tmp / META, meta)
        if trainer_state is not None:
            write_trainer_state(tmp / TRAINER_STATE, trainer_state)


def save_epoch(folder: Path, model: nn.Module, cfg: Any, meta: dict[str, Any], trainer_state: dict[str, Any],
               best: str | None, ema: Any = None) -> None:
    """An epoch's checkpoints in ``folder`` (``<run>/checkpoints``): ``last`` (the raw weights and
    the trainer state), and ``best`` when the epoch is the best so far: a copy of ``last`` when the
    raw weights won (``best="raw"``), the average of ``ema`` (a ``ModelEma``, swapped into the
    model while saving) when it did (``"ema"``). ``meta.json`` says which under ``"weights"``."""
    save(folder / LAST, model, cfg, {**meta, "weights": "raw"}, trainer_state)
    if best == "ema":
        with ema.swapped():
            save(folder / BEST, model, cfg, {**meta, "weights": "ema"})
    elif best:
        copy(folder / LAST, folder / BEST)


def copy(src: Path, dst: Path) -> None:
    """Make ``dst`` a checkpoint with ``src``'s weights (not its trainer state), atomically.

    Files are hard-linked where the file system allows: checkpoint files are never modified in
    place, only replaced, so sharing them is safe and a multi-GB backbone is not written twice.
    """
    src = resolve(src)
    with _staging(Path(dst)) as tmp:
        for f in src.iterdir():
            if f.name in (TRAINER_STATE, LEGACY_TRAINER_STATE):
                continue
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)


@contextlib.contextmanager
def _staging(folder: Path) -> Iterator[Path]:
    """``.NAME.tmp`` to write the checkpoint into, swapped in when the block succeeds. On failure
    the partial folder is removed (a full disk must not be filled further by leftovers) and an
    I/O error becomes a CheckpointError saying what failed and that the previous one is intact."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    old = folder.with_name(f".{folder.name}.old")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        yield tmp
        for written in tmp.iterdir():  # safetensors writes owner-only files; a shared run must stay readable
            os.chmod(written, file_mode())
        _swap(tmp, folder, old)
    except DinotuneError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(folder, exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap(tmp: Path, folder: Path, old: Path) -> None:
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _save_error(folder: Path, exc: BaseException) -> CheckpointError:
    try:
        resolve(folder)
        previous = "the previous checkpoint is intact"
    except CheckpointError:
        previous = "no earlier checkpoint was there to keep"
    space = space_problem(exc)
    if space:
        return CheckpointError(f"{space} while saving {folder}; {previous}. Free some space, then continue "
                               "the run with --resume (dinotune.train(resume=RUN) in Python)")
    return CheckpointError(f"saving {folder} failed ({exc}); {previous}")


@contextlib.contextmanager
def writing(what: str, state_of_run: str) -> Iterator[None]:
    """Turn a failed write into the run folder (a full disk, mostly) into one clear message: what
    was being written, what state the run folder is left in, and what to do."""
    try:
        yield
    except DinotuneError:
        raise
    except OSError as exc:
        failure = space_problem(exc) or f"a write failed ({exc})"
        raise CheckpointError(f"{failure} while {what}; {state_of_run}. Free some space (or fix the cause), "
                              "then continue the run with --resume") from exc


# ------------------------------------------------------------------------------ trainer state
def write_trainer_state(path: Path, state: dict[str, Any]) -> None:
    """One safetensors file: the tensors of ``state``, and the rest of it as JSON in the header
    (loading it parses data, never code, whoever wrote the file)."""
    tensors: dict[str, torch.Tensor] = {}
    plain = _pack(state, tensors)
    save_file(tensors, str(path), metadata={_STATE_KEY: json.dumps(plain)})


def read_trainer_state(path: Path) -> dict[str, Any]:
    """What ``write_trainer_state`` wrote. Raises SafetensorError / ValueError / KeyError /
    TypeError on a damaged file (``load_trainer_state`` turns them into a CheckpointError)."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        text = (f.metadata() or {}).get(_STATE_KEY)
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if text is None:
        raise ValueError("its header holds no trainer state")
    state = _unpack(json.loads(text), tensors)
    missing = [k for k in _STATE_FIELDS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"it lacks {', '.join(missing)}")
    return state


_MARKERS = ("__tensor__", "__tuple__", "__items__")


def _pack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON data: tensors move into ``tensors`` (leaving ``{"__tensor__": key}``);
    tuples and dicts with non-string keys (optimizer states by parameter index) are marked so
    that ``_unpack`` restores them exactly."""
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_pack(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_pack(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not (len(obj) == 1 and next(iter(obj)) in _MARKERS):
            return {k: _pack(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_pack(k, tensors), _pack(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"a trainer state holds tensors and plain data only, not {type(obj).__name__}")


def _unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unpack(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        ((marker, value),) = obj.items()
        if marker == "__tensor__":
            return tensors[value]
        if marker == "__tuple__":
            return tuple(_unpack(v, tensors) for v in value)
        if marker == "__items__":
            return {_unpack(k, tensors): _unpack(v, tensors) for k, v in value}
    return {k: _unpack(v, tensors) for k, v in obj.items()}


def load_trainer_state(folder: Path) -> dict[str, Any]:
    """The trainer state of checkpoint ``folder`` (``checkpoints/last``), for ``--resume``."""
    folder = resolve(folder)
    path = folder / TRAINER_STATE
    if not path.is_file():
        raise _no_trainer_state(folder)
    try:
        return read_trainer_state(path)
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is damaged ({exc}); {_other_note(folder, resume=True)}") from None


def _no_trainer_state(folder: Path) -> CheckpointError:
    legacy = folder / LEGACY_TRAINER_STATE
    if legacy.exists():
        return CheckpointError(
            f"{legacy} is a pickle (the format of older dinotune versions), which can run code when "
            "loaded, so it is not opened: nothing in it was run. Training cannot resume from this "
            "checkpoint; its weights still load for eval and predict, and a new run can start from "
            "its config.yaml (--config)")
    return CheckpointError(f"{folder / TRAINER_STATE} is missing: this checkpoint cannot resume training")


# ----------------------------------------------------------------------------------- reading
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
    folder = resolve(folder)
    try:
        return _read_meta(folder)
    except CheckpointError as exc:
        raise _noted(exc, folder) from None


def read_config(folder: Path) -> Any:
    """The config a checkpoint was trained with; every key must be there (see ``load_run_config``)."""
    folder = resolve(folder)
    try:
        return load_run_config(folder / CONFIG)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; {_other_note(folder)}") from None


def load_weights(folder: Path, model: nn.Module, adapter: AdapterConfig) -> None:
    """Load head and adapter weights from ``folder`` into an already-built, adapted ``model``."""
    folder = resolve(folder)
    try:
        for path in _weight_files(folder, adapter.kind):
            _check_tensor_file(path)
    except CheckpointError as exc:
        raise _noted(exc, folder) from None
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


def check_compatible(folder: Path, current: dict[str, Any]) -> None:
    """Refuse a checkpoint whose classes (or input bands) differ from the data's, naming both."""
    saved = read_meta(folder)
    saved_bands = InputSpec.from_meta(saved).in_channels
    current_bands = InputSpec.from_meta(current).in_channels
    if saved_bands != current_bands:
        raise CheckpointError(f"{folder} was trained on {saved_bands}-band input but the data has {current_bands} "
                              "band(s)")
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


# ------------------------------------------------------------------- damaged files, explained
def _read_meta(folder: Path) -> dict[str, Any]:
    path = folder / META
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path} is damaged (not readable JSON: {exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is damaged (a JSON {type(meta).__name__}, not an object)")
    return meta


def _weight_files(folder: Path, adapter_kind: str) -> list[Path]:
    """The safetensors files a checkpoint of an ``adapter_kind`` model holds (ConfigError for an
    unknown kind)."""
    files = [folder / name for name in [HEAD_WEIGHTS, *adapter_for(adapter_kind).weight_files]]
    if (folder / INPUT_EMBEDDING_WEIGHTS).exists():  # N-band runs only
        files.append(folder / INPUT_EMBEDDING_WEIGHTS)
    return files


def _check_tensor_file(path: Path) -> None:
    """Read the header of a safetensors file: a truncated file fails here, named, before any load
    (safetensors' own errors do not say which file)."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt", device="cpu"):
            pass
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is damaged ({exc})") from None


def problem(folder: Path) -> str | None:
    """Why the checkpoint at ``folder`` cannot be loaded for inference, or None when every file
    reads (headers only: no weights are loaded)."""
    try:
        found = resolve(folder)
        _read_meta(found)
        cfg = load_run_config(found / CONFIG)
        for path in _weight_files(found, cfg.adapter.kind):
            _check_tensor_file(path)
    except (CheckpointError, ConfigError) as exc:
        return str(exc)
    return None


def _noted(exc: CheckpointError, folder: Path) -> CheckpointError:
    return CheckpointError(f"{exc}; {_other_note(folder)}")


def _other_note(folder: Path, resume: bool = False) -> str:
    """Whether the run's other checkpoint (``best`` for ``last``, and the reverse) is usable, and
    how to use it: what the user can do about a damaged checkpoint."""
    name = folder.name[1:-4] if folder.name.startswith(".") and folder.name.endswith(".old") else folder.name
    other_name = {LAST: BEST, BEST: LAST}.get(name)
    if other_name is None:
        return "there is no other checkpoint next to it to fall back on"
    other = folder.parent / other_name
    why = problem(other)
    if why is not None:
        return f"the run's other checkpoint is not usable either ({why})"
    try:
        epoch = _read_meta(resolve(other)).get("epoch", "?")
    except CheckpointError:
        epoch = "?"
    if other_name == LAST:
        return f"{other} (epoch {epoch}) is intact: use it instead (--checkpoint last)"
    if resume:
        return (f"training cannot resume; {other} (epoch {epoch}) is intact for eval and predict "
                "(--checkpoint best), and a new run can start from its config.yaml (--config)")
    return (f"{other} (epoch {epoch}) is intact: use it instead (--checkpoint best; it holds no trainer "
            "state, so training cannot resume from it)")

