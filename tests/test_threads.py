"""``--threads``: the count chosen (a number, ``$OMP_NUM_THREADS``, or the cores not already busy),
applied to PyTorch and onnxruntime, and outputs that do not depend on it."""

from __future__ import annotations

import json

import pytest
import torch

from dinotune import threads
from dinotune.cli import main
from tests.conftest import make_class_folders, tiny_options


@pytest.fixture
def machine(monkeypatch):
    """A 4-core machine with a given load (the 1-minute load average) and no OMP_NUM_THREADS."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)

    def load(value: float) -> None:
        monkeypatch.setattr(threads, "busy_cores", lambda: value)
    return load


def test_auto_takes_the_cores_not_already_busy(machine, monkeypatch):
    for busy, expected in ((0.0, 4), (0.4, 4), (1.0, 3), (2.6, 1), (3.6, 1), (9.0, 1)):
        machine(busy)
        assert threads.choose_threads(0) == expected, busy
    assert threads.choose_threads(2) == 2  # a number given is used as it is
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads(0) == 3  # the user's environment wins over the guess


def test_apply_sets_pytorchs_threads(machine):
    before = torch.get_num_threads()
    try:
        machine(0.0)
        assert threads.apply_threads(1) == 1 and torch.get_num_threads() == 1 and threads.current() == 1
        assert threads.apply_threads(0) == 4 and torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


def test_threads_one_and_two_give_the_same_predictions(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        make_class_folders(tmp_path / "data" / "train", ["red", "blue"], 4, seed=1)
        make_class_folders(tmp_path / "data" / "val", ["red", "blue"], 2, seed=2)
        assert main(["train", "classify", "--data", str(tmp_path / "data"), "--threads", "1",
                     *[f"--{k.replace('_', '-')}={v}" for k, v in tiny_options(tmp_path / "run").items()
                       if k not in ("progress",)], "--no-progress"]) == 0
        out = {}
        for n in ("1", "2"):
            capsys.readouterr()
            assert main(["predict", str(tmp_path / "run"), str(tmp_path / "data" / "val"), "--device", "cpu",
                         "--threads", n]) == 0
            out[n] = json.loads(capsys.readouterr().out)
            assert torch.get_num_threads() == int(n)
        for a, b in zip(out["1"], out["2"]):
            assert [p["class"] for p in a["predictions"]] == [p["class"] for p in b["predictions"]]
            assert [p["score"] for p in a["predictions"]] == pytest.approx([p["score"] for p in b["predictions"]],
                                                                           abs=1e-5)
    finally:
        torch.set_num_threads(before)


def test_every_command_takes_threads(capsys):
    for command in (["train", "classify"], ["eval"], ["predict"], ["export"], ["serve"], ["pca"], ["embed"], ["knn"], ["analyze"],
                    ["compare"], ["demo"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        assert "--threads" in capsys.readouterr().out, command


def test_busy_cores_counts_the_other_runnable_threads():
    """On this machine right now: a number of cores, at least 0, below what the machine has plus
    what is queued (the test process itself is not counted)."""
    busy = threads.busy_cores(samples=2, interval=0.0)
    assert 0 <= busy < 10_000
