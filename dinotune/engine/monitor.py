"""What a run watches: the monitored metric, which epoch (and which weights, raw or EMA) is the
best so far, and when to stop early.

An epoch record holds the monitored metric as ``val/<metric>`` (raw weights) and, with
``--ema``, ``val_ema/<metric>`` (the averaged weights); without validation data the run
watches ``train/loss``. An epoch's score is the better of the two; ``raw`` wins a tie.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

EMA_PREFIX = "val_ema/"
# Counts written beside validation metrics (``val/images`` ...): bookkeeping, not scores.
COUNT_KEYS = ("images", "count", "pixels")


def is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class Monitor:
    """The monitored ``key`` (``val/top1``, ``train/loss``) and whether ``max`` or ``min`` is better."""

    key: str
    mode: str

    @property
    def ema_key(self) -> str | None:
        """``val_ema/<metric>`` for a validation metric, None for ``train/loss``."""
        return EMA_PREFIX + self.key[len("val/"):] if self.key.startswith("val/") else None

    def better(self, a: float, b: float, margin: float = 0.0) -> bool:
        """``a`` is better than ``b`` by more than ``margin``."""
        return a - margin > b if self.mode == "max" else a + margin < b

    def score(self, record: dict[str, Any] | None) -> tuple[float, str] | None:
        """The record's score and the weights that gave it (``"raw"`` / ``"ema"``); None when the
        epoch was not evaluated (or its metric is not finite)."""
        found = [(record.get(k), w) for k, w in ((self.key, "raw"), (self.ema_key, "ema")) if record and k]
        found = [(float(v), w) for v, w in found if is_scalar(v) and math.isfinite(v)]
        if not found:
            return None
        best = found[0]
        for value, which in found[1:]:
            if self.better(value, best[0]):
                best = (value, which)
        return best

    def improved(self, record: dict[str, Any], best: dict[str, Any] | None) -> str | None:
        """``"raw"`` / ``"ema"`` when ``record`` beats the ``best`` record so far (and which
        weights did), else None."""
        score = self.score(record)
        if score is None:
            return None
        previous = self.score(best)
        return score[1] if previous is None or self.better(score[0], previous[0]) else None


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

    def update(self, monitor: Monitor, record: dict[str, Any], final: bool) -> bool:
        """Count the epoch ``record`` (when evaluated); True when the run should stop now. The
        ``final`` epoch ends the run anyway, so it never counts as stopping early."""
        score = monitor.score(record)
        if self.patience <= 0 or score is None:
            return False
        if self.reference is None or monitor.better(score[0], self.reference, self.min_delta):
            self.reference, self.reference_epoch, self.waited = score[0], record["epoch"], 0
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


def epoch_line(record: dict[str, Any], monitor: Monitor, total_epochs: int, best: str | None, ema: bool,
               eta: float) -> str:
    """The epoch line: losses, the monitored metric (and its EMA score), then other validation
    scores, at most 5 besides the EMA one. Counts (``val/images``, ...) are bookkeeping, not
    scores: printed as ``1234.0000`` they would read as one, so they stay in the logs only.
    ``best``: ``"raw"`` / ``"ema"`` when this epoch is the best so far (said when ``ema``);
    ``eta``: seconds left."""
    scores = [k for k in record if k.startswith("val/") and k.split("/", 1)[1] not in COUNT_KEYS]
    keys = [k for k in dict.fromkeys(["train/loss", "val/loss", monitor.key] + scores) if k in record][:5]
    if ema and monitor.ema_key in record:
        keys.insert(keys.index(monitor.key) + 1 if monitor.key in keys else len(keys), monitor.ema_key)
    parts = [f"{k} {record[k]:.4f}" for k in keys if is_scalar(record[k])]
    mark = "" if best is None else f" (best{', ' + best + ' weights' if ema else ''})"
    return (f"epoch {record['epoch']}/{total_epochs} [{record['phase']}] " + "  ".join(parts)
            + f"{mark}  {record['time_s']:.1f}s" + (f", ~{_fmt_time(eta)} left" if eta >= 1 else ""))


def _fmt_time(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
