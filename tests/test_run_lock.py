"""The run lock belongs to the training process alone: its forked children (DataLoader workers)
never hold it, so a run whose trainer was killed can be resumed at once, while a live trainer still
keeps every other process (and a second claim in its own process) out, named by its pid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

import dinotune.utils as dutils
from dinotune.cli import main
from dinotune.engine import checkpoint
from dinotune.engine.run_folder import RunFolder
from dinotune.errors import CheckpointError
from tests.conftest import make_class_folders

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX locks and fork")

ROOT = Path(__file__).resolve().parents[1]

# The module loaded by its path: ``import dinotune.engine`` imports torch, seconds per process.
_IMPORT = f"""
import importlib.util, sys
_spec = importlib.util.spec_from_file_location("_run_folder", {str(ROOT / "dinotune" / "engine" / "run_folder.py")!r})
_module = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
RunFolder = _module.RunFolder
"""

# Takes the lock, forks a child that tries the lock too (and writes what it got) then sleeps, and
# holds until told on stdin: "release" (release, stay alive), "exit" (os._exit), or is killed.
_HOLDER = _IMPORT + r"""
import os, sys, time
from dinotune.errors import CheckpointError
run, report = sys.argv[1], sys.argv[2]
folder = RunFolder.reopen(run)
child = os.fork()
if child == 0:
    try:
        RunFolder.reopen(run)
        outcome = "taken"
    except CheckpointError as exc:
        outcome = f"refused: {exc}"
    with open(report, "w") as f:
        f.write(outcome)
    time.sleep(10)
    os._exit(0)
print(os.getpid(), child, flush=True)
for line in sys.stdin:
    if line.strip() == "release":
        folder.release()
        print("released", flush=True)
    elif line.strip() == "exit":
        os._exit(0)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.parametrize("end", ["killed", "exits", "releases"])
def test_a_forked_child_does_not_keep_the_run_locked(tmp_path, end):
    run = tmp_path / "run"
    run.mkdir()
    report = tmp_path / "child.txt"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run), str(report)], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child = None
    try:
        parent, child = map(int, holder.stdout.readline().split())
        # while the holder lives, another process is refused with its pid: here, and in its own child
        with pytest.raises(CheckpointError, match=rf"is in use by process {parent} on .* wait for it"):
            RunFolder.reopen(run)
        _wait_for(report)
        assert report.read_text().startswith(f"refused: {run} is in use by process {parent} ")
        if end == "killed":
            holder.kill()
        else:
            holder.stdin.write(("release" if end == "releases" else "exit") + "\n")
            holder.stdin.flush()
            if end == "releases":
                assert holder.stdout.readline().strip() == "released"
        if end != "releases":
            holder.wait(timeout=30)
        assert _alive(child), "the forked child must still be running for the check to mean anything"
        folder = RunFolder.reopen(run)  # at once: the child does not hold the lock
        folder.release()
    finally:
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)
        if holder.poll() is None:
            holder.kill()
        holder.wait(timeout=30)


def test_a_second_claim_in_the_holding_process_is_refused_and_keeps_the_lock(tmp_path):
    """Record locks do not conflict within one process, and closing any descriptor of the file drops
    them: a second claim here must be refused without touching the lock the first one holds."""
    run = tmp_path / "run"
    run.mkdir()
    first = RunFolder.reopen(run)
    try:
        for _ in range(2):
            with pytest.raises(CheckpointError, match=rf"is in use by process {os.getpid()} on "):
                RunFolder.reopen(run)
        probe = _IMPORT + "RunFolder.reopen(__import__('sys').argv[1])"
        other = subprocess.run([sys.executable, "-c", probe, str(run)], cwd=ROOT, capture_output=True, text=True,
                               timeout=60, check=False)
        assert other.returncode != 0 and f"is in use by process {os.getpid()} on " in other.stderr
    finally:
        first.release()
    RunFolder.reopen(run).release()  # released: free again, in this process too


# ------------------------------------------------------------------ the issue: kill -9, resume at once
@pytest.fixture
def _keep_quiet_setting():
    """``main`` sets the quiet flag from ``-q`` and the thread count; put them back afterwards."""
    import torch

    before, threads = dutils._QUIET, torch.get_num_threads()
    yield
    dutils.set_quiet(before)
    torch.set_num_threads(threads)


def _children(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux ``/proc``)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _state(pid: int) -> str:
    """``pid``'s state letter (``S`` sleeping, ``R`` running, ``Z`` ended, not yet reaped); ``""`` if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _train_args(data: Path, out: Path, epochs: int) -> list[str]:
    return ["train", "classify", "--data", str(data), "--out", str(out), "--model", "random:tiny",
            "--image-size", "28", "--batch-size", "4", "--epochs", str(epochs), "--workers", "2",
            "--device", "cpu", "--no-progress"]


def _last_loss(run: Path) -> tuple[int, float]:
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    return last["epoch"], last["train/loss"]


def _trainer(argv: list[str], log: Path, paused: Path) -> int:
    """A fork of this process running ``dinotune ARGV``, its output in ``log``; its pid. At its first
    batch after its first checkpoint it writes ``paused`` and waits to be killed, its DataLoader
    workers done with their prefetched batches and waiting for the next index: so they outlive it
    (a worker busy with a batch sees at its end that its parent is gone and exits at once, a waiting
    one lives on for up to 5 s, torch's ``MP_STATUS_CHECK_INTERVAL``). Reaped with ``os.waitpid``:
    ``multiprocessing``'s ``join`` would wait for the workers too (they hold its sentinel pipe)."""
    pid = os.fork()
    if pid:
        return pid
    code = 1  # the trainer: never returns into the test
    try:
        from torch.utils.data import dataloader

        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(2, "w", buffering=1, closefd=False)  # not the test's captured streams
        last = Path(argv[argv.index("--out") + 1]) / "checkpoints" / "last"
        next_batch = dataloader._MultiProcessingDataLoaderIter._next_data

        def pausing(self):
            batch = next_batch(self)
            if last.exists():
                paused.write_text(str(os.getpid()))
                time.sleep(120)
            return batch

        dataloader._MultiProcessingDataLoaderIter._next_data = pausing
        code = main(argv)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


# the issue's own case, kept in the default suite: a trainer process with DataLoader workers, killed;
# the resume and an uninterrupted reference run in this process. The trainer is a fork of this
# process running ``dinotune train`` (a new interpreter importing torch and dinotune took most of
# the test's time): a process of its own, which takes the run lock and forks its workers as
# ``python -m dinotune train`` does.
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the DataLoader workers in /proc")
@pytest.mark.usefixtures("_keep_quiet_setting")
def test_resume_right_after_a_kill_9_while_dataloader_workers_run(tmp_path, monkeypatch):
    import dinotune.api  # noqa: F401 - imported once, here, not in the trainer and again for the resume

    epochs = 2
    data = tmp_path / "data"
    make_class_folders(data / "train", ["red", "blue"], 8, size=28, seed=1)
    make_class_folders(data / "val", ["red", "blue"], 2, size=28, seed=2)
    run = tmp_path / "killed"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the same numerics in the three runs (``--threads`` auto)
    log, paused = tmp_path / "killed.log", tmp_path / "paused"
    trainer = _trainer(_train_args(data, run, epochs), log, paused)
    reaped = False
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        # killed while it trains past its first checkpoint, with its DataLoader workers waiting for work
        while not (paused.exists() and len(workers := _children(trainer)) >= 2
                   and all(_state(w) == "S" for w in workers)):
            if os.waitpid(trainer, os.WNOHANG)[0]:
                reaped = True
                pytest.fail(f"the run ended before it could be killed:\n{log.read_text()}")
            assert time.monotonic() < deadline, "no checkpoint and waiting workers within 120 s"
            time.sleep(0.01)
        os.kill(trainer, signal.SIGKILL)
        status = os.waitpid(trainer, 0)[1]
        reaped = True
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert checkpoint.read_meta(run / "checkpoints" / "last")["epoch"] < epochs  # (or its .old copy)
        # the workers outlive the trainer, holding everything it had open: the case of the issue
        assert any(_state(w) in ("S", "R") for w in workers), [_state(w) for w in workers]
        assert main(["train", "--resume", str(run), "--device", "cpu", "--no-progress"]) == 0  # at once
    finally:
        if not reaped:
            os.kill(trainer, signal.SIGKILL)
            os.waitpid(trainer, 0)
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert main(_train_args(data, tmp_path / "whole", epochs)) == 0  # the same run, never interrupted
    resumed, whole = _last_loss(run), _last_loss(tmp_path / "whole")
    assert resumed[0] == whole[0] == epochs
    assert resumed[1] == pytest.approx(whole[1], rel=1e-6, abs=1e-7)
