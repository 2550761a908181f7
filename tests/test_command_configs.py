"""Every command's flags come from its typed config (``config/commands.py``, ``config/tools.py``) and
``predict``'s task flags from the task configs: the help shows each field with the config's default,
the parser holds no default of its own, and the Python API's keyword defaults are the same fields."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from pathlib import Path

import pytest

from dinotune import api, demo, robustness
from dinotune.cli import build_parser, command_config, main, predict_task_options
from dinotune.config import TASK_CONFIGS, ConfigError, leaf_fields
from dinotune.config.commands import (
    AnalyzeConfig,
    CheckpointName,
    CompareConfig,
    DemoConfig,
    DownloadConfig,
    EvalConfig,
    PredictConfig,
)
from dinotune.config.embeddings import (
    DuplicatesConfig,
    EmbedConfig,
    IndexConfig,
    KnnConfig,
    MapConfig,
    SearchConfig,
)
from dinotune.config.tools import ExportConfig, PcaConfig, ServeConfig, SweepConfig

# command words, the config of its flags, and the operands / required flags of a minimal call
COMMANDS = [
    (["eval"], EvalConfig, ["RUN", "--data", "D"]),
    (["predict"], PredictConfig, ["RUN", "a.jpg", "b.jpg"]),
    (["export"], ExportConfig, ["RUN", "--out", "O"]),
    (["analyze"], AnalyzeConfig, ["RUN"]),
    (["compare"], CompareConfig, ["--data", "D"]),
    (["demo"], DemoConfig, []),
    (["pca"], PcaConfig, ["a.jpg", "--model", "random:tiny"]),
    (["embed"], EmbedConfig, ["random:tiny", "D", "--out", "e.parquet"]),
    (["knn"], KnnConfig, ["random:tiny"]),
    (["index"], IndexConfig, ["e.parquet", "--out", "I"]),
    (["search"], SearchConfig, ["I", "a.jpg"]),
    (["duplicates"], DuplicatesConfig, ["D"]),
    (["map"], MapConfig, ["D"]),
    (["serve"], ServeConfig, ["RUN"]),
    (["data", "download"], DownloadConfig, ["coco"]),
    (["sweep", next(iter(TASK_CONFIGS))], SweepConfig, []),  # besides the task config's flags
]
IDS = [" ".join(words) for words, _, _ in COMMANDS]


def _help(argv: list[str], capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "10000")  # no wrapping: a help text reads as the config wrote it
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def _shown_default(f: dataclasses.Field, value: object) -> str:
    return f.metadata.get("default_text") or repr(value)


@pytest.mark.parametrize("words, cls, _minimal", COMMANDS, ids=IDS)
def test_help_lists_every_field_with_the_configs_default(words, cls, _minimal, capsys, monkeypatch):
    out = _help(words, capsys, monkeypatch)
    defaults = cls()
    for key, f, _ in leaf_fields(cls):
        text = " ".join(f.metadata["help"].split())
        assert text in out, f"{key}: help missing"
        if f.metadata.get("positional"):
            continue
        flag = f.metadata.get("flag") or "--" + key.replace("_", "-")
        assert f" {flag} " in out, f"{key}: {flag} missing"
        if not f.metadata.get("required"):
            assert f"{text} (default: {_shown_default(f, getattr(defaults, key))})" in out, key


@pytest.mark.parametrize("words, cls, minimal", COMMANDS, ids=IDS)
def test_the_parser_holds_no_default_of_its_own(words, cls, minimal):
    """Unset flags are absent from the namespace, so the config's defaults are the only ones: a
    minimal call parses to the config's defaults plus its operands."""
    ns = build_parser().parse_args(words + minimal)
    cfg, given = command_config(ns, cls)
    operands = {k for k, f, _ in leaf_fields(cls) if f.metadata.get("positional") or f.metadata.get("required")}
    assert given == operands
    assert cfg == dataclasses.replace(cls(), **{k: getattr(cfg, k) for k in operands})


def test_flags_are_typed_and_range_checked_by_the_config():
    ns = build_parser().parse_args(["eval", "RUN", "--data", "D", "--severities", "1", "5", "--batch-size", "4"])
    cfg, given = command_config(ns, EvalConfig)
    assert cfg.severities == [1, 5] and cfg.batch_size == 4 and {"severities", "batch_size"} <= given
    for argv in (["--severities", "6"], ["--batch-size", "0"], ["--subset", "x"]):
        with pytest.raises(ConfigError, match=argv[0]):
            command_config(build_parser().parse_args(["eval", "RUN", "--data", "D", *argv]), EvalConfig)


@pytest.mark.parametrize("func, param, cls, key", [
    (api.analyze, "samples", AnalyzeConfig, "samples"),
    (api.analyze, "split", AnalyzeConfig, "split"),
    (api.compare, "out", CompareConfig, "out"),
    (api.compare, "split", CompareConfig, "split"),
    (api.compare, "subset_seed", CompareConfig, "subset_seed"),
    (api.compare, "device", CompareConfig, "device"),
    (api.evaluate, "split", EvalConfig, "split"),
    (api.pca, "device", PcaConfig, "device"),
    (api.embed, "pool", EmbedConfig, "pool"),
    (api.embed, "batch_size", EmbedConfig, "batch_size"),
    (api.knn, "temperature", KnnConfig, "temperature"),
    (api.search, "k", SearchConfig, "k"),
    (api.duplicates, "threshold", DuplicatesConfig, "threshold"),
    (api.duplicates, "model", DuplicatesConfig, "model"),
    (api.dataset_map, "method", MapConfig, "method"),
    (api.build_index, "kind", IndexConfig, "kind"),
    (api.Run.__init__, "device", PredictConfig, "device"),
    (demo.run_demo, "out", DemoConfig, "out"),
    (demo.run_demo, "model", DemoConfig, "model"),
    (demo.run_demo, "device", DemoConfig, "device"),
    (demo.run_demo, "epochs", DemoConfig, "epochs"),
    (robustness.evaluate_corruptions, "seed", EvalConfig, "corruption_seed"),
])
def test_the_api_defaults_are_the_configs(func, param, cls, key):
    assert inspect.signature(func).parameters[param].default == getattr(cls(), key)


class _Run:
    """What ``evaluate_corruptions`` reads of a loaded run; every evaluation scores 1."""

    class task:
        monitor = "top1"
        pixel_aligned_labels = False

    def evaluate(self, data, split="val", **options):
        return {"top1": 1.0}


def test_corruption_severities_default_and_range_are_the_fields(tmp_path):
    result = robustness.evaluate_corruptions(_Run(), "D", names=["contrast"], out_dir=tmp_path)
    assert [r["severity"] for r in result["rows"]] == EvalConfig().severities
    meta = {f.name: f.metadata for f in dataclasses.fields(EvalConfig)}["severities"]
    for bad in ([meta["le"] + 1], [meta["ge"] - 1], [2.5]):
        with pytest.raises(ConfigError, match="--severities"):
            robustness.evaluate_corruptions(_Run(), "D", names=["contrast"], severities=bad, out_dir=tmp_path)


def test_checkpoint_names_are_the_run_folders():
    from dinotune.engine.run_folder import BEST, CHECKPOINT_NAMES

    assert typing.get_args(CheckpointName) == CHECKPOINT_NAMES
    assert EvalConfig().checkpoint == PredictConfig().checkpoint == ExportConfig().checkpoint == BEST


def test_predict_task_flags_are_the_task_configs_options():
    """``predict``'s task flags: every task config's inference fields (its batch size is
    ``--batch-size``) and predict options, and the task's ``predict_options`` are the latter."""
    from dinotune.config import build_config
    from dinotune.tasks import get_task

    own = {f.name for f in dataclasses.fields(PredictConfig)}  # --out, --batch-size: predict's own flags
    expected = set()
    for name, cls in TASK_CONFIGS.items():
        inference = {f.name for f in dataclasses.fields(cls().inference)}
        extra = getattr(cls, "predict_options", None)
        options = {f.name for f in dataclasses.fields(extra)} if extra else set()
        assert get_task(build_config(name)).predict_options == options
        expected |= (inference | options) - own
    assert set(predict_task_options()) == expected


def test_draw_is_one_flag_whose_help_joins_the_tasks(capsys, monkeypatch):
    out = _help(["predict"], capsys, monkeypatch)
    by_help: dict[str, list[str]] = {}  # tasks saying the same thing share one entry
    for name, cls in TASK_CONFIGS.items():
        options = getattr(cls, "predict_options", None)
        for f in dataclasses.fields(options) if options else ():
            if f.name == "draw":
                by_help.setdefault(f.metadata["help"], []).append(name)
    assert sum(map(len, by_help.values())) >= 3 and len(by_help) >= 2  # detection, instance, segmentation
    texts = [f"{', '.join(names)}: {text}" for text, names in by_help.items()]
    assert f"--draw DIR {'; '.join(texts)}" in out
    assert out.count("--draw DIR") == 2  # the usage line and the help, once each


def test_image_info_is_read_by_the_detection_runtime(tmp_path):
    """``--image-info`` is passed through as a path; the detection task reads it, torch-free."""
    from dinotune.errors import DataError
    from dinotune.tasks.detect.runtime import DetectRuntime, image_ids, read_image_info

    info = tmp_path / "info.json"
    info.write_text(json.dumps({"images": [{"file_name": "a.jpg", "id": 7}, {"file_name": "b.jpg", "id": 9}]}))
    assert "image_info" in DetectRuntime.extra_options
    assert image_ids([Path("x/b.jpg"), Path("x/a.jpg")], read_image_info(info)) == {"x/b.jpg": 9, "x/a.jpg": 7}
    assert read_image_info("") is None
    info.write_text(json.dumps({"images": [{"file_name": "a.jpg"}]}))
    with pytest.raises(DataError, match=r"images\[0\] \(a.jpg\) has id None"):
        read_image_info(info)
    with pytest.raises(DataError, match="cannot be read"):
        read_image_info(tmp_path / "missing.json")
