"""Typed config: YAML round trip, override precedence, validation messages."""

from __future__ import annotations

import types
import typing
from typing import Literal, get_args, get_origin

import pytest

from dinotune.config import (
    TASK_CONFIGS,
    ClassifyConfig,
    ConfigError,
    apply_overrides,
    build_config,
    flag_map,
    leaf_fields,
    load_yaml,
    save_yaml,
)


def test_yaml_round_trip(tmp_path):
    cfg = build_config("classify", data="d", adapter="dora", rank=4, targets=["qkv", "mlp"], two_stage=True,
                       image_size=448, precision="bf16")
    save_yaml(cfg, tmp_path / "c.yaml")
    again = load_yaml(tmp_path / "c.yaml")
    assert again == cfg
    assert again.adapter.targets == ["qkv", "mlp"] and again.backbone.image_size == 448


def test_precedence_defaults_yaml_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("task: classify\ntrain:\n  epochs: 3\n  batch_size: 7\nadapter:\n  kind: full\n")
    cfg = build_config("classify", tmp_path / "c.yaml", epochs=1)
    assert cfg.train.epochs == 1  # flag beats YAML
    assert cfg.train.batch_size == 7  # YAML beats default
    assert cfg.adapter.kind == "full"
    assert cfg.optim.lr == ClassifyConfig().optim.lr  # default where neither says


def test_unknown_and_invalid_values_are_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("task: classify\ntrain:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*train\.epoch.*epochs"):
        load_yaml(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="none, lora, dora, full"):
        build_config("classify", adapter="lor")
    with pytest.raises(ConfigError, match="must be int"):
        build_config("classify", epochs="three")
    with pytest.raises(ConfigError, match="unknown option 'epoch'"):
        build_config("classify", epoch=3)
    with pytest.raises(ConfigError, match="true or false"):
        build_config("classify", augment="maybe")
    with pytest.raises(ConfigError, match=r"--image-size -14: must be > 0 \(backbone.image_size\)"):
        build_config("classify", image_size=-14).validate()
    with pytest.raises(ConfigError, match="two-stage"):
        build_config("classify", adapter="none", two_stage=True).validate()


def test_string_coercion_as_from_the_command_line():
    cfg = apply_overrides(ClassifyConfig(), {"optim.lr": "3e-4", "train.progress": "false",
                                             "adapter.targets": "qkv,mlp", "train.epochs": "5"})
    assert cfg.optim.lr == 3e-4 and cfg.train.progress is False
    assert cfg.adapter.targets == ["qkv", "mlp"] and cfg.train.epochs == 5
    with pytest.raises(ConfigError, match="unknown config key"):
        apply_overrides(ClassifyConfig(), {"optim.nope": 1})


def test_every_field_has_a_unique_flag_and_help():
    flags = flag_map(ClassifyConfig)
    assert flags["--adapter"] == "adapter.kind" and flags["--rank"] == "adapter.rank"
    assert flags["--lr"] == "optim.lr" and flags["--data"] == "data.data"
    for cls in TASK_CONFIGS.values():
        keys = {key for key, _, _ in leaf_fields(cls) if key != "task"}
        assert set(flag_map(cls).values()) == keys  # one flag per field (flag_map raises on a shared flag)
        for key, f, _ in leaf_fields(cls):
            if key != "task":
                assert f.metadata.get("help"), f"{key} has no help text"


def _other_value(tp, default):
    """A valid value of type ``tp`` different from ``default``, and its command-line words."""
    if get_origin(tp) in (typing.Union, types.UnionType):  # int | Literal["auto"]: an int
        return _other_value(get_args(tp)[0], default)
    if get_origin(tp) is Literal:
        value = next(c for c in get_args(tp) if c != default)
        return value, [str(value)]
    if get_origin(tp) is list:
        item = get_args(tp)[0]
        value = [item(3)] if item in (int, float) else ["x"]
        return value, [str(v) for v in value]
    if tp is bool:
        return (not default), None
    if tp is int:
        return default + 3, [str(default + 3)]
    if tp is float:
        return default + 0.5, [str(default + 0.5)]
    return "x", ["x"]


@pytest.mark.parametrize("task", list(TASK_CONFIGS))
def test_every_field_is_set_by_its_flag_and_survives_yaml(task, tmp_path):
    from dinotune.cli import build_parser
    from dinotune.cli.flags import _overrides

    cls = TASK_CONFIGS[task]
    parser = build_parser()
    defaults = cls()
    for key, flag in ((k, f) for f, k in flag_map(cls).items()):
        tp = dict((k, t) for k, _, t in leaf_fields(cls))[key]
        default = defaults
        for part in key.split("."):
            default = getattr(default, part)
        value, words = _other_value(tp, default)
        argv = ["train", task] + ([flag, *words] if words is not None else
                                  [flag if value else "--no-" + flag[2:]])
        cfg = apply_overrides(cls(), _overrides(parser.parse_args(argv), cls))
        got = cfg
        for part in key.split("."):
            got = getattr(got, part)
        assert got == value, f"{flag} did not set {key}"
        save_yaml(cfg, tmp_path / "c.yaml")
        assert load_yaml(tmp_path / "c.yaml") == cfg, f"{key} did not survive the YAML round trip"


def test_moved_keys_of_older_run_folders_still_load(tmp_path):
    (tmp_path / "old.yaml").write_text("task: detect\nmodel:\n  topk: 7\n  score_threshold: 0.2\n")
    cfg = load_yaml(tmp_path / "old.yaml")
    assert cfg.inference.top_k == 7 and cfg.inference.score_threshold == 0.2


def test_inference_settings_are_checked():
    with pytest.raises(ConfigError, match=r"--top-k 0: must be >= 1 \(inference.top_k\)"):
        build_config("classify", top_k=0).validate()
    with pytest.raises(ConfigError, match=r"--draw-threshold 1.5: must be in \[0, 1\]"):
        build_config("detect", draw_threshold=1.5).validate()
    with pytest.raises(ConfigError, match=r"--eval-batch-size 0: must be >= 1 \(inference.batch_size\)"):
        build_config("segment", eval_batch_size=0).validate()


def test_batch_size_takes_a_number_or_auto_and_names_both_when_neither(tmp_path):
    assert build_config("classify", batch_size="auto").train.batch_size == "auto"
    assert build_config("classify", batch_size="16").train.batch_size == 16
    with pytest.raises(ConfigError, match=r"train.batch_size must be int or auto, got 'big'"):
        build_config("classify", batch_size="big")
    cfg = build_config("classify", batch_size="auto")
    save_yaml(cfg, tmp_path / "c.yaml")
    assert load_yaml(tmp_path / "c.yaml").train.batch_size == "auto"


def test_report_to_and_layer_decay_are_checked_with_their_flags():
    with pytest.raises(ConfigError, match="--report-to neptune: not a logger"):
        build_config("classify", report_to="tensorboard,neptune").validate()
    with pytest.raises(ConfigError, match="--report-to none cannot be combined with csv"):
        build_config("classify", report_to="none csv").validate()
    with pytest.raises(ConfigError, match="--layer-decay .* --adapter none"):
        build_config("classify", adapter="none", layer_decay=0.75).validate()
    build_config("detect", adapter="full", layer_decay=0.75, report_to="csv").validate()
