"""``dinotune sweep``: grid parsing and collapsing, the sweep folder (resume, refusal of changed
settings, failed and interrupted trials, optuna), the table and the Pareto front, a real sweep on
hymenoptera, and the linear grid against heads trained one by one."""

from __future__ import annotations

import csv
import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import shared_data, tiny_options
from dinotune import api, cli
from dinotune.config import ClassifyConfig, ConfigError, build_config, to_dict
from dinotune.sweep import run_sweep
from dinotune.sweep.grid import expand, parse_axes, resolve_key
from dinotune.sweep.plot import pareto_front

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ grid parsing
def test_grid_keys_values_and_repeats():
    for name in ("backbone-lr", "backbone_lr", "--backbone-lr", "optim.backbone_lr"):
        assert resolve_key(ClassifyConfig, name) == "optim.backbone_lr"
    axes, notes = parse_axes(ClassifyConfig, ["adapter=none,lora", "rank=4,16", "lr=1e-4,0.0001,3e-4",
                                              "targets=attention,q_proj+v_proj"])
    assert [a.name for a in axes] == ["adapter", "rank", "lr", "targets"]
    assert axes[1].values == (4, 16) and all(isinstance(v, int) for v in axes[1].values)
    assert axes[2].labels == ("1e-4", "3e-4") and axes[2].values == (1e-4, 3e-4)  # 0.0001 is 1e-4 again
    assert any("0.0001 is 1e-4 again" in n for n in notes)
    assert axes[3].values == (["attention"], ["q_proj", "v_proj"])


@pytest.mark.parametrize("items, named", [
    (["rnak=4,8"], "rnak"),  # unknown key (with the close name offered)
    (["rank=four"], "adapter.rank"),
    (["adapter=lora,qlora"], "adapter.kind"),
    (["out=a,b"], "out"),
    (["lr"], "KEY=V1,V2"),
    (["lr=1e-3", "optim.lr=1e-2"], "lr"),
    (["lr=1e-3,"], "empty value"),
])
def test_bad_grid_is_refused_naming_the_key(items, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")) as err:
        parse_axes(ClassifyConfig, items)
    if items == ["rnak=4,8"]:
        assert "rank" in str(err.value).split("rnak", 1)[1]


def test_settings_that_do_not_apply_collapse():
    base = to_dict(build_config("classify"))
    axes, _ = parse_axes(ClassifyConfig, ["adapter=none,lora,full", "rank=4,16", "lr=1e-3"])
    out = expand("classify", base, axes)
    assert out.combinations == 6
    assert [t.name for t in out.trials] == ["adapter-none_lr-1e-3", "adapter-lora_rank-4_lr-1e-3",
                                            "adapter-lora_rank-16_lr-1e-3", "adapter-full_lr-1e-3"]
    none = out.trials[0]
    assert none.settings == {"adapter": "none", "lr": "1e-3"} and "adapter.rank" not in none.overrides
    assert none.config.adapter.rank == ClassifyConfig().adapter.rank and none.config.optim.lr == 1e-3
    assert out.trials[2].config.adapter.rank == 16
    said = " ".join(out.notes)
    assert "rank does not apply when adapter=none" in said and "adapter=full" in said
    assert "6 combinations, 4 distinct trials" in said


def test_invalid_combination_is_refused_before_anything_runs(tmp_path):
    base = build_config("classify", data=str(tmp_path))
    with pytest.raises(ConfigError, match="--rank 0"):
        run_sweep("classify", base, grid=["adapter=lora", "rank=0,4"], out=tmp_path / "sweep")
    with pytest.raises(ConfigError, match="--lr given as a flag and swept"):
        run_sweep("classify", base, grid=["lr=1e-3,1e-2"], out=tmp_path / "sweep", explicit={"optim.lr"})
    assert not (tmp_path / "sweep").exists()


# ---------------------------------------------------------------------------------- pareto
def test_pareto_front_on_known_points():
    # (cost, metric): b and d are beaten by a / c at once; e ties a exactly (the first is kept)
    points = [(100, 0.80), (150, 0.70), (200, 0.90), (300, 0.85), (100, 0.80), (400, 0.95)]
    assert pareto_front(points, "max") == [0, 2, 5]
    # a loss: lower is better
    losses = [(1, 0.5), (2, 0.4), (3, 0.6), (0.5, 0.9)]
    assert pareto_front(losses, "min") == [3, 0, 1]
    assert pareto_front([], "max") == []


# ------------------------------------------------------- the sweep folder, with stand-in trials
STUB = textwrap.dedent('''
    """Stands in for `python -m dinotune train`: writes what a run folder holds, per the trial's lr."""
    import json, os, shutil, sys
    from pathlib import Path
    import yaml
    args = sys.argv[1:]
    with open(os.environ["STUB_LOG"], "a") as f:
        f.write(" ".join(args) + "\\n")
    if args[1] == "--resume":
        run = Path(args[2])
        cfg = yaml.safe_load((run / "config.yaml").read_text())
    else:
        cfg = yaml.safe_load(Path(args[3]).read_text())
        run = Path(cfg["train"]["out"])
        lr = cfg["optim"]["lr"]
        if lr == 0.5:
            print("dinotune: error: the loss became nan at epoch 1", file=sys.stderr)
            sys.exit(2)
        run.mkdir(parents=True)
        shutil.copy(args[3], run / "config.yaml")
        if str(lr) == os.environ.get("STUB_INTERRUPT"):
            (run / "checkpoints" / "last").mkdir(parents=True)
            (run / "checkpoints" / "last" / "meta.json").write_text("{}")
            sys.exit(130)
    lr = cfg["optim"]["lr"]
    record = {"epoch": 1, "val/top1": min(1.0, lr * 50), "sys/peak_memory_mb": 100 + lr * 1000,
              "sys/images_per_s": 10.0, "time_s": 0.5}
    (run / "metrics.jsonl").write_text(json.dumps(record) + "\\n")
    (run / "results.json").write_text(json.dumps({"best": record, "last": record,
                                                  "parameters": {"trainable": 7, "total": 70}}))
''')


@pytest.fixture
def stub(tmp_path, monkeypatch):
    script = tmp_path / "stub_train.py"
    script.write_text(STUB)
    log = tmp_path / "stub.log"
    log.touch()
    monkeypatch.setenv("STUB_LOG", str(log))
    return [sys.executable, str(script)], log


def _calls(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line]


def test_resume_failed_and_interrupted_trials_and_changed_settings(tmp_path, stub, monkeypatch):
    command, log = stub
    base = build_config("classify", data=str(tmp_path), epochs=1)
    out = tmp_path / "sweep"
    grid = ["lr=1e-3,1e-2,0.5"]
    monkeypatch.setenv("STUB_INTERRUPT", "0.01")
    first = run_sweep("classify", base, grid=grid, out=out, command=command)
    assert len(_calls(log)) == 3
    status = {r.name: r.status for r in first.rows}
    assert status["lr-1e-3"] == "done" and status["lr-1e-2"] == "interrupted"
    assert status["lr-0.5"].startswith("failed") and "loss became nan" in status["lr-0.5"]
    done = out / "trials" / "lr-1e-3" / "results.json"
    stamp = done.stat().st_mtime_ns
    # the config each trial started from is kept, and its run folder is a trial folder
    assert (out / "configs" / "lr-1e-3.yaml").is_file() and (out / "trials" / "lr-1e-3" / "config.yaml").is_file()

    monkeypatch.delenv("STUB_INTERRUPT")
    second = run_sweep("classify", base, grid=grid, out=out, command=command)
    calls = _calls(log)[3:]
    assert calls == [f"train --resume {out / 'trials' / 'lr-1e-2'}"]  # finished and failed ones are not run
    assert done.stat().st_mtime_ns == stamp
    rows = {r.name: r for r in second.rows}
    assert rows["lr-1e-2"].status == "done" and rows["lr-1e-2"].metric == pytest.approx(0.5)
    assert rows["lr-0.5"].status.startswith("failed")
    assert second.best.name == "lr-1e-2"

    run_sweep("classify", base, grid=grid, out=out, command=command, retry_failed=True)
    assert _calls(log)[4:] == [f"train classify --config {out / 'configs' / 'lr-0.5.yaml'}"]

    with pytest.raises(ConfigError, match=r"grid: \{'lr': \['1e-3', '1e-2', '0.5'\]\} -> \{'lr': \['1e-3'\]\}"):
        run_sweep("classify", base, grid=["lr=1e-3"], out=out, command=command)
    with pytest.raises(ConfigError, match="train.epochs: 1 -> 2"):
        run_sweep("classify", build_config("classify", data=str(tmp_path), epochs=2), grid=grid, out=out,
                  command=command)
    assert len(_calls(log)) == 5  # the refused calls ran nothing
    # where it runs may change between calls
    run_sweep("classify", build_config("classify", data=str(tmp_path), epochs=1, device="cpu", workers=0),
              grid=grid, out=out, command=command)

    table = list(csv.DictReader((out / "results.csv").open()))
    assert [r["trial"] for r in table] == ["lr-1e-3", "lr-1e-2", "lr-0.5"]
    assert set(table[0]) >= {"lr", "val/top1", "trainable_params", "peak_memory_mb", "images_per_s", "wall_s", "status"}
    assert float(table[0]["val/top1"]) == pytest.approx(0.05) and table[0]["trainable_params"] == "7"
    assert float(table[0]["peak_memory_mb"]) == pytest.approx(101.0) and float(table[0]["wall_s"]) > 0
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_a_folder_that_is_not_a_sweep_is_refused(tmp_path, stub):
    command, log = stub
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a sweep folder"):
        run_sweep("classify", build_config("classify", data=str(tmp_path)), grid=["lr=1e-3"],
                  out=tmp_path / "other", command=command)
    assert _calls(log) == []


def test_optuna_search_continues_its_study(tmp_path, stub):
    pytest.importorskip("optuna")
    command, log = stub
    base = build_config("classify", data=str(tmp_path), epochs=1)
    out = tmp_path / "sweep"
    grid = ["lr=1e-3,1e-2,2e-2", "weight-decay=0,0.05"]
    first = run_sweep("classify", base, grid=grid, search="optuna", trials=3, out=out, command=command)
    names = [r.name for r in first.rows]
    assert 1 <= len(names) <= 3 and len(set(names)) == len(names)
    assert len(_calls(log)) == len(names)  # every distinct setting trained once
    assert all(r.status == "done" and r.metric is not None for r in first.rows)
    stamps = {n: (out / "trials" / n / "results.json").stat().st_mtime_ns for n in names}

    second = run_sweep("classify", base, grid=grid, search="optuna", trials=5, out=out, command=command)
    import optuna

    study = optuna.load_study(study_name="dinotune-sweep", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "optuna.journal"))))
    assert len(study.trials) == 5 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert study.best_value == pytest.approx(max(r.metric for r in second.rows))
    for n, stamp in stamps.items():
        assert (out / "trials" / n / "results.json").stat().st_mtime_ns == stamp
    assert len(_calls(log)) == len(second.rows)


# -------------------------------------------------------------- a real sweep on hymenoptera
def _small_hymenoptera(tmp_path: Path) -> Path:
    source = shared_data("hymenoptera")
    root = tmp_path / "hymenoptera"
    for split, n in (("train", 6), ("val", 4)):
        for cls in ("ants", "bees"):
            (root / split / cls).mkdir(parents=True)
            for f in sorted((source / split / cls).iterdir())[:n]:
                shutil.copy(f, root / split / cls / f.name)
    return root


def test_sweep_on_hymenoptera_writes_its_table_and_resumes(tmp_path, capsys):
    data = _small_hymenoptera(tmp_path)
    out = tmp_path / "sweep"
    flags = ["--data", str(data), "--model", "random:tiny", "--image-size", "28", "--epochs", "1",
             "--batch-size", "4", "--workers", "0", "--check-images", "fast", "--device", "cpu",
             "--grid", "adapter=none,lora", "rank=4", "--out", str(out)]
    result = api.sweep("classify", grid={"adapter": ["none", "lora"], "rank": [4]}, out=out, data=str(data),
                       model="random:tiny", image_size=28, epochs=1, batch_size=4, workers=0,
                       check_images="fast", device="cpu")
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["adapter-none", "adapter-lora_rank-4"]  # rank collapsed for adapter=none
    for row in rows.values():
        assert row["status"] == "done"
        assert 0.0 <= row["metric"] <= 1.0
        assert row["peak_memory_mb"] > 0 and row["images_per_s"] > 0 and row["wall_s"] > 0
        saved = json.loads((Path(row["run_dir"]) / "results.json").read_text())
        assert saved["parameters"]["trainable"] == row["trainable"]
    assert 0 < rows["adapter-none"]["trainable"] < rows["adapter-lora_rank-4"]["trainable"]
    assert result["metric"] == "val/top1"
    md = (out / "results.md").read_text()
    assert "| trial | adapter | rank | val/top1 (best) |" in md and "rank does not apply when adapter=none" in md
    assert len(list(csv.DictReader((out / "results.csv").open()))) == 2
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    stamps = {n: (Path(r["run_dir"]) / "results.json").stat().st_mtime_ns for n, r in rows.items()}

    # the same sweep again, from the command line: nothing is trained again, the table is printed
    capsys.readouterr()
    assert cli.main(["sweep", "classify", *flags]) == 0
    printed = capsys.readouterr().out
    assert "adapter-lora_rank-4" in printed and f"wrote {out / 'results.md'}" in printed
    for name, stamp in stamps.items():
        assert (Path(rows[name]["run_dir"]) / "results.json").stat().st_mtime_ns == stamp
        attempts = json.loads((out / "logs" / f"{name}.json").read_text())["attempts"]
        assert len(attempts) == 1 and attempts[0]["returncode"] == 0

    # other settings in the same folder are refused, naming what changed
    assert cli.main(["sweep", "classify", *flags[:-2], "--lr", "0.01", "--out", str(out)]) == 2
    assert "optim.lr: 0.001 -> 0.01" in capsys.readouterr().err


# ---------------------------------------------------------------------------- linear grid
def test_linear_grid_equals_training_each_head_alone(tiny_folder, tmp_path):
    opts = tiny_options(tmp_path / "unused", data=str(tiny_folder), epochs=2)
    opts.pop("out")
    result = api.sweep("classify", linear_grid={"lr": [1e-3, 3e-2], "pool": ["cls", "last4"]},
                       out=tmp_path / "sweep", **opts)
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["lr-0.001_pool-cls", "lr-0.001_pool-last4", "lr-0.03_pool-cls", "lr-0.03_pool-last4"]
    heads = json.loads((tmp_path / "sweep" / "heads.json").read_text())["heads"]
    weights = {n: load_file(str(tmp_path / "sweep" / "heads" / f"{n}.safetensors")) for n in rows}
    # the heads really differ (so the equality below cannot hold by accident)
    assert not torch.equal(weights["lr-0.001_pool-cls"]["fc.weight"], weights["lr-0.03_pool-cls"]["fc.weight"])
    assert heads["lr-0.001_pool-cls"]["history"][-1]["train/loss"] != heads["lr-0.03_pool-cls"]["history"][-1]["train/loss"]

    for name, lr, pool in (("lr-0.03_pool-last4", 3e-2, "last4"), ("lr-0.001_pool-cls", 1e-3, "cls")):
        alone = api.train(task="classify", adapter="none", cache_features=True, lr=lr, pool=pool,
                          out=str(tmp_path / f"alone-{name}"), **opts)
        run = Path(alone["run_dir"])
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        together = heads[name]["history"]
        assert len(together) == len(records) == 2
        for mine, theirs in zip(together, records):
            for key in ("train/loss", "train/acc", "lr/head", "val/loss", "val/top1"):
                assert mine[key] == theirs[key], (name, key)
        final = load_file(str(run / "checkpoints" / "last" / "head.safetensors"))
        assert all(torch.equal(weights[name][k], final[k]) for k in final)
        assert rows[name]["metric"] == alone["best"]["val/top1"]
        assert rows[name]["trainable"] == sum(v.numel() for v in final.values())

    # the best head is a run folder that loads and evaluates like any other
    best = Path(result["best_run"])
    assert result["best"]["name"] in rows
    assert json.loads((best / "results.json").read_text())["parameters"]["trainable"] == result["best"]["trainable"]
    loaded = api.load(best, device="cpu")
    assert loaded.cfg.head.pool == result["best"]["settings"]["pool"]
    assert loaded.evaluate(str(tiny_folder))["top1"] == pytest.approx(result["best"]["metric"])
    # called again: read back, not trained again
    stamp = (best / "results.json").stat().st_mtime_ns
    again = api.sweep("classify", linear_grid={"lr": [1e-3, 3e-2], "pool": ["cls", "last4"]},
                      out=tmp_path / "sweep", **opts)
    assert [r["metric"] for r in again["rows"]] == [r["metric"] for r in result["rows"]]
    assert (best / "results.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("options, linear, named", [
    ({"adapter": "lora"}, {"lr": [1e-3]}, "needs --adapter none"),
    ({}, {"rank": [4, 8]}, "sweep rank with --grid"),
    ({"head_dropout": 0.1}, {"lr": [1e-3]}, "--head-dropout 0"),
])
def test_linear_grid_refusals(tmp_path, options, linear, named):
    with pytest.raises(ConfigError, match=named):
        api.sweep("classify", linear_grid=linear, out=tmp_path / "sweep", data=str(tmp_path), **options)
    assert not (tmp_path / "sweep").exists()
