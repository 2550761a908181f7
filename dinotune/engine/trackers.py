"""Where a run's numbers go besides ``metrics.jsonl`` (``--report-to``): TensorBoard, a CSV table,
Weights & Biases, MLflow.

Every tracker has the same three methods, called by ``RunLogger`` on process 0 only:
``scalars(values, step)`` (per-step scalars and per-class tables), ``epoch(record, step)`` (the
epoch's record, as in ``metrics.jsonl``) and ``close(failed)``. ``step`` is the optimizer step.

wandb and mlflow are optional extras that log offline unless the user configured otherwise:
wandb in offline mode (unless ``WANDB_MODE`` is set) under ``RUN/wandb``; MLflow in a file store
``RUN/mlruns`` (unless ``MLFLOW_TRACKING_URI`` is set). MLflow 3 keeps file stores in
maintenance mode and refuses them unless ``MLFLOW_ALLOW_FILE_STORE`` is true; its default, a
SQLite database, needs SQLAlchemy, which ``mlflow-skinny`` does not install. The file store
works with ``mlflow-skinny`` alone and offline, so dinotune allows it for its own store (only
while opening it). To browse it: ``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri
RUN/mlruns``. Both remember their run id in ``RUN/trackers.json``, so a resumed run continues the
same wandb / MLflow run.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import io
import json
import math
import os
import posixpath
import re
import time
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from dinotune.errors import ConfigError
from dinotune.utils import atomic_write_text, info, write_json

TRACKER_IDS = "trackers.json"  # the wandb / MLflow run ids of a run folder, for resume
CSV_FILE = "metrics.csv"
_EXTRAS = {"wandb": ("wandb", "wandb"), "mlflow": ("mlflow", "mlflow")}  # tracker: (module, extra)


class Tracker(Protocol):
    def scalars(self, values: dict[str, Any], step: int) -> None: ...

    def epoch(self, record: dict[str, Any], step: int) -> None: ...

    def close(self, failed: bool = False) -> None: ...


def numeric(values: dict[str, Any]) -> dict[str, float]:
    """The finite real numbers of ``values`` (booleans, strings and NaN are left out)."""
    return {k: v for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _require(name: str) -> Any:
    """The module of an optional tracker, or a ConfigError saying how to install it."""
    module, extra = _EXTRAS[name]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(f"--report-to {name} needs the {module} package, which is not installed ({exc}): "
                          f"pip install \"dinotune[{extra}]\" (or leave {name} out of --report-to)") from exc


def check_trackers(names: Sequence[str]) -> None:
    """Refuse (ConfigError) a ``--report-to`` tracker whose package is not installed, before a run
    folder is made."""
    for name in names:
        if name in _EXTRAS:
            _require(name)


def open_trackers(names: Sequence[str], run_dir: Path, *, history: Sequence[dict[str, Any]] = (),
                  resume_step: int = 0, config: dict[str, Any] | None = None) -> list[Tracker]:
    """The trackers named in ``names`` (``none``: no tracker), continuing a run folder.

    Args:
        history: the epoch records kept in ``metrics.jsonl`` (the CSV table is rebuilt from them).
        resume_step: the optimizer step of the checkpoint a resumed run starts from (0: fresh);
            TensorBoard drops events a crashed run logged past it.
        config: the run's config as a nested dict (logged by wandb, flattened into MLflow params).
    """
    check_trackers(names)
    run_dir = Path(run_dir)
    out: list[Tracker] = []
    for name in dict.fromkeys(names):
        if name == "tensorboard":
            # the checkpoint's own epoch was logged at resume_step: keep it, drop what came after
            out.append(TensorBoardTracker(run_dir / "tb", purge_step=resume_step + 1 if resume_step else None))
        elif name == "csv":
            out.append(CsvTracker(run_dir / CSV_FILE, history))
        elif name == "wandb":
            out.append(WandbTracker(run_dir, config or {}))
        elif name == "mlflow":
            out.append(MlflowTracker(run_dir, config or {}))
        elif name != "none":
            raise ConfigError(f"--report-to {name}: not a tracker; choose from tensorboard, csv, wandb, mlflow, none")
    return out


# ------------------------------------------------------------------------------------ TensorBoard
class TensorBoardTracker:
    """Scalars in ``log_dir`` (the writer opens on the first value). ``purge_step``: on resume,
    events a crashed run logged at or past this step are discarded (TensorBoard hides them)."""

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        self.log_dir = Path(log_dir)
        self.purge_step = purge_step
        self._writer = None

    @property
    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir), purge_step=self.purge_step)
        return self._writer

    def scalars(self, values: dict[str, Any], step: int) -> None:
        for key, value in numeric(values).items():
            self.writer.add_scalar(key, value, step)

    def epoch(self, record: dict[str, Any], step: int) -> None:
        self.scalars({k: v for k, v in record.items() if "/" in k}, step)  # "epoch" is the x axis already
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        if self._writer is not None:
            self._writer.close()


# -------------------------------------------------------------------------------------------- CSV
class CsvTracker:
    """``metrics.csv``: one row per epoch, the columns the union of the records' keys in the order
    they first appear (empty where an epoch lacks one, e.g. no evaluation). Rebuilt from
    ``history`` when opened, so it matches ``metrics.jsonl`` on resume; rewritten whole
    (atomically) when a record brings a new column, else appended to."""

    def __init__(self, path: Path, history: Sequence[dict[str, Any]] = ()):
        self.path = Path(path)
        self.records = [dict(r) for r in history]
        self.columns = list(dict.fromkeys(k for r in self.records for k in r))
        self._rewrite()

    def _rows(self, records: Sequence[dict[str, Any]], header: bool) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, lineterminator="\n")
        if header:
            writer.writeheader()
        for r in records:  # repr of a float round-trips exactly; nested values as JSON
            writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()})
        return buf.getvalue()

    def _rewrite(self) -> None:
        atomic_write_text(self.path, self._rows(self.records, header=True) if self.columns else "")

    def scalars(self, values: dict[str, Any], step: int) -> None:
        pass  # one row per epoch: per-step values are TensorBoard's

    def epoch(self, record: dict[str, Any], step: int) -> None:
        self.records.append(dict(record))
        new = [k for k in record if k not in self.columns]
        if new or not self.path.is_file() or self.path.stat().st_size == 0:
            self.columns += new
            self._rewrite()
        else:
            with self.path.open("a", newline="") as f:
                f.write(self._rows([record], header=False))

    def close(self, failed: bool = False) -> None:
        pass


def read_csv_metrics(path: Path) -> list[dict[str, str]]:
    """The rows of a ``metrics.csv`` as dicts of strings (empty cells left out)."""
    with Path(path).open(newline="") as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


# --------------------------------------------------------------------------------- run ids (resume)
def _read_ids(run_dir: Path) -> dict[str, Any]:
    """``trackers.json`` of a run folder (empty when absent or damaged: the trackers then start new runs)."""
    path = run_dir / TRACKER_IDS
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        data = {}
    return data if isinstance(data, dict) else {}


def _saved_id(run_dir: Path, name: str) -> dict[str, Any]:
    entry = _read_ids(run_dir).get(name)
    return entry if isinstance(entry, dict) else {}


def _save_id(run_dir: Path, name: str, entry: dict[str, Any]) -> None:
    write_json(run_dir / TRACKER_IDS, {**_read_ids(run_dir), name: entry})


# ------------------------------------------------------------------------------ Weights & Biases
class WandbTracker:
    """A wandb run under ``RUN/wandb``: offline unless ``WANDB_MODE`` is set, project
    ``WANDB_PROJECT`` (default ``dinotune``), named after the run folder, with the config. A
    resumed dinotune run continues the same wandb run (its id is kept in ``trackers.json``);
    values at steps the wandb run already passed (logged before a crash; an exact resume
    computes the same ones again) are not sent twice."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        wandb = _require("wandb")
        run_dir = Path(run_dir)
        saved = _saved_id(run_dir, "wandb").get("id")
        mode = None if os.environ.get("WANDB_MODE") else "offline"
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "dinotune"), name=run_dir.name, dir=str(run_dir),
            id=saved or None, resume="allow" if saved else None, mode=mode, config=config,
            # console capture would wrap stdout, where the CLI prints its JSON results
            # silent: dinotune says where the run went (below), and --quiet silences it
            settings=wandb.Settings(console="off", silent=True),
        )
        _save_id(run_dir, "wandb", {"id": self.run.id})
        self._first_step = int(getattr(self.run, "step", 0) or 0) if saved else 0
        where = f"offline in {run_dir / 'wandb'} (upload it with: wandb sync {run_dir / 'wandb'}/offline-run-*)" \
            if self.run.settings.mode == "offline" else "online"
        info(f"wandb: run {self.run.id} {'resumed' if saved else 'started'}, {where}")

    def scalars(self, values: dict[str, Any], step: int) -> None:
        values = numeric(values)
        if values and step >= self._first_step:
            self.run.log(values, step=step)

    def epoch(self, record: dict[str, Any], step: int) -> None:
        self.scalars(record, step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


# -------------------------------------------------------------------------------------------- MLflow
def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _mlflow_key(key: str) -> str:
    """``key`` in the characters MLflow accepts in metric names (class names may hold others)."""
    key = re.sub(r"[^/\w.\- ]", "_", key)[:250]
    return key if posixpath.normpath(key) == key and not key.startswith("/") else key.replace("/", "_")


@contextlib.contextmanager
def _file_store_allowed(uri: str) -> Iterator[None]:
    """MLflow 3 refuses a file store unless ``MLFLOW_ALLOW_FILE_STORE`` is true: allow the run
    folder's own store while dinotune uses it, leaving the setting of the process as it was."""
    ours = uri.startswith("file:") and "MLFLOW_ALLOW_FILE_STORE" not in os.environ
    if ours:
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        if ours:
            os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


class MlflowTracker:
    """An MLflow run in experiment ``MLFLOW_EXPERIMENT_NAME`` (default ``dinotune``) of the store
    at ``MLFLOW_TRACKING_URI``, or of a file store in ``RUN/mlruns``. Params: the flattened config
    (on the first start); metrics: every numeric value with its step. A resumed dinotune run
    continues the same MLflow run (id kept in ``trackers.json``); steps after the checkpoint that
    a crashed run logged stay, and are logged again with the same values."""

    def __init__(self, run_dir: Path, config: dict[str, Any]):
        _require("mlflow")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient
        from mlflow.utils.validation import (
            MAX_PARAM_VAL_LENGTH,
            MAX_PARAMS_TAGS_PER_BATCH,
        )

        run_dir = Path(run_dir)
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        with self._store():
            self.client = MlflowClient(tracking_uri=self.uri)
            saved = _saved_id(run_dir, "mlflow")
            self.run_id = self._resume(saved) if saved.get("tracking_uri") == self.uri else None
            if self.run_id is None:
                name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "dinotune")
                experiment = self.client.get_experiment_by_name(name)
                experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
                run = self.client.create_run(experiment_id, run_name=run_dir.name,
                                             tags={"dinotune.run_dir": str(run_dir.resolve())})
                self.run_id = run.info.run_id
                params = [Param(_mlflow_key(k), str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in flatten(config).items()]
                for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
                    self.client.log_batch(self.run_id, params=params[i: i + MAX_PARAMS_TAGS_PER_BATCH])
        _save_id(run_dir, "mlflow", {"run_id": self.run_id, "tracking_uri": self.uri})
        info(f"mlflow: run {self.run_id} {'resumed' if saved.get('run_id') == self.run_id else 'started'} in {self.uri}")

    def _store(self) -> contextlib.AbstractContextManager:
        return _file_store_allowed(self.uri)

    def _resume(self, saved: dict[str, Any]) -> str | None:
        """The saved run reopened, or None when the store no longer has it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.update_run(saved["run_id"], status="RUNNING")
        except (MlflowException, KeyError):
            return None
        return saved["run_id"]

    def scalars(self, values: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        now = int(time.time() * 1000)
        metrics = [Metric(_mlflow_key(k), float(v), now, step) for k, v in numeric(values).items()]
        with self._store():
            for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=metrics[i: i + MAX_METRICS_PER_BATCH])

    def epoch(self, record: dict[str, Any], step: int) -> None:
        self.scalars(record, step)

    def close(self, failed: bool = False) -> None:
        with self._store():
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
