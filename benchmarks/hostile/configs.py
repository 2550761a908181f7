"""Round two, configs and sweeps: every YAML dinotune reads (``--config``, a YOLO ``data.yaml``, a
sweep's ``sweep.yaml``) made hostile (a billion-laughs alias bomb, nesting 5000 deep, a key given
twice, a GB file), and sweeps that would cost hours before failing (a million-combination grid, a
grid over missing data, a damaged sweep folder). Handled: one error line naming the file (and the
line, key or count), within the memory cap, nothing started."""

from __future__ import annotations

import time
from pathlib import Path

from dinotune.config import build_config
from dinotune.config.yaml_files import yaml_text
from dinotune.sweep.folder import SETTINGS_FILE, settings_dict
from hostile.common import FAST, case, classify_data, refused, run, run_capped
from tests.test_hostile_configs import laughs

CAP_MB = 400  # MB above what importing torch takes: the bomb expands to GBs


@case("R2-H4", "billion-laughs --config (nested aliases, 10^9 values) under a memory cap", hole=True)
def _(tmp: Path):
    config = tmp / "laughs.yaml"
    config.write_text(laughs(9))
    code, err = run_capped(["train", "classify", "--config", str(config), "--out", str(tmp / "run")], cap_mb=CAP_MB,
                           timeout=120)
    ok, why = refused(code, err, str(config), "aliases")
    return ok and not (tmp / "run").exists(), why


@case("R2-H4", "billion-laughs YOLO data.yaml under a memory cap", hole=True)
def _(tmp: Path):
    data = tmp / "yolo" / "data.yaml"
    (tmp / "yolo" / "images" / "train").mkdir(parents=True)
    data.write_text(laughs(9, key="names"))
    code, err = run_capped(["train", "detect", "--data", str(data), "--out", str(tmp / "run"), *FAST,
                            "--image-size", "56"], cap_mb=CAP_MB, timeout=120)
    return refused(code, err, str(data), "aliases")


@case("R2-cfg-1", "--config nested 5000 deep (block and flow)")
def _(tmp: Path):
    outcomes = []
    for name, text in (("block", "task: classify\ndata:\n  data:\n    " + "- " * 5000 + "x\n"),
                       ("flow", "task: classify\ndata: " + "[" * 5000 + "]" * 5000 + "\n")):
        config = tmp / f"{name}.yaml"
        config.write_text(text)
        code, err = run(["train", "classify", "--config", str(config), "--out", str(tmp / "run")])
        outcomes.append(refused(code, err, str(config), "levels deep"))
    return all(ok for ok, _ in outcomes), " | ".join(why for _, why in outcomes)


@case("R2-cfg-2", "a key given twice in --config (the last one silently won)")
def _(tmp: Path):
    config = tmp / "twice.yaml"
    config.write_text("task: classify\noptim:\n  lr: 0.001\n  weight_decay: 0.05\n  lr: 0.1\n")
    code, err = run(["train", "classify", "--config", str(config), "--out", str(tmp / "run")])
    return refused(code, err, str(config), "line 5", "'lr' is given twice", "line 3")


@case("R2-cfg-3", "a 10^6-combination --grid (25 minutes expanding, then every trial trained)")
def _(tmp: Path):
    data = classify_data(tmp)
    grid = [f"{k}={','.join(map(str, vs))}" for k, vs in (
        ("lr", [i / 1000 for i in range(1, 11)]), ("weight-decay", [i / 100 for i in range(10)]),
        ("epochs", range(1, 11)), ("seed", range(10)), ("rank", range(1, 11)), ("batch-size", range(1, 11)))]
    t0 = time.time()
    code, err = run(["sweep", "classify", "--data", str(data), "--grid", *grid, "--out", str(tmp / "sweep")])
    ok, why = refused(code, err, "1,000,000 combinations", "at most 1,000")
    seconds = time.time() - t0
    return ok and seconds < 10 and not (tmp / "sweep").exists(), f"{why} ({seconds:.1f} s)"


@case("R2-cfg-4", "a --grid over a missing --data (every trial started, each failing)")
def _(tmp: Path):
    missing = tmp / "nowhere"
    code, err = run(["sweep", "classify", "--data", str(missing), "--grid", "lr=1e-3,1e-2", "--out", str(tmp / "sweep"),
                     *FAST])
    ok, why = refused(code, err, "--data", str(missing), "none was started")
    return ok and not (tmp / "sweep").exists(), why


@case("R2-cfg-5", "a damaged sweep.yaml in the sweep folder")
def _(tmp: Path):
    data = classify_data(tmp)
    out = tmp / "sweep"
    out.mkdir()
    (out / SETTINGS_FILE).write_text("task: classify\ngrid: {lr: [1e-3, 1e-2]\n")  # cut short
    code, err = run(["sweep", "classify", "--data", str(data), "--grid", "lr=1e-3,1e-2", "--out", str(out), *FAST])
    return refused(code, err, str(out / SETTINGS_FILE), "give another --out")


@case("R2-cfg-6", "a damaged optuna.journal in the sweep folder")
def _(tmp: Path):
    data = classify_data(tmp)
    out = tmp / "sweep"
    out.mkdir()
    flags = {"data": str(data), "model": "random:tiny", "image_size": 28, "epochs": 1, "batch_size": 4}
    base = build_config("classify", **flags)
    (out / SETTINGS_FILE).write_text(yaml_text(settings_dict("classify", "optuna", {"lr": ["1e-3", "1e-2"]}, base, 1)))
    (out / "optuna.journal").write_text('{"op_code": 99}\nnot json\n')
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    code, err = run(["sweep", "classify", *argv, "--grid", "lr=1e-3,1e-2", "--search", "optuna", "--trials", "1",
                     "--out", str(out), "--no-progress", "--device", "cpu", "--workers", "0"])
    ok, why = refused(code, err, str(out / "optuna.journal"), "damaged", "move it away")
    return ok and not (out / "trials").exists(), why


@case("R2-cfg-7", "a 1 GB --config (sparse)")
def _(tmp: Path):
    config = tmp / "big.yaml"
    with open(config, "wb") as f:
        f.truncate(1 << 30)
    code, err = run(["train", "classify", "--config", str(config), "--out", str(tmp / "run")])
    return refused(code, err, str(config), "larger than the 1 MiB")
