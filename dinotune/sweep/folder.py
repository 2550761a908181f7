"""The sweep folder: its layout, its lock, and the settings it was started with.

```
SWEEP/
  sweep.yaml          the sweep's settings: task, search, grid, the base config (refused if they change)
  trials/<name>/      one run folder per trial (what `dinotune train` writes)
  configs/<name>.yaml the config each trial was started from (`dinotune train --config`)
  logs/<name>.log     each trial's output; logs/<name>.json its attempts (exit codes, wall times)
  results.md .csv     the table; pareto.png the chart
  optuna.journal      the optuna study (--search optuna)
```

One process works in a sweep folder at a time (the lock of ``engine.run_folder``); a second call
continues the sweep when its settings are the same, and is refused, naming what differs, when not.
Where a trial runs (device, workers, progress bars) may change between calls; what it trains may not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dinotune.config import ConfigError, to_dict
from dinotune.config.yaml_files import read_yaml, yaml_text
from dinotune.engine.run_folder import LOCK_FILE, RunFolder
from dinotune.utils import atomic_write_text

SETTINGS_FILE = "sweep.yaml"
# What may differ from call to call: where and how trials run, never what they train (the
# options `train --resume` takes); `trials` lets an optuna search be extended.
RUN_OPTIONS = ("train.device", "train.workers", "train.progress", "train.out")
EXTENDABLE = ("trials",)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-3}}`` -> ``{"optim.lr": 1e-3}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def settings_dict(task: str, search: str, grid: dict[str, list[str]], base_cfg: Any, trials: int | None) -> dict[str, Any]:
    """What ``sweep.yaml`` holds: the base config without the options that may change."""
    base = {k: v for k, v in flatten(to_dict(base_cfg)).items() if k not in RUN_OPTIONS}
    return {"task": task, "search": search, "grid": {k: list(v) for k, v in grid.items()},
            "trials": trials, "base": base}


def differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that differs (base config keys by their dotted name)."""
    out = []
    for key in ("task", "search", "grid"):
        if saved.get(key) != wanted.get(key):
            out.append(f"{key}: {saved.get(key)} -> {wanted.get(key)}")
    old, new = saved.get("base") or {}, wanted.get("base") or {}
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            out.append(f"{key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}")
    return out


_DAMAGED_HINT = ("it records the settings this sweep was started with: restore it, or give another --out for "
                 "a new sweep")


def read_settings(path: Path) -> dict[str, Any]:
    """A sweep folder's ``sweep.yaml``, or a ConfigError naming it and what to do when it is damaged."""
    try:
        saved = read_yaml(path)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; {_DAMAGED_HINT}") from None
    if not (isinstance(saved, dict) and isinstance(saved.get("grid"), dict) and isinstance(saved.get("base"), dict)):
        raise ConfigError(f"{path}: damaged (not a mapping with task, search, grid and base); {_DAMAGED_HINT}")
    return saved


class SweepFolder:
    """A claimed and locked sweep folder. ``open`` it, ``release`` it when done."""

    def __init__(self, path: Path, lock: RunFolder, settings: dict[str, Any], fresh: bool):
        self.path = path
        self._lock = lock
        self.settings = settings
        self.fresh = fresh  # started by this call

    @property
    def trials_dir(self) -> Path:
        return self.path / "trials"

    def run_dir(self, name: str) -> Path:
        return self.trials_dir / name

    def config_path(self, name: str) -> Path:
        return self.path / "configs" / f"{name}.yaml"

    def log_path(self, name: str) -> Path:
        return self.path / "logs" / f"{name}.log"

    def attempts_path(self, name: str) -> Path:
        return self.path / "logs" / f"{name}.json"

    @classmethod
    def open(cls, out: str | Path, settings: dict[str, Any]) -> SweepFolder:
        """Start a sweep in ``out`` (new or empty), or continue the one there when ``settings``
        match its ``sweep.yaml``; refuse a folder that is something else or was started otherwise."""
        path = Path(out).expanduser()
        RunFolder.check(path)
        saved_file = path / SETTINGS_FILE
        if path.is_dir() and not saved_file.is_file() and any(p.name != LOCK_FILE for p in path.iterdir()):
            raise ConfigError(f"--out {path} holds other files and no {SETTINGS_FILE}: it is not a sweep folder; "
                              "give a new or empty folder for the sweep")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--out {path}: cannot create the sweep folder ({exc.strerror or exc})") from None
        lock = RunFolder.reopen(path)  # a second sweep process in the same folder is refused here
        try:
            fresh = not saved_file.is_file()
            if fresh:
                atomic_write_text(saved_file, yaml_text(settings))
            else:
                saved = read_settings(saved_file)
                changed = differences(saved, settings)
                if changed:
                    shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
                    raise ConfigError(f"{path} is a sweep started with other settings ({shown}). Continue it with "
                                      f"the settings in {saved_file}, or give another --out for a new sweep")
                if any(saved.get(k) != settings.get(k) for k in EXTENDABLE):
                    atomic_write_text(saved_file, yaml_text(settings))
        except BaseException:
            lock.release()
            raise
        return cls(path, lock, settings, fresh)

    def release(self) -> None:
        self._lock.release()
