"""Running one trial: `dinotune train` in a fresh process, so that each trial's peak memory (and
import, allocator and cache state) is its own, with its output in ``logs/<name>.log``.

A trial's state is read off its folder and its attempt record (``logs/<name>.json``):

- ``done``: the run folder has ``results.json`` (and the trial's settings): never run again;
- ``failed``: the last attempt exited with an error: reported, not retried unless asked;
- ``interrupted``: an attempt was stopped (Ctrl-C, a signal, the sweep killed): continued with
  ``train --resume`` when the run saved a checkpoint, started afresh when it had not;
- ``pending``: never started.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from dinotune.config import ConfigError, load_yaml, save_yaml, to_dict
from dinotune.engine import checkpoint
from dinotune.engine.run_folder import RunLayout
from dinotune.errors import CheckpointError
from dinotune.sweep.folder import RUN_OPTIONS, SweepFolder, flatten
from dinotune.sweep.grid import Trial
from dinotune.utils import write_json

# `python -m dinotune`: the same dinotune, in the same environment, as the sweep itself
DEFAULT_COMMAND = (sys.executable, "-m", "dinotune")
# exit codes of a stopped (not failed) trial: the CLI's Ctrl-C, and death by a signal
INTERRUPTED = {130, -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL, -getattr(signal, "SIGHUP", 1)}


@dataclass
class Attempt:
    """One process of a trial: how it was started, how it ended, how long it took."""

    resumed: bool
    returncode: int | None  # None while it runs (or when the sweep died with it)
    wall_s: float
    error: str = ""


def read_attempts(folder: SweepFolder, name: str) -> list[Attempt]:
    path = folder.attempts_path(name)
    if not path.is_file():
        return []
    try:
        return [Attempt(**a) for a in json.loads(path.read_text())["attempts"]]
    except (ValueError, KeyError, TypeError):
        return []  # a damaged record: the run folder still says whether the trial finished


def _write_attempts(folder: SweepFolder, name: str, attempts: list[Attempt]) -> None:
    write_json(folder.attempts_path(name), {"attempts": [a.__dict__ for a in attempts]})


def comparable(cfg_dict: dict[str, Any], intended: dict[str, Any]) -> dict[str, Any]:
    """A config's dotted keys without those that may differ between a trial's intended config and
    its run folder's: where it ran, and a batch size that ``auto`` resolved."""
    flat = {k: v for k, v in flatten(cfg_dict).items() if k not in RUN_OPTIONS}
    if flatten(intended).get("train.batch_size") == "auto":
        flat.pop("train.batch_size", None)
    return flat


def trial_state(folder: SweepFolder, trial: Trial) -> str:
    """``done``, ``failed``, ``interrupted`` or ``pending`` (see the module docstring); a run
    folder holding other settings than the trial's is refused (it is not this trial's run)."""
    run_dir = folder.run_dir(trial.name)
    saved = RunLayout(run_dir).config
    if saved.is_file():
        intended = to_dict(trial.config)
        try:
            theirs = comparable(to_dict(load_yaml(saved)), intended)
        except ConfigError as exc:
            raise ConfigError(f"trial {trial.name}: {exc}") from None
        ours = comparable(intended, intended)
        changed = [f"{k}: {theirs.get(k)} (run) vs {ours.get(k)} (sweep)" for k in sorted(set(ours) | set(theirs))
                   if ours.get(k) != theirs.get(k)]
        if changed:
            raise ConfigError(f"{run_dir} holds a run with other settings than trial {trial.name} "
                              f"({'; '.join(changed[:4])}); move it away, or give another --out")
    if RunLayout(run_dir).results.is_file():
        return "done"
    attempts = read_attempts(folder, trial.name)
    if attempts and attempts[-1].returncode is not None and attempts[-1].returncode not in INTERRUPTED:
        return "failed"
    return "interrupted" if attempts or run_dir.exists() else "pending"


def _resumable(run_dir: Path) -> bool:
    try:
        checkpoint.resolve(RunLayout(run_dir).last)
    except CheckpointError:
        return False
    return True


def _last_error(log: Path) -> str:
    """The line that says why a trial failed: the CLI's ``dinotune: error:`` line, else the last one."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("dinotune: error:")]
    return (errors or lines or [""])[-1][:300]


def run_trial(folder: SweepFolder, trial: Trial, command: Sequence[str] = DEFAULT_COMMAND) -> Attempt:
    """Train ``trial`` in a new process (``train --resume`` when an interrupted run saved a
    checkpoint); its output goes to ``logs/<name>.log``. Returns the attempt, also recorded."""
    run_dir = folder.run_dir(trial.name)
    resume = run_dir.is_dir() and _resumable(run_dir)
    if run_dir.exists() and not resume:
        # stopped before its first checkpoint: nothing to keep, and `train` wants an empty --out
        shutil.rmtree(run_dir)
    if resume:
        args = ["train", "--resume", str(run_dir)]
    else:
        config_path = folder.config_path(trial.name)
        config_path.parent.mkdir(parents=True, exist_ok=True)
        save_yaml(trial.config, config_path)
        args = ["train", trial.config.task, "--config", str(config_path)]
    attempts = read_attempts(folder, trial.name)
    attempt = Attempt(resumed=resume, returncode=None, wall_s=0.0)
    _write_attempts(folder, trial.name, [*attempts, attempt])  # a sweep killed now leaves it "interrupted"
    log = folder.log_path(trial.name)
    t0 = time.perf_counter()
    try:
        with open(log, "a") as out:
            out.write(f"$ {' '.join(['dinotune', *args])}\n")
            out.flush()
            proc = subprocess.Popen([*command, *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            try:
                attempt.returncode = proc.wait()
            except BaseException:  # Ctrl-C reaches the child too (same process group): let it stop cleanly
                try:
                    attempt.returncode = proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    attempt.returncode = proc.wait()
                raise
    finally:
        attempt.wall_s = round(time.perf_counter() - t0, 2)
        if attempt.returncode not in (0, None) and attempt.returncode not in INTERRUPTED:
            attempt.error = _last_error(log)
        elif attempt.returncode == 0 and not RunLayout(run_dir).results.is_file():
            attempt.returncode, attempt.error = 1, f"exited without writing {RunLayout(run_dir).results}"
        _write_attempts(folder, trial.name, [*attempts, attempt])
    return attempt


def wall_time(folder: SweepFolder, name: str) -> float | None:
    """Seconds the trial's processes ran, over every attempt (None when none was recorded)."""
    attempts = read_attempts(folder, name)
    return round(sum(a.wall_s for a in attempts), 2) if attempts else None
