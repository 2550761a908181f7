"""Typed config: YAML round trip, override precedence, validation messages."""

from __future__ import annotations

import pytest

from dinotune.config import (
    ClassifyConfig,
    ConfigError,
    apply_overrides,
    build_config,
    flag_map,
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
    with pytest.raises(ConfigError, match="try 224 or 238"):
        build_config("classify", image_size=225).validate()
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
    from dataclasses import fields

    from dinotune.config import leaf_fields

    for key, f, _ in leaf_fields(ClassifyConfig):
        if key != "task":
            assert f.metadata.get("help"), f"{key} has no help text"
    assert len(fields(ClassifyConfig)) == 7
