"""Run logs: ``metrics.jsonl`` (one line per epoch), TensorBoard scalars, progress bars."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable

from tqdm.auto import tqdm

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
    """Appends epoch records to ``metrics.jsonl`` and mirrors scalars to TensorBoard (``tb/``)."""

    def __init__(self, run_dir: Path, resume_epoch: int = 0, resume_step: int = 0,
                 restore: Iterable[dict[str, Any]] = ()):
        """``restore``: on resume, the records the checkpoint holds, written back when missing."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        kept = resumed_records(read_metrics(self.run_dir), restore, resume_epoch)
        # atomic: a kill while rewriting must not lose the history
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._tb = None
        self._resume_step = resume_step

    @property
    def tb(self):
        if self._tb is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step discards events a crashed run logged past the checkpoint
            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=self._resume_step or None)
        return self._tb

    def scalars(self, values: dict[str, Any], step: int) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.tb.add_scalar(key, value, step)

    def epoch(self, record: dict[str, Any], step: int) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self.scalars({k: v for k, v in record.items() if "/" in k}, step)
        self.tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def progress(iterable: Iterable, enabled: bool, **kwargs: Any) -> tqdm:
    """A tqdm bar (ETA, rate, live postfix) on stderr; silent when disabled or when stderr is not a
    terminal (log files get the one-line epoch summaries instead of thousands of redraws)."""
    interactive = sys.stderr.isatty() or "ipykernel" in sys.modules  # terminals and notebooks
    return tqdm(
        iterable, disable=not enabled or not interactive, file=sys.stderr,
        dynamic_ncols=True, leave=False, **kwargs
    )
