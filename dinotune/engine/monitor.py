"""What a run watches: the monitored metric, which epoch (and which weights, raw or EMA) is the
best so far, and when to stop early.

The metric is ``--monitor`` (``train.monitor``), or with ``auto`` the task's default for the
run's data (``MonitorChoice``, see ``choose_monitor``). An epoch record holds it as
``val/<metric>`` (raw weights) and, with ``--ema``, ``val_ema/<metric>`` (the averaged weights);
without validation data the run watches ``train/loss``. An epoch's score is the better of the two;
``raw`` wins a tie.

A task may also report ``collapsed`` (1: the model gave one answer for every input, e.g. one class
for every image): weights that collapsed never beat weights that did not, whatever the metric, so
a collapsed epoch is best only while no healthy one has been seen.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from dinotune.errors import ConfigError

EMA_PREFIX = "val_ema/"
# Counts written beside validation metrics (``val/images`` ...): bookkeeping, not scores.
COUNT_KEYS = ("images", "count", "pixels")
# A validation flag a task may report (0 / 1): the model gave one answer for everything.
COLLAPSED = "collapsed"


def is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class MonitorChoice:
    """What a task offers for one run's data (``Task.monitor_for``).

    Attributes:
        default: the key of ``evaluate``'s result that picks the best checkpoint under
            ``--monitor auto``.
        mode: ``max`` / ``min``: whether a larger or smaller ``default`` is better.
        reason: why that metric, for the line said at the start ("validation classes
            imbalanced: 312 / 58 / 53 images"); empty when there is nothing to explain.
        keys: the keys ``--monitor`` may name, or None when the task does not declare them
            (then they are checked against the first evaluation's result).
        without_validation: what picks the best checkpoint of a run with no validation data:
            ``loss`` (the lowest training loss) or ``last`` (the last epoch: a loss whose scale
            moves with its schedules, such as self-distillation's, ranks no epochs).
    """

    default: str
    mode: str = "max"
    reason: str = ""
    keys: tuple[str, ...] | None = None
    without_validation: str = "loss"


@dataclass(frozen=True)
class Monitor:
    """The monitored ``key`` (``val/top1``, ``train/loss``), whether ``max`` or ``min`` is better,
    and why that metric (``reason``, said at the start and kept in ``results.json``)."""

    key: str
    mode: str
    reason: str = ""

    @property
    def ema_key(self) -> str | None:
        """``val_ema/<metric>`` for a validation metric, None for ``train/loss``."""
        return EMA_PREFIX + self.key[len("val/"):] if self.key.startswith("val/") else None

    @property
    def metric(self) -> str:
        """The key without its prefix (``accuracy_balanced``, ``loss``)."""
        return self.key.split("/", 1)[1] if "/" in self.key else self.key

    def better(self, a: float, b: float, margin: float = 0.0) -> bool:
        """``a`` is better than ``b`` by more than ``margin``."""
        return a - margin > b if self.mode == "max" else a + margin < b

    def collapsed(self, record: dict[str, Any] | None, which: str = "raw") -> bool:
        """Whether the ``which`` weights (``"raw"`` / ``"ema"``) of ``record`` collapsed (the task
        reported ``collapsed`` 1 for them)."""
        if not record or not self.key.startswith("val/"):
            return False
        return bool(record.get(("val/" if which == "raw" else EMA_PREFIX) + COLLAPSED))

    def score(self, record: dict[str, Any] | None) -> tuple[float, str] | None:
        """The record's score and the weights that gave it (``"raw"`` / ``"ema"``); None when the
        epoch was not evaluated (or its metric is not finite). Weights that did not collapse win
        over weights that did, whatever their values."""
        found = [(record.get(k), w) for k, w in ((self.key, "raw"), (self.ema_key, "ema")) if record and k]
        found = [(float(v), w) for v, w in found if is_scalar(v) and math.isfinite(v)]
        if not found:
            return None
        best = found[0]
        for value, which in found[1:]:
            if self._beats((value, which), record, best, record):
                best = (value, which)
        return best

    def _beats(self, a: tuple[float, str], a_record: dict[str, Any] | None, b: tuple[float, str],
               b_record: dict[str, Any] | None, margin: float = 0.0) -> bool:
        """Score ``a`` of ``a_record`` beats score ``b`` of ``b_record``: a healthy score beats a
        collapsed one; otherwise the better value by more than ``margin`` wins."""
        a_bad, b_bad = self.collapsed(a_record, a[1]), self.collapsed(b_record, b[1])
        if a_bad != b_bad:
            return b_bad
        return self.better(a[0], b[0], margin)

    def improved(self, record: dict[str, Any], best: dict[str, Any] | None) -> str | None:
        """``"raw"`` / ``"ema"`` when ``record`` beats the ``best`` record so far (and which
        weights did), else None. A record whose weights did not collapse beats a collapsed
        ``best`` whatever the metric says; a collapsed one never beats a healthy ``best``."""
        score = self.score(record)
        if score is None:
            return None
        previous = self.score(best)
        return score[1] if previous is None or self._beats(score, record, previous, best) else None

    def summary(self) -> dict[str, Any]:
        """For ``results.json`` and ``best_metrics.json``: which metric picked the best
        checkpoint, in which direction, and why."""
        return asdict(self)

    def describe(self) -> str:
        """The line said at the start of training."""
        direction = "" if self.mode == "max" else ", the lowest"
        return f"best checkpoint by {self.metric}{direction}" + (f" ({self.reason})" if self.reason else "")


def direction(metric: str, choice: MonitorChoice) -> str:
    """``max`` / ``min`` for ``--monitor-mode auto``: the task's own for its default metric, ``min``
    for a loss (``loss``, ``loss_giou``, ...), ``max`` for every other score."""
    if metric == choice.default:
        return choice.mode
    return "min" if metric == "loss" or metric.startswith("loss_") or metric.endswith("_loss") else "max"


def choose_monitor(setting: str, mode: str, choice: MonitorChoice, validating: bool) -> Monitor:
    """The run's ``Monitor``: ``setting`` (``train.monitor``: a metric, or ``auto`` for the task's
    ``choice``) in the direction ``mode`` (``train.monitor_mode``: ``max`` / ``min``, or ``auto``,
    see ``direction``); without validation data (``validating`` False), the training loss.

    Raises:
        ConfigError: ``setting`` is not among the keys the task declares, naming them.
    """
    if not validating:
        if choice.without_validation == "last":
            return Monitor("epoch", "max", "no validation data: the last epoch")
        return Monitor("train/loss", "min", "no validation data")
    if setting == "auto":
        metric, reason = choice.default, choice.reason
    else:
        metric, reason = setting.removeprefix("val/"), f"--monitor {setting}"
        check_metric(metric, choice.keys)
    chosen = direction(metric, choice) if mode == "auto" else mode
    return Monitor(f"val/{metric}", chosen, reason)


def check_metric(metric: str, keys: Sequence[str] | None) -> None:
    """Refuse a ``--monitor`` metric that is not among ``keys`` (the metrics an evaluation gives;
    None: not known, only counts and the ``collapsed`` flag are refused), naming the valid ones."""
    valid = None if keys is None else [k for k in keys if k not in COUNT_KEYS and k != COLLAPSED]
    if metric not in (*COUNT_KEYS, COLLAPSED) and (valid is None or metric in valid):
        return
    choices = ", ".join(valid) if valid is not None else "the keys of the validation metrics"
    raise ConfigError(f"--monitor {metric}: not a validation metric of this run; choose from {choices} "
                      "or auto (train.monitor)")


@dataclass
class EarlyStopping:
    """Stops a run after ``patience`` evaluations in a row that did not beat the reference score
    by more than ``min_delta`` (Keras' and Lightning's rule: the reference only moves on such an
    improvement). ``patience`` 0 = off. Its state travels in the trainer state, so a resumed
    run counts on and a stopped one stays stopped."""

    patience: int
    min_delta: float
    reference: float | None = None  # the score the next evaluations have to beat
    reference_epoch: int = 0
    waited: int = 0  # evaluations since the reference was set
    stopped: int | None = None  # the epoch after which the run stopped
    reference_collapsed: bool = False  # the reference epoch's weights collapsed (a healthy one beats it)

    def update(self, monitor: Monitor, record: dict[str, Any], final: bool) -> bool:
        """Count the epoch ``record`` (when evaluated); True when the run should stop now. The
        ``final`` epoch ends the run anyway, so it never counts as stopping early. As for the best
        epoch, the first healthy epoch after collapsed ones is an improvement whatever its value,
        and a collapsed one never improves on a healthy reference."""
        score = monitor.score(record)
        if self.patience <= 0 or score is None:
            return False
        collapsed = monitor.collapsed(record, score[1])
        if (self.reference is None or (self.reference_collapsed and not collapsed)
                or (collapsed == self.reference_collapsed
                    and monitor.better(score[0], self.reference, self.min_delta))):
            self.reference, self.reference_epoch, self.waited = score[0], record["epoch"], 0
            self.reference_collapsed = collapsed
        else:
            self.waited += 1
        if self.waited >= self.patience and not final:
            self.stopped = record["epoch"]
        return self.stopped is not None

    def message(self, monitor: Monitor, best: dict[str, Any] | None, total_epochs: int) -> str:
        """Why the run stopped, and where its best weights are."""
        delta = f" by more than {self.min_delta:g}" if self.min_delta else ""
        text = (f"stopped early after epoch {self.stopped}/{total_epochs}: {monitor.key} has not improved{delta} "
                f"for {self.waited} evaluation{'s' if self.waited != 1 else ''} (--patience {self.patience}; "
                f"last improvement at epoch {self.reference_epoch})")
        score = monitor.score(best)
        if best and score:
            weights = f", {score[1]} weights" if best.get("weights") else ""
            text += f"; the best epoch, {best['epoch']} ({score[0]:.4f}{weights}), is in checkpoints/best"
        return text

    def summary(self, monitor: Monitor) -> dict[str, Any] | None:
        """For ``results.json``: the epoch the run stopped after, and why; None if it did not."""
        if self.stopped is None:
            return None
        return {"epoch": self.stopped, "metric": monitor.key, "patience": self.patience,
                "min_delta": self.min_delta, "last_improvement_epoch": self.reference_epoch}

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # the counters only: patience and min_delta come from the run's config
        self.reference, self.reference_epoch = state["reference"], state["reference_epoch"]
        self.waited, self.stopped = state["waited"], state["stopped"]
        self.reference_collapsed = bool(state.get("reference_collapsed", False))  # absent in older runs


def epoch_line(record: dict[str, Any], monitor: Monitor, total_epochs: int, best: str | None, ema: bool,
               eta: float) -> str:
    """The epoch line: losses, the monitored metric (and its EMA score), then other validation
    scores, at most 5 besides the EMA one. Counts (``val/images``, ...) are bookkeeping, not
    scores: printed as ``1234.0000`` they would read as one, so they stay in the logs only; so does
    the ``collapsed`` flag, said in words instead. ``best``: ``"raw"`` / ``"ema"`` when this epoch is
    the best so far (said when ``ema``); ``eta``: seconds left."""
    scores = [k for k in record if k.startswith("val/") and k.split("/", 1)[1] not in (*COUNT_KEYS, COLLAPSED)]
    keys = [k for k in dict.fromkeys(["train/loss", "val/loss", monitor.key] + scores) if k in record][:5]
    if ema and monitor.ema_key in record:
        keys.insert(keys.index(monitor.key) + 1 if monitor.key in keys else len(keys), monitor.ema_key)
    parts = [f"{k} {record[k]:.4f}" for k in keys if is_scalar(record[k])]
    collapsed = [w for w in ("raw", "ema") if monitor.collapsed(record, w)]
    if collapsed:
        parts.append(("collapsed" if not ema else " and ".join(collapsed) + " weights collapsed")
                     + " (one answer for everything)")
    mark = "" if best is None else f" (best{', ' + best + ' weights' if ema else ''})"
    return (f"epoch {record['epoch']}/{total_epochs} [{record['phase']}] " + "  ".join(parts)
            + f"{mark}  {record['time_s']:.1f}s" + (f", ~{_fmt_time(eta)} left" if eta >= 1 else ""))


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
