"""Which trials a sweep runs, and in what order: every trial of the grid (``--search grid``), or
optuna's TPE sampler choosing among the grid's values (``--search optuna --trials N``).

Both leave finished trials alone (their folders are reused, whatever asked for them) and go on
past a failed one; both can be stopped and called again to continue.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Sequence

from dinotune.config import ConfigError
from dinotune.engine.run_folder import RunLayout
from dinotune.sweep.folder import SweepFolder
from dinotune.sweep.grid import Axis, Trial, combinations, make_trial
from dinotune.sweep.runner import DEFAULT_COMMAND, INTERRUPTED, run_trial, trial_state
from dinotune.sweep.table import monitored
from dinotune.utils import info, warn

STUDY_FILE = "optuna.journal"
STUDY_NAME = "dinotune-sweep"


def place(folder: SweepFolder, trial: Trial) -> Trial:
    """Point the trial's config at its run folder (its process writes no progress bars: they
    would fill its log) and note the metric it is judged by (a detection head names its own)."""
    from dinotune.tasks import get_task

    trial.config.train.out = str(folder.run_dir(trial.name))
    trial.config.train.progress = False
    chosen = trial.config.train.monitor
    trial.monitor = get_task(trial.config).monitor if chosen == "auto" else chosen.removeprefix("val/")
    return trial


def result(folder: SweepFolder, trial: Trial) -> tuple[str, float | None]:
    """The monitored metric's key and value at the trial's best epoch (None without results)."""
    path = RunLayout(folder.run_dir(trial.name)).results
    if not path.is_file():
        return f"val/{trial.monitor}", None
    summary = json.loads(path.read_text())
    return monitored(summary.get("best") or {}, trial.monitor, summary.get("monitor"))


def _describe(folder: SweepFolder, trial: Trial) -> str:
    key, value = result(folder, trial)
    return f"{key} {value:.4f}" if value is not None else "no metric"


def ensure(folder: SweepFolder, trial: Trial, *, retry_failed: bool, label: str,
           command: Sequence[str] = DEFAULT_COMMAND) -> str:
    """Bring one trial to an end state: a finished one is left alone, a failed one too unless
    ``retry_failed``, anything else is (re)started. Returns its state afterwards."""
    state = trial_state(folder, trial)
    if state == "done" or (state == "failed" and not retry_failed):
        return state
    how = "resuming" if state == "interrupted" else "retrying" if state == "failed" else "training"
    info(f"{label} {trial.name}: {how} (log: {folder.log_path(trial.name)})")
    attempt = run_trial(folder, trial, command)
    if attempt.returncode == 0:
        info(f"{label} {trial.name}: done in {attempt.wall_s:.0f} s, {_describe(folder, trial)}")
        return "done"
    if attempt.returncode in INTERRUPTED:
        warn(f"{label} {trial.name}: stopped (exit {attempt.returncode}) before it finished; the next call "
             "of this sweep resumes it")
        return "interrupted"
    warn(f"{label} {trial.name}: failed (exit {attempt.returncode}): {attempt.error or 'see its log'}; "
         "the sweep goes on")
    return "failed"


def run_grid(folder: SweepFolder, trials: Sequence[Trial], *, retry_failed: bool = False,
             command: Sequence[str] = DEFAULT_COMMAND) -> None:
    """Every trial in order; trials already finished (or failed, unless ``retry_failed``) are skipped."""
    states = {t.name: trial_state(folder, t) for t in trials}  # refuses foreign run folders before any work
    todo = [t for t in trials if states[t.name] in ("pending", "interrupted")
            or (retry_failed and states[t.name] == "failed")]
    counts = {s: sum(1 for v in states.values() if v == s) for s in ("done", "failed", "interrupted")}
    if counts["done"] or counts["failed"] or counts["interrupted"]:
        info(f"{folder.path}: {counts['done']} of {len(trials)} trials done, {counts['failed']} failed"
             f"{' (not retried: --retry-failed runs them again)' if counts['failed'] and not retry_failed else ''}, "
             f"{counts['interrupted']} interrupted")
    for i, trial in enumerate(todo):
        ensure(folder, trial, retry_failed=retry_failed, label=f"[{i + 1}/{len(todo)}]", command=command)


def invalid(trial: Trial) -> str:
    """Why the trial's config is invalid ("" when valid). A sweep checks every trial of its grid
    before the first runs; optuna over a space too large to expand checks each as it is asked for."""
    try:
        trial.config.validate()
    except ConfigError as exc:
        return str(exc)
    return ""


def require_optuna() -> Any:
    """The optuna module, or a ConfigError naming the extra that installs it."""
    try:
        import optuna
    except ImportError:
        raise ConfigError("--search optuna needs optuna: pip install 'dinotune[sweep]' (or pip install optuna)") from None
    return optuna


def run_optuna(folder: SweepFolder, task: str, base: dict[str, Any], axes: list[Axis], n_trials: int,
               mode: Literal["max", "min"], *, seed: int = 0, retry_failed: bool = False,
               command: Sequence[str] = DEFAULT_COMMAND) -> list[Trial]:
    """TPE over the grid's values (one categorical choice per axis) until the study holds
    ``n_trials`` trials; the study lives in ``SWEEP/optuna.journal``, so a second call continues
    it (a trial an interrupted call left running is finished first). A choice that maps onto a
    trial already trained (the same settings, or settings that differ only where they do not
    apply) reuses its result. Returns the distinct trials, in the order first asked for."""
    optuna = require_optuna()
    from optuna.distributions import CategoricalDistribution
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    journal = Path(folder.path) / STUDY_FILE
    try:  # optuna replays the whole journal here; a damaged one fails in many ways, none of them ours
        storage = JournalStorage(JournalFileBackend(str(journal)))
        study = optuna.create_study(study_name=STUDY_NAME, storage=storage, load_if_exists=True,
                                    direction="maximize" if mode == "max" else "minimize",
                                    sampler=optuna.samplers.TPESampler(seed=seed))
        asked_before = study.get_trials(deepcopy=False)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, AssertionError) as exc:
        raise ConfigError(f"{journal}: damaged, optuna cannot read the study ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:120]}); move it away to start the search afresh (the "
                          "trials already trained are reused), or give another --out") from None
    space = {a.name: CategoricalDistribution(list(a.labels)) for a in axes}
    distinct = combinations(axes)
    if n_trials > distinct:
        warn(f"--trials {n_trials} is more than the grid's {distinct} combinations: TPE will ask for some "
             "settings again (they are trained once); --search grid tries each exactly once")
    seen: dict[str, Trial] = {}

    def settle(number: int, params: dict[str, str], label: str) -> None:
        missing = [a.name for a in axes if params.get(a.name) not in a.labels]
        if missing:
            raise ConfigError(f"{folder.path / STUDY_FILE}: trial {number} has no valid value for "
                              f"{', '.join(missing)}; the study belongs to other settings")
        trial, _ = make_trial(task, base, axes, {a.name: params[a.name] for a in axes})
        problem = "" if trial.name in seen else invalid(trial)
        if problem:
            warn(f"{label} {trial.name}: not trained, its settings are invalid: {problem}")
            study.tell(number, state=TrialState.FAIL)
            return
        trial = seen.setdefault(trial.name, place(folder, trial))
        state = ensure(folder, trial, retry_failed=retry_failed, label=label, command=command)
        value = result(folder, trial)[1] if state == "done" else None
        if value is None:
            study.tell(number, state=TrialState.FAIL)
        else:
            study.tell(number, value)

    for old in asked_before:  # the settings asked for before, in order
        if old.state != TrialState.RUNNING and all(old.params.get(a.name) in a.labels for a in axes):
            trial, _ = make_trial(task, base, axes, {a.name: old.params[a.name] for a in axes})
            if not invalid(trial):
                seen.setdefault(trial.name, place(folder, trial))
    for old in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        settle(old.number, old.params, f"[optuna {old.number + 1}/{n_trials}]")
    while len(study.trials) < n_trials:
        asked = study.ask(space)
        settle(asked.number, dict(asked.params), f"[optuna {asked.number + 1}/{n_trials}]")
    return list(seen.values())
