"""The ``dinotune`` command as a user runs it: help texts, train / eval / predict end to end on the
real hymenoptera folder, config file + flag precedence, and resuming a finished run.

Commands run in-process through ``dinotune.cli.main(argv)``, which returns the exit code.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import pytest
import yaml

import dinotune.utils as dutils
from dinotune.cli import main
from tests.conftest import make_class_folders, shared_data

FAST = ["--model", "random:tiny", "--image-size", "28", "--epochs", "1", "--workers", "0",
        "--no-progress", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _keep_quiet_setting():
    """``main`` sets the quiet flag from ``-q``; put the conftest setting back afterwards."""
    before = dutils._QUIET
    yield
    dutils.set_quiet(before)


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal width


# ------------------------------------------------------------------------------------- help
def test_help_top_level(capsys):
    out = _help([], capsys)
    for word in ("train", "eval", "predict", "demo", "models", "--quiet", "examples:"):
        assert word in out


def test_help_train(capsys):
    out = _help(["train"], capsys)
    assert "--resume" in out and "classify" in out


def test_help_train_classify(capsys):
    out = _help(["train", "classify"], capsys)
    for flag in ("--adapter", "--rank", "--two-stage", "--no-two-stage", "--cache-features", "--data",
                 "--val-data", "--val-fraction", "--image-size", "--model", "--epochs", "--config", "--set",
                 "--check-images", "--workers", "--out"):
        assert flag in out, flag
    assert "{none,lora,dora,full}" in out
    assert "(default: 'lora')" in out and "(default: 8)" in out


def test_help_eval(capsys):
    out = _help(["eval"], capsys)
    for flag in ("--data", "--split", "--checkpoint", "--model", "--device", "--out"):
        assert flag in out


def test_help_predict(capsys):
    out = _help(["predict"], capsys)
    for flag in ("--top-k", "--format", "--out", "--checkpoint"):
        assert flag in out
    assert "--format FORMAT" in out and "coco (COCO results for evaluation" in out


def test_help_demo_and_models(capsys):
    out = _help(["demo"], capsys)
    assert "--epochs" in out and "--model" in out and "--out" in out
    out = _help(["models"], capsys)
    assert "usage: dinotune models" in out


def test_models_lists_backbones(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "facebook/dinov2-small" in out and "random:tiny" in out and "random:small-reg4" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: dinotune" in capsys.readouterr().out


# ----------------------------------------------------------------- end to end on hymenoptera
@pytest.fixture(scope="module")
def hymenoptera_run(tmp_path_factory):
    data = shared_data("hymenoptera")
    out = tmp_path_factory.mktemp("cli") / "ants"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["train", "classify", "--data", str(data), *FAST, "--adapter", "lora",
                     "--batch-size", "128", "--check-images", "full", "--out", str(out)])
    return {"data": data, "run": out, "code": code, "out": stdout.getvalue(), "err": stderr.getvalue()}


def test_train_writes_run_folder(hymenoptera_run):
    r = hymenoptera_run
    assert r["code"] == 0, r["err"]
    run: Path = r["run"]
    assert f"run folder: {run}" in r["out"]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["backbone"]["model"] == "random:tiny" and cfg["backbone"]["image_size"] == 28
    assert cfg["train"]["epochs"] == 1 and cfg["adapter"]["kind"] == "lora"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["epoch"] == 1
    assert any(k.startswith("train/") for k in record) and any(k.startswith("val/") for k in record)
    assert record["val/count"] == 153
    assert list((run / "tb").glob("events.out.tfevents.*"))
    for name in ("last", "best"):
        ckpt = run / "checkpoints" / name
        assert (ckpt / "head.safetensors").is_file()
        assert (ckpt / "adapter_model.safetensors").is_file()
        assert not (ckpt / "backbone.safetensors").exists()
        assert not list(ckpt.glob("model*.safetensors"))
        # LoRA checkpoints hold adapters and head only: a few hundred kB at most for random:tiny
        assert sum(f.stat().st_size for f in ckpt.iterdir() if f.suffix == ".safetensors") < 500_000
    for png in ("confusion_matrix.png", "training_curves.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_keeps_the_real_gif(hymenoptera_run):
    r = hymenoptera_run
    assert r["code"] == 0, r["err"]
    gif = r["data"] / "train" / "ants" / "imageNotFound.gif"
    assert gif.is_file()
    assert "imageNotFound" not in r["err"]
    n_train = sum(1 for p in (r["data"] / "train").rglob("*") if p.is_file())
    assert f"images: {n_train} train, 153 val" in r["err"]
    meta = json.loads((r["run"] / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["skipped_files"] == 0 and meta["class_names"] == ["ants", "bees"]


def test_eval_prints_metrics_json(hymenoptera_run, capsys):
    assert hymenoptera_run["code"] == 0
    code = main(["eval", str(hymenoptera_run["run"]), "--data", str(hymenoptera_run["data"]), "--device", "cpu",
                 "--batch-size", "160"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    metrics = json.loads(captured.out)
    assert metrics["count"] == 153
    for key in ("top1", "loss", "f1_macro", "accuracy_balanced"):
        assert key in metrics
    assert 0.0 <= metrics["top1"] <= 1.0
    full = hymenoptera_run["run"] / "eval" / "hymenoptera-val" / "metrics.json"
    assert str(full) in captured.err
    assert json.loads(full.read_text())["confusion"]


def test_predict_csv(hymenoptera_run, tmp_path, capsys):
    assert hymenoptera_run["code"] == 0
    val = hymenoptera_run["data"] / "val"
    out = tmp_path / "f.csv"
    code = main(["predict", str(hymenoptera_run["run"]), str(val), "--top-k", "2", "--format", "csv",
                 "--out", str(out), "--device", "cpu", "--batch-size", "160"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rows = list(csv.reader(out.open()))
    assert rows[0] == ["image", "class_1", "score_1", "class_2", "score_2"]
    assert len(rows) == 1 + 153
    images = {row[0] for row in rows[1:]}
    assert images == {str(p) for p in val.rglob("*") if p.is_file()}
    for row in rows[1:]:
        assert {row[1], row[3]} == {"ants", "bees"}
        assert float(row[2]) >= float(row[4])
    assert "wrote predictions for 153 images" in captured.err


def test_predict_json(hymenoptera_run, capsys):
    assert hymenoptera_run["code"] == 0
    val = hymenoptera_run["data"] / "val"
    code = main(["predict", str(hymenoptera_run["run"]), str(val / "bees"), "--top-k", "2",
                 "--format", "json", "--device", "cpu", "--batch-size", "160"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    results = json.loads(captured.out)
    assert len(results) == sum(1 for p in (val / "bees").iterdir() if p.is_file())
    for r in results:
        preds = r["predictions"]
        assert len(preds) == 2
        assert {p["class"] for p in preds} == {"ants", "bees"}
        assert all(0.0 <= p["score"] <= 1.0 for p in preds)
        assert sum(p["score"] for p in preds) <= 1.0 + 1e-5
        assert preds[0]["score"] >= preds[1]["score"]


# -------------------------------------------------------------- config files, --set, --resume
@pytest.fixture
def small_data(tmp_path) -> Path:
    make_class_folders(tmp_path / "data" / "train", ["red", "blue"], 4, size=24, seed=1)
    make_class_folders(tmp_path / "data" / "val", ["red", "blue"], 2, size=24, seed=2)
    return tmp_path / "data"


def test_config_file_then_flags(small_data, tmp_path, capsys):
    cfg_file = tmp_path / "base.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "task": "classify",
        "train": {"epochs": 3, "batch_size": 8, "seed": 5},
        "adapter": {"kind": "lora", "rank": 2},
        "optim": {"min_lr_ratio": 0.5},
    }))
    run = tmp_path / "run"
    code = main(["train", "classify", "--config", str(cfg_file), "--data", str(small_data), *FAST,
                 "--out", str(run), "--set", "optim.min_lr_ratio=0.1", "adapter.alpha=4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 1  # the flag beats the file
    assert saved["train"]["seed"] == 5 and saved["train"]["batch_size"] == 8  # the file beats defaults
    assert saved["adapter"]["rank"] == 2
    assert saved["optim"]["min_lr_ratio"] == 0.1  # --set beats the file
    assert saved["adapter"]["alpha"] == 4.0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1


def test_flag_beats_set(small_data, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "classify", "--data", str(small_data), *FAST, "--rank", "3", "--out", str(run),
                 "--set", "adapter.rank=5"])
    assert code == 0, capsys.readouterr().err
    assert yaml.safe_load((run / "config.yaml").read_text())["adapter"]["rank"] == 3


def test_unknown_key_in_config_file(small_data, tmp_path, capsys):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("task: classify\ntrain:\n  epochz: 3\n")
    code = main(["train", "classify", "--config", str(cfg_file), "--data", str(small_data), *FAST,
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "train.epochz" in err and str(cfg_file) in err and "epochs" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_unknown_set_key(small_data, tmp_path, capsys):
    code = main(["train", "classify", "--data", str(small_data), *FAST, "--out", str(tmp_path / "run"),
                 "--set", "optim.warmup=2"])
    err = capsys.readouterr().err
    assert code == 2 and "optim.warmup" in err


def test_train_without_task(capsys):
    assert main(["train"]) == 2
    assert "name a task" in capsys.readouterr().err


def test_resume_finished_run(small_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "classify", "--data", str(small_data), *FAST, "--out", str(run)]) == 0
    before = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    code = main(["train", "--resume", str(run)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "all 1 epochs are done" in captured.err
    assert (run / "metrics.jsonl").read_text() == before  # nothing trained again
    assert f"run folder: {run}" in captured.out


def test_resume_missing_run(tmp_path, capsys):
    code = main(["train", "--resume", str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert code == 2 and "nothing" in err and "config.yaml" in err


def test_predict_defaults_come_from_the_run_and_foreign_flags_are_refused(small_data, tmp_path, capsys):
    """``predict`` without flags uses the run's own inference section (here ``--top-k 1`` given at
    training); a flag for another task's predictions is an error naming it, not ignored."""
    run = tmp_path / "run"
    assert main(["train", "classify", "--data", str(small_data), "--out", str(run), "--top-k", "1", *FAST]) == 0
    capsys.readouterr()
    images = str(small_data / "val" / "red")
    assert main(["predict", str(run), images, "--device", "cpu"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results and all(len(r["predictions"]) == 1 for r in results)
    assert main(["predict", str(run), images, "--device", "cpu", "--top-k", "2"]) == 0
    assert all(len(r["predictions"]) == 2 for r in json.loads(capsys.readouterr().out))
    for flag in (["--masks", str(tmp_path / "m")], ["--score-threshold", "0.5"], ["--draw", str(tmp_path / "d")],
                 ["--image-info", str(tmp_path / "info.json")], ["--window-batch", "2"]):
        assert main(["predict", str(run), images, "--device", "cpu", *flag]) == 2
        assert f"{flag[0]} does not apply to classify runs" in capsys.readouterr().err
    import dinotune
    from dinotune.config import ConfigError

    with pytest.raises(ConfigError, match=r"masks: not an option of classify predictions \(valid: batch_size, top_k\)"):
        dinotune.load(run, device="cpu").predict(images, masks=str(tmp_path / "m"))


@pytest.mark.parametrize("argv, usage", [
    (["eval", "runs/x", "--data", "d", "--bogus"], "usage: dinotune eval"),
    (["train", "classify", "--data", "d", "--bogus", "1"], "usage: dinotune train classify"),
    (["data", "download", "coco", "--bogus"], "usage: dinotune data download"),
])
def test_an_unknown_flag_shows_the_commands_usage(argv, usage, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and usage in err and "unrecognized arguments: --bogus" in err
