"""``run_sweep``: one sweep from its settings to its table and chart (the body of ``dinotune sweep``
and ``dinotune.api.sweep``)."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Sequence

from dinotune.config import TASK_CONFIGS, ConfigError, build_config, to_dict
from dinotune.engine.run_folder import RunLayout
from dinotune.errors import DataError
from dinotune.sweep.folder import SweepFolder, settings_dict
from dinotune.sweep.grid import (
    MAX_COMBINATIONS,
    Axis,
    Expansion,
    check_size,
    combinations,
    display_name,
    expand,
    parse_axes,
)
from dinotune.sweep.plot import plot_pareto
from dinotune.sweep.runner import DEFAULT_COMMAND, read_attempts, trial_state, wall_time
from dinotune.sweep.search import place, require_optuna, run_grid, run_optuna
from dinotune.sweep.table import Row, read_row, write_tables
from dinotune.utils import info, warn

Search = Literal["grid", "optuna"]


@dataclass
class SweepResult:
    """What a sweep leaves: its folder, one row per trial (or head), the metric they are compared
    on and its direction, the files written, the notes under the table, and the best row."""

    sweep_dir: Path
    rows: list[Row]
    metric_name: str
    mode: Literal["max", "min"]
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    best: Row | None = None
    best_run: Path | None = None  # --linear-grid: the chosen head as a run folder


def best_row(rows: Sequence[Row], mode: str) -> Row | None:
    done = [r for r in rows if r.done and r.metric is not None]
    if not done:
        return None
    return max(done, key=lambda r: r.metric) if mode == "max" else min(done, key=lambda r: r.metric)


def _refuse_swept_flags(axes: Sequence[Axis], explicit: Iterable[str], option: str) -> None:
    explicit = set(explicit)
    both = [a.name for a in axes if a.key in explicit]
    if both:
        raise ConfigError(f"{', '.join('--' + n for n in both)} given as a flag and swept in {option}; "
                          "drop one of them")


def _check_base(cfg: Any) -> None:
    if not cfg.data.data:
        raise ConfigError("--data is required: the data every trial trains on")


_NOT_A_PATH = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")  # a dataset name (hf:NAME), not a path (C:\ is one)


def _check_data(cls: type, cfg: Any, axes: Sequence[Axis]) -> None:
    """The data the trials train and validate on exists: checked once, before the first trial,
    since each trial would otherwise start a process only to fail on it (what ``train`` refuses
    first). A dataset name (``hf:NAME``) is left to the task."""
    for key in ("data.data", "data.val_data"):
        values = [v for a in axes if a.key == key for v in a.values] or [getattr(cfg.data, key.split(".")[1], "")]
        for value in dict.fromkeys(values):
            if value and not _NOT_A_PATH.match(str(value)) and not Path(value).expanduser().exists():
                raise DataError(f"--{display_name(cls, key)} {value}: not found (no such file or folder); every "
                                "trial would fail on it, so none was started")


def run_sweep(task: str, base: Any, *, grid: Sequence[str] = (), linear_grid: Sequence[str] = (),
              search: Search = "grid", trials: int | None = None, out: str | Path,
              explicit: Iterable[str] = (), retry_failed: bool = False,
              finish: Callable[[Any], Any] | None = None,
              command: Sequence[str] = DEFAULT_COMMAND) -> SweepResult:
    """Run (or continue) the sweep in ``out``.

    Args:
        task: ``classify``, ``detect`` or ``segment``.
        base: the task config every trial starts from (flags and ``--config`` applied).
        grid: ``KEY=V1,V2`` items; every combination is a trial (``search="grid"``), or the
            choices optuna's TPE picks from (``search="optuna"``, ``trials`` of them).
        linear_grid: ``KEY=V1,V2`` items of heads trained together on cached features
            (``lr``, ``weight-decay``, ``pool``, ``label-smoothing``); instead of ``grid``.
        explicit: dotted keys the user set as flags (refused when also swept).
        retry_failed: run trials that failed before again.
        finish: called with the chosen head of a linear grid (``linear_grid.BestHead``) to write its
            plots and ``results.json`` as a training run does.
        command: how a trial's process starts (``python -m dinotune``; tests put stand-ins here).
    """
    if task not in TASK_CONFIGS:
        raise ConfigError(f"unknown task {task!r}; valid: {', '.join(TASK_CONFIGS)}")
    if bool(grid) == bool(linear_grid):
        raise ConfigError("give either --grid KEY=V1,V2 ... (trials in their own processes) or --linear-grid "
                          "lr=... pool=... (heads on one pass of cached features)")
    cls = TASK_CONFIGS[task]
    base = build_config(task, base)
    _check_base(base)
    if linear_grid:
        if search != "grid":
            raise ConfigError("--linear-grid trains every head of its grid at once; it takes no --search")
        return _linear(task, base, linear_grid, out=out, explicit=explicit, finish=finish)
    axes, notes = parse_axes(cls, grid)
    _refuse_swept_flags(axes, explicit, "--grid")
    if search == "optuna":
        if not trials or trials < 1:
            raise ConfigError("--search optuna needs --trials N (how many trials the search may train)")
        require_optuna()  # a missing optuna is told before any folder is made
    elif search != "grid":
        raise ConfigError(f"--search {search}: choose grid or optuna")
    # a grid trains every combination: over the limit it is refused; optuna picks --trials of them,
    # so its space may be larger, but then it is checked value by value rather than expanded
    count = check_size(axes) if search == "grid" else combinations(axes)
    _check_data(cls, base, axes)
    if count <= MAX_COMBINATIONS:
        expansion = expand(task, to_dict(base), axes)
        _validate(expansion)
        notes += expansion.notes
    else:
        _validate_values(task, to_dict(base), axes)
        expansion = None
    settings = settings_dict(task, search, {a.name: list(a.labels) for a in axes}, base,
                             trials if search == "optuna" else None)
    folder = SweepFolder.open(out, settings)
    try:
        for note in notes:
            info(note)
        from dinotune.tasks import get_task

        mode = get_task(base).monitor_mode
        if search == "grid":
            assert expansion is not None  # a grid is never over the limit
            chosen = [place(folder, t) for t in expansion.trials]
            info(f"sweep {folder.path}: {len(chosen)} trials")
            run_grid(folder, chosen, retry_failed=retry_failed, command=command)
        else:
            chosen = run_optuna(folder, task, to_dict(base), axes, trials, mode, seed=base.train.seed,
                                retry_failed=retry_failed, command=command)
        rows = [read_row(t.name, t.settings, folder.run_dir(t.name), t.monitor, trial_state(folder, t),
                         wall_time(folder, t.name)) for t in chosen]
        for row in rows:
            if row.status == "failed":
                error = _failure(folder, row.name)
                row.status = f"failed: {error}" if error else "failed"
        return _report(folder, rows, mode, notes, [t.monitor for t in chosen])
    finally:
        folder.release()


def _failure(folder: SweepFolder, name: str) -> str:
    attempts = read_attempts(folder, name)
    return attempts[-1].error if attempts else ""


def _validate(expansion: Expansion) -> None:
    """Every trial's config is valid, checked before any trial runs (the error names the trial)."""
    for trial in expansion.trials:
        try:
            trial.config.validate()
        except ConfigError as exc:
            raise ConfigError(f"trial {trial.name}: {exc}") from None


def _validate_values(task: str, base: dict[str, Any], axes: Sequence[Axis]) -> None:
    """Each value of each axis, alone on the base config, is valid: the check of a space too large
    to expand (optuna's trials are checked again as they are asked for)."""
    for axis in axes:
        for label, value in zip(axis.labels, axis.values):
            try:
                build_config(task, base, **{axis.key: value}).validate()
            except ConfigError as exc:
                raise ConfigError(f"--grid {axis.name}={label}: {exc}") from None


def _report(folder: SweepFolder, rows: list[Row], mode: Literal["max", "min"], notes: list[str],
            monitors: Sequence[str], best_run: Path | None = None) -> SweepResult:
    """The table, the chart and the notes under the table (the best trial among them)."""
    notes = list(notes)
    keys = {r.extra["metric_key"] for r in rows if r.extra.get("metric_key")}
    if len(set(monitors)) > 1:
        metric_name = "monitored metric"
        notes.append("the trials monitor different metrics (" + ", ".join(sorted(set(monitors)))
                     + "): compare their rows with care")
    else:
        metric_name = keys.pop() if len(keys) == 1 else f"val/{next(iter(monitors), 'loss')}"
        if metric_name == "train/loss":  # no validation data: the runs kept their lowest training loss
            mode = "min"
    best = best_row(rows, mode)
    if best is not None:
        notes.append(f"best: {best.name} ({metric_name} {best.metric:.4f})"
                     + (f", saved as the run folder {best_run}" if best_run else ""))
    files = write_tables(rows, metric_name, folder.path, notes)
    files.append(plot_pareto(rows, folder.path / "pareto.png", metric_name, mode))
    return SweepResult(folder.path, rows, metric_name, mode, files, notes, best, best_run)


def _linear(task: str, base: Any, items: Sequence[str], *, out: str | Path, explicit: Iterable[str],
            finish: Callable[[Any], Any] | None) -> SweepResult:
    """The linear grid: heads trained together, or read back when this folder already has them."""
    from dinotune.sweep import linear_grid as lg

    cls = TASK_CONFIGS[task]
    probe = lg.linear_probe(base)  # refuses a task that has no linear evaluation
    explicit = set(explicit)
    if "adapter.kind" not in explicit:
        base.adapter.kind = "none"  # the linear grid's own setting; any other adapter given is refused
    probe.prepare(base)  # as a lone run on cached features has it: every trial's config inherits it
    axes, notes = parse_axes(cls, items, "--linear-grid")
    lg.check_axes(cls, axes, probe)
    _refuse_swept_flags(axes, explicit, "--linear-grid")
    lg.check_config(base, probe)
    check_size(axes, "--linear-grid")
    _check_data(cls, base, axes)
    expansion = expand(task, to_dict(base), axes, "--linear-grid")
    _validate(expansion)
    notes += expansion.notes
    settings = settings_dict(task, "linear", {a.name: list(a.labels) for a in axes}, base, None)
    folder = SweepFolder.open(out, settings)
    try:
        for note in notes:
            info(note)
        best_dir = folder.path / lg.BEST_DIR
        saved = folder.path / lg.HEADS_FILE
        from dinotune.tasks import get_task

        the_task = get_task(base)
        if saved.is_file() and RunLayout(best_dir).results.is_file():  # results.json is written last
            info(f"{folder.path}: the linear grid is trained already; its table is read back")
            rows = [Row(**r) for r in json.loads(saved.read_text())["rows"]]
        else:
            for t in expansion.trials:
                t.config.train.out = str(best_dir)
            info(f"linear grid {folder.path}: {len(expansion.trials)} heads on one pass of cached features")
            heads, meta, peak = lg.train_heads(base, expansion.trials, folder.path / "cache",
                                               show_progress=base.train.progress)
            rows = lg.head_rows(heads, peak)
            lg.save_heads(heads, rows, folder.path)
            chosen = lg.choose(heads)
            if best_dir.exists():
                shutil.rmtree(best_dir)  # a half-written earlier attempt
            if chosen is None:
                warn("no head of the linear grid finished training (their errors are in the table's status column)")
            else:
                written = lg.write_run(chosen, meta, best_dir)
                if finish is not None:
                    finish(written)
        notes.append("heads trained together: memory is the process's peak for all of them; wall s and img/s "
                     "are each head's own steps and evaluations, the one feature extraction not included")
        return _report(folder, rows, the_task.monitor_mode, notes, [the_task.monitor],
                       best_run=best_dir if best_dir.is_dir() else None)
    finally:
        folder.release()
