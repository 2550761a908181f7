"""Hostile YAML and sweep settings: every YAML dinotune reads goes through one bounded reader
(``dinotune.config.yaml_files``: size, alias expansion, depth, duplicate keys), and a sweep refuses
what would cost hours before its first trial (a grid too large, missing data, a damaged folder).

The billion-laughs test runs the command line under a memory cap (``main_capped``: in this process,
its data segment capped for the call) and checks its time, so an open hole fails the test rather than
the machine; the other payloads here are sized so that even without
the checks they cost little (a few MB), not to bring a test machine down if the checks regress."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import main_capped
from dinotune import cli
from dinotune.config import ConfigError, build_config, load_yaml, save_yaml
from dinotune.config.io import load_run_config
from dinotune.errors import DataError
from dinotune.sweep import run_sweep
from dinotune.sweep.folder import SETTINGS_FILE, SweepFolder, settings_dict

ROOT = Path(__file__).resolve().parents[1]


def read_yaml(path: Path):
    from dinotune.config.yaml_files import read_yaml  # here, so that the module imports without it (the
    # billion-laughs test is also run against code from before the reader existed)

    return read_yaml(path)


def laughs(levels: int, width: int = 9, key: str = "data:\n  data") -> str:
    """A config whose ``data.data`` is ``levels`` nested aliases of ``width`` each: ``width**levels``
    "lol"s once expanded (9 levels: 387 million, 2.7 GB as a string)."""
    names = "abcdefghijklmnop"
    parts = ['&a [' + ",".join(['"lol"'] * width) + ']']
    parts += [f'&{c} [{",".join(["*" + p] * width)}]' for p, c in zip(names, names[1:levels])]
    return f"task: classify\n{key}: [" + ", ".join(parts) + "]\n"


def cli_error(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and the one ``dinotune: error:`` line of ``dinotune ARGV`` (asserting there is one)."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("dinotune: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return code, lines[0]


# ------------------------------------------------------------------------------ billion laughs
def test_billion_laughs_config_is_refused_under_a_memory_cap(tmp_path, capsys):
    """A 354-byte --config expanding to 10^9 values: refused in the parser, in bounded memory and time
    (before: 35 s and 4.4 GB, then a MemoryError traceback)."""
    config = tmp_path / "laughs.yaml"
    config.write_text(laughs(9))
    assert config.stat().st_size < 500
    t0 = time.time()
    code, err = main_capped(["train", "classify", "--config", str(config), "--out", str(tmp_path / "run")], capsys,
                            cap_mb=400)
    lines = [ln for ln in err.splitlines() if ln.startswith("dinotune: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert str(config) in lines[0] and "aliases" in lines[0] and "line 3" in lines[0]
    assert not (tmp_path / "run").exists()
    assert time.time() - t0 < 120


def _write_yolo(root: Path, names_yaml: str) -> Path:
    (root / "images" / "train").mkdir(parents=True)
    (root / "data.yaml").write_text(names_yaml)
    return root


READERS = {  # every YAML dinotune reads, each through its own caller
    "--config": lambda p: load_yaml(p),
    "a run's config.yaml": lambda p: load_run_config(p),
    "sweep.yaml": lambda p: SweepFolder.open(p.parent, {"task": "classify"}),
    "YOLO data.yaml": lambda p: __import__("dinotune.tasks.detect.data", fromlist=["x"]).find_detection_data(
        p.parent, "train", min_box_size=0.0),
}


@pytest.mark.parametrize("reader", list(READERS))
def test_every_yaml_reader_bounds_alias_expansion(tmp_path, reader):
    """7 levels of 9 (4.8 million values once expanded, over the budget; a few MB even unchecked)."""
    folder = tmp_path / "x"
    folder.mkdir()
    name = {"sweep.yaml": SETTINGS_FILE, "YOLO data.yaml": "data.yaml"}.get(reader, "config.yaml")
    path = folder / name
    path.write_text(laughs(7, key="names") if reader == "YOLO data.yaml" else laughs(7))
    with pytest.raises((ConfigError, DataError), match="aliases expand it") as err:
        READERS[reader](path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_every_yaml_reader_goes_through_the_one_bounded_reader():
    """No module but ``config/yaml_files.py`` parses YAML itself."""
    offenders = []
    for path in (ROOT / "dinotune").rglob("*.py"):
        text = path.read_text()
        if path.name != "yaml_files.py" and re.search(r"^\s*(import yaml|from yaml\b)|yaml\.(safe_)?load", text, re.MULTILINE):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders


def test_aliases_within_budget_and_merge_keys_still_work(tmp_path):
    """Anchors are a YAML feature a hand-written config may use: kept, only their expansion is bounded."""
    path = tmp_path / "c.yaml"
    path.write_text("task: classify\noptim:\n  lr: &lr 0.002\n  backbone_lr: *lr\n"
                    "adapter: &ad {kind: lora, rank: 4}\ntrain:\n  epochs: 3\n")
    cfg = load_yaml(path)
    assert cfg.optim.lr == cfg.optim.backbone_lr == 0.002 and cfg.adapter.rank == 4
    path.write_text("base: &b {x: 1, y: 2}\nover: {<<: *b, x: 3}\n")
    assert read_yaml(path)["over"] == {"x": 3, "y": 2}  # a merged key may be overridden


def test_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: classify\ndata:\n  data: &a [*a]\n")
    with pytest.raises(ConfigError, match=r"c\.yaml, line 3: the alias \*a is inside the value it names"):
        load_yaml(path)


# ------------------------------------------------------------------------------------- depth
@pytest.mark.parametrize("form", ["block", "flow", "aliases"])
def test_deep_nesting_is_refused_by_name(tmp_path, form, capsys):
    """5000 levels gave a RecursionError traceback; refused beyond MAX_DEPTH levels, in one line."""
    path = tmp_path / "deep.yaml"
    if form == "block":
        path.write_text("task: classify\ndata:\n  data:\n    " + "- " * 5000 + "x\n")  # block sequences, one line
    elif form == "flow":
        path.write_text("task: classify\ndata: " + "[" * 5000 + "]" * 5000 + "\n")
    else:  # each alias one level deeper than the last: shallow text, deep data
        path.write_text("task: classify\nx:\n" + "".join(f"  - &a{i} [{f'*a{i - 1}' if i else 1}]\n"
                                                          for i in range(5000)))
    code, line = cli_error(["train", "classify", "--config", str(path), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and str(path) in line and ("levels deep" in line or "nesting depth" in line)
    assert not (tmp_path / "run").exists()


def test_shallow_enough_nesting_reads(tmp_path):
    from dinotune.config.yaml_files import MAX_DEPTH

    path = tmp_path / "ok.yaml"
    path.write_text("".join("  " * i + f"k{i}:\n" for i in range(MAX_DEPTH - 1)) + "  " * (MAX_DEPTH - 1) + "x: 1\n")
    assert read_yaml(path)["k0"]["k1"]


# --------------------------------------------------------------------------- duplicate keys
def test_a_key_given_twice_is_refused_naming_key_file_and_lines(tmp_path, capsys):
    path = tmp_path / "twice.yaml"
    path.write_text("task: classify\noptim:\n  lr: 0.001\n  weight_decay: 0.05\n  lr: 0.1\n")
    code, line = cli_error(["train", "classify", "--config", str(path), "--out", str(tmp_path / "run")], capsys)
    assert code == 2 and f"{path}, line 5: the key 'lr' is given twice (first on line 3)" in line


def test_a_key_given_twice_in_data_yaml_is_refused(tmp_path):
    from dinotune.tasks.detect.data import find_detection_data

    root = _write_yolo(tmp_path / "yolo", "names: [a, b]\ntrain: images/train\nnames: [c]\n")
    with pytest.raises(DataError, match=r"data\.yaml, line 3: the key 'names' is given twice \(first on line 1\)"):
        find_detection_data(root, "train", min_box_size=0.0)


# ------------------------------------------------------------------------------- file size
def test_an_oversized_yaml_is_refused_reading_only_its_limit(tmp_path):
    from dinotune.config.yaml_files import MAX_BYTES

    path = tmp_path / "big.yaml"
    with open(path, "wb") as f:  # sparse: a GB the reader must not read
        f.truncate(1 << 30)
    with pytest.raises(ConfigError, match=r"big\.yaml: larger than the 1 MiB"):
        load_yaml(path)
    path.write_text("task: classify\n# " + "x" * (MAX_BYTES - 20) + "\n")
    assert path.stat().st_size <= MAX_BYTES
    assert load_yaml(path).task == "classify"  # at the limit: read


@pytest.mark.parametrize("text, said", [
    ("task: classify\ntrain:\n  seed: " + "1" * 5000 + "\n", "digits"),  # an int Python will not build
    ("task: classify\ntrain: {seed: 1\n", "line 3"),
    ("task: classify\n---\ntask: detect\n", "single document"),
])
def test_values_pyyaml_cannot_build_are_one_line_errors(tmp_path, text, said):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=said) as err:
        load_yaml(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------ sweeps
FAIL = [sys.executable, "-c", "import sys; open(sys.argv[-1] + '.started', 'w'); sys.exit(1)"]


def test_a_grid_over_the_limit_is_refused_up_front_by_its_count(tmp_path):
    """10^6 combinations spent ~25 minutes expanding before the first trial; now refused at once."""
    base = build_config("classify", data=str(tmp_path))
    grid = [f"{key}={','.join(str(v) for v in values)}" for key, values in (
        ("lr", [i / 1000 for i in range(1, 11)]), ("weight-decay", [i / 100 for i in range(10)]),
        ("epochs", range(1, 11)), ("seed", range(10)), ("rank", range(1, 11)), ("batch-size", range(1, 11)))]
    t0 = time.time()
    with pytest.raises(ConfigError, match=r"--grid makes 1,000,000 combinations \(10 lr x 10 weight-decay x 10 "
                                          r"epochs x 10 seed x 10 rank x 10 batch-size\); a sweep tries at most 1,000"):
        run_sweep("classify", base, grid=grid, out=tmp_path / "sweep", command=FAIL)
    with pytest.raises(ConfigError, match="100,000 values"):  # one axis alone is not even parsed
        run_sweep("classify", base, grid=["seed=" + ",".join(map(str, range(100_000)))], out=tmp_path / "sweep")
    assert time.time() - t0 < 10 and not (tmp_path / "sweep").exists()
    from dinotune.sweep.grid import MAX_COMBINATIONS, check_size, parse_axes

    ok = [f"seed={','.join(map(str, range(MAX_COMBINATIONS // 10)))}", f"epochs={','.join(map(str, range(1, 11)))}"]

    assert check_size(parse_axes(type(base), ok)[0]) == MAX_COMBINATIONS  # at the limit: allowed


def test_optuna_may_search_a_space_larger_than_a_grid_without_expanding_it(tmp_path):
    pytest.importorskip("optuna")
    base = build_config("classify", data=str(tmp_path / "data"), epochs=1)
    (tmp_path / "data").mkdir()
    grid = [f"seed={','.join(map(str, range(100)))}", f"epochs={','.join(map(str, range(1, 101)))}"]
    t0 = time.time()
    result = run_sweep("classify", base, grid=grid, search="optuna", trials=1, out=tmp_path / "sweep", command=FAIL)
    assert time.time() - t0 < 20 and len(result.rows) == 1 and result.rows[0].status.startswith("failed")


@pytest.mark.parametrize("flag", ["data", "val_data", "grid"])
def test_missing_data_is_refused_once_before_any_trial(tmp_path, flag):
    data = tmp_path / "data"
    data.mkdir()
    missing = tmp_path / "nowhere"
    options = {"data": str(missing)} if flag == "data" else {"data": str(data), "val_data": str(missing)}
    grid = ["lr=1e-3,1e-2"] + ([f"data={data},{missing}"] if flag == "grid" else [])
    if flag == "grid":
        options = {"data": str(data)}
    with pytest.raises(DataError, match=rf"--(val-)?data {re.escape(str(missing))}: not found .* none was started"):
        run_sweep("classify", build_config("classify", **options), grid=grid, out=tmp_path / "sweep", command=FAIL)
    assert not (tmp_path / "sweep").exists() and not list(tmp_path.rglob("*.started"))
    # a dataset name is the task's to check, not a path
    run_sweep("classify", build_config("classify", data="hf:beans"), grid=["lr=1e-3"], out=tmp_path / "hf",
              command=FAIL)


@pytest.mark.parametrize("damage", ["grid: [unclosed\n", "- a list\n", "task: classify\ngrid: {}\ngrid: {}\nbase: {}\n",
                                    laughs(7, key="base")])
def test_a_damaged_sweep_yaml_is_one_line_naming_it(tmp_path, damage, capsys):
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "sweep"
    out.mkdir()
    (out / SETTINGS_FILE).write_text(damage)
    code, line = cli_error(["sweep", "classify", "--data", str(data), "--grid", "lr=1e-3,1e-2", "--out", str(out)],
                           capsys)
    assert code == 2 and str(out / SETTINGS_FILE) in line and "give another --out" in line


def test_a_damaged_optuna_journal_is_one_line_naming_it(tmp_path):
    pytest.importorskip("optuna")
    data = tmp_path / "data"
    data.mkdir()
    base = build_config("classify", data=str(data), epochs=1)
    out = tmp_path / "sweep"
    run_sweep("classify", base, grid=["lr=1e-3,1e-2"], search="optuna", trials=1, out=out, command=FAIL)
    journal = out / "optuna.journal"
    for damage in ("not json at all\n", '{"op_code": 99}\n', '[1, 2]\n', '{"op_code": 0}\n'):
        journal.write_text(damage)
        with pytest.raises(ConfigError, match=r"optuna\.journal: damaged.*move it away") as err:
            run_sweep("classify", base, grid=["lr=1e-3,1e-2"], search="optuna", trials=1, out=out, command=FAIL)
        assert "\n" not in str(err.value)


def test_the_sweep_folder_round_trips_through_the_bounded_reader(tmp_path):
    """What dinotune writes (a config, a sweep's settings) reads back unchanged."""
    cfg = build_config("classify", data=str(tmp_path), adapter="lora", rank=4)
    save_yaml(cfg, tmp_path / "config.yaml")
    assert load_run_config(tmp_path / "config.yaml") == cfg
    settings = settings_dict("classify", "grid", {"lr": ["1e-3", "1e-2"]}, cfg, None)
    folder = SweepFolder.open(tmp_path / "sweep", settings)
    folder.release()
    SweepFolder.open(tmp_path / "sweep", settings).release()  # continued: the same settings read back
