"""The table of adapter kinds (``dinotune.adapters.ADAPTERS``): one entry per ``AdapterKind``, unknown
kinds refused by name, and each entry's declared files and trainability match what it does."""

from __future__ import annotations

import typing

import pytest
import torch

from dinotune.adapters import (
    ADAPTERS,
    adapter_for,
    apply_adapter,
    load_adapter,
    merge_adapter,
    save_adapter,
    trainable_backbone_parameters,
)
from dinotune.backbone import DinoBackbone
from dinotune.config import AdapterConfig, ConfigError
from dinotune.config.base import AdapterKind

pytestmark = pytest.mark.usefixtures("one_thread")

KINDS = typing.get_args(AdapterKind)


def test_every_adapter_kind_has_exactly_one_entry():
    assert set(ADAPTERS) == set(KINDS)
    for kind in KINDS:
        assert adapter_for(kind) is ADAPTERS[kind] and ADAPTERS[kind].kind == kind


def test_unknown_kind_is_refused_naming_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown adapter 'qlora': choose one of none, lora, dora, full"):
        adapter_for("qlora")
    with pytest.raises(ConfigError, match="'qlora'"):
        apply_adapter(DinoBackbone.from_spec("random:tiny"), AdapterConfig(kind="qlora"))


def test_declared_properties():
    assert [k for k in KINDS if not ADAPTERS[k].trains_backbone] == ["none"]
    assert sorted(k for k in KINDS if ADAPTERS[k].uses_peft) == ["dora", "lora"]
    assert all(ADAPTERS[k].merges == ADAPTERS[k].uses_peft for k in KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_holds_the_declared_files_and_reloads_the_trained_backbone(kind, tmp_path):
    cfg = AdapterConfig(kind=kind, rank=2, targets=["qkv"])
    trained = DinoBackbone.from_spec("random:tiny")
    apply_adapter(trained, cfg)
    params = trainable_backbone_parameters(trained, cfg)
    assert bool(params) == adapter_for(kind).trains_backbone
    assert {n for n, p in trained.named_parameters() if p.requires_grad} == {n for n, _ in params}
    with torch.no_grad():
        for _, p in params:  # as if trained (LoRA's B leaves its zero init)
            p.add_(0.05 * torch.randn_like(p))
    save_adapter(trained, cfg, tmp_path)
    assert {p.name for p in tmp_path.glob("*.safetensors")} == set(adapter_for(kind).weight_files)

    rebuilt = DinoBackbone.from_spec("random:tiny")
    apply_adapter(rebuilt, cfg)
    load_adapter(rebuilt, cfg, tmp_path)
    x = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        expected, got = trained(x).patch_tokens, rebuilt(x).patch_tokens
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        if adapter_for(kind).uses_peft:
            assert not torch.allclose(expected, DinoBackbone.from_spec("random:tiny")(x).patch_tokens)
        merge_adapter(rebuilt)  # folds PEFT kinds into the base weights; a no-op for the others
        assert not hasattr(rebuilt.model, "peft_config")
        torch.testing.assert_close(rebuilt(x).patch_tokens, expected, rtol=1e-4, atol=1e-5)
