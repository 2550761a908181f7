"""Run logs: ``metrics.jsonl`` (one line per epoch), the ``--report-to`` trackers, progress bars."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from tqdm.auto import tqdm

from dinotune.engine.trackers import open_trackers
from dinotune.utils import atomic_write_text, warn

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The epoch records of ``metrics.jsonl``. A line that is not JSON (one cut short when a run was
    killed while appending it) is skipped with a warning: the rest of the history stays readable."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            warn(f"{path}, line {number} is damaged (cut short by an interruption?); skipped")
            continue
        records.append(record)
    return records


def resumed_records(records: list[dict[str, Any]], restore: Iterable[dict[str, Any]],
                    resume_epoch: int) -> list[dict[str, Any]]:
    """The history a resumed run continues: one record per epoch up to ``resume_epoch``, in order.
    Later epochs are dropped (they run again); epochs whose line is missing (a run killed between
    saving its checkpoint and logging the epoch) are taken from ``restore``, the records the
    checkpoint keeps."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for record in records:
        by_epoch[record.get("epoch", 0)] = record  # a repeated epoch: its later line wins
    for record in restore:
        by_epoch.setdefault(record["epoch"], record)
    return [by_epoch[epoch] for epoch in sorted(by_epoch) if epoch <= resume_epoch]


class RunLogger:
    """Appends epoch records to ``metrics.jsonl`` (always) and fans values out to the trackers of
    ``--report-to`` (``trackers.py``: TensorBoard in ``tb/``, ``metrics.csv``, wandb, MLflow)."""

    def __init__(self, run_dir: Path, resume_epoch: int = 0, resume_step: int = 0,
                 restore: Iterable[dict[str, Any]] = (), report_to: Sequence[str] = ("tensorboard",),
                 config: dict[str, Any] | None = None):
        """``restore``: on resume, the records the checkpoint holds, written back when missing.
        ``report_to``: tracker names (``none``: ``metrics.jsonl`` only); ``config``: the run's
        config as a nested dict, for the trackers that record it."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        kept = resumed_records(read_metrics(self.run_dir), restore, resume_epoch)
        # atomic: a kill while rewriting must not lose the history
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.trackers = open_trackers(report_to, self.run_dir, history=kept, resume_step=resume_step, config=config)

    def scalars(self, values: dict[str, Any], step: int) -> None:
        for tracker in self.trackers:
            tracker.scalars(values, step)

    def epoch(self, record: dict[str, Any], step: int) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.epoch(record, step)

    def close(self) -> None:
        # called from the trainer's ``finally``: an exception in flight means the run failed
        failed = sys.exc_info()[0] is not None
        for tracker in self.trackers:
            try:
                tracker.close(failed)
            except Exception as exc:  # the run is over: a tracker that fails to close must not hide its results
                warn(f"closing the {type(tracker).__name__} failed: {exc}")


def progress(iterable: Iterable, enabled: bool, **kwargs: Any) -> tqdm:
    """A tqdm bar (ETA, rate, live postfix) on stderr; silent when disabled or when stderr is not a
    terminal (log files get the one-line epoch summaries instead of thousands of redraws)."""
    interactive = sys.stderr.isatty() or "ipykernel" in sys.modules  # terminals and notebooks
    return tqdm(
        iterable, disable=not enabled or not interactive, file=sys.stderr,
        dynamic_ncols=True, leave=False, **kwargs
    )
