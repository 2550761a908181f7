"""Run logs: ``metrics.jsonl`` (one line per epoch), TensorBoard scalars, progress bars."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable

from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLogger:
    """Appends epoch records to ``metrics.jsonl`` and mirrors scalars to TensorBoard (``tb/``)."""

    def __init__(self, run_dir: Path, resume_epoch: int = 0, resume_step: int = 0):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        # On resume, drop records of epochs after the checkpoint: they will be written again.
        kept = [r for r in read_metrics(self.run_dir) if r.get("epoch", 0) <= resume_epoch]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
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
