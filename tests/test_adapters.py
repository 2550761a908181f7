"""Adapters: LoRA / DoRA leave base weights untouched, save -> load is exact, merge is exact."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

import dinotune
from dinotune.adapters import (
    adapter_tensors,
    apply_adapter,
    merge_adapter,
    resolve_targets,
    trainable_backbone_parameters,
)
from dinotune.backbone import DinoBackbone
from dinotune.config import AdapterConfig, ConfigError
from tests.conftest import make_trainer, tiny_options


def _base_weights(backbone: DinoBackbone) -> dict[str, torch.Tensor]:
    """Base (non-adapter) weights keyed by their un-adapted names."""
    return {n.replace(".base_layer", ""): p.detach().clone()
            for n, p in backbone.hf_model().state_dict().items() if "lora_" not in n}


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_training_leaves_base_weights_bit_equal(kind, tiny_folder, tmp_path):
    fresh = DinoBackbone.from_spec("random:tiny")
    before = _base_weights(fresh)
    result = dinotune.train(task="classify", data=str(tiny_folder),
                            **tiny_options(tmp_path / "run", adapter=kind, epochs=2, backbone_lr=1e-2))
    run = dinotune.load(result["run_dir"], checkpoint_name="last", merge=False)
    after = _base_weights(run.model.backbone)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), f"{name} changed during {kind} training"
    # ...while the adapter itself did learn something: B left its zero init
    lora_b = [p for n, p in adapter_tensors(run.model.backbone).items() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)


def test_targets_and_last_n_blocks():
    b = DinoBackbone.from_spec("random:tiny")  # 4 blocks
    qkv_last2 = resolve_targets(b, ["qkv"], last_n_blocks=2)
    assert len(qkv_last2) == 6 and all(".layer.2." in n or ".layer.3." in n for n in qkv_last2)
    assert all(n.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj") for n in qkv_last2)
    attn = resolve_targets(b, ["attention"])
    assert len(attn) == 4 * 4 and any(n.endswith("o_proj") for n in attn)
    mlp = resolve_targets(b, ["mlp"], last_n_blocks=1)
    assert sorted(n.rsplit(".", 1)[-1] for n in mlp) == ["fc1", "fc2"]
    assert resolve_targets(b, ["fc1"]) == [f"encoder.layer.{i}.mlp.fc1" for i in range(4)]
    with pytest.raises(ConfigError, match="q_proj"):
        resolve_targets(b, ["query"])
    with pytest.raises(ConfigError, match="last_n_blocks"):
        resolve_targets(b, ["qkv"], last_n_blocks=5)


def test_apply_adapter_emits_no_library_deprecation_noise():
    b = DinoBackbone.from_spec("random:tiny")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_adapter(b, AdapterConfig(kind="lora"))
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))], \
        [str(w.message) for w in caught]


def test_trainable_parameters_per_kind():
    for kind, expect in [("none", 0), ("full", None), ("lora", None)]:
        b = DinoBackbone.from_spec("random:tiny")
        cfg = AdapterConfig(kind=kind, rank=4, targets=["qkv"])
        apply_adapter(b, cfg)
        trainable = {n for n, p in b.named_parameters() if p.requires_grad}
        listed = {n for n, _ in trainable_backbone_parameters(b, cfg)}
        assert trainable == listed
        if kind == "none":
            assert not trainable
        if kind == "lora":  # rank 4 on q,k,v of 4 blocks: A (4 x 64) + B (64 x 4) each
            assert sum(p.numel() for n, p in b.named_parameters() if p.requires_grad) == 4 * 3 * 2 * 64 * 4


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merged_equals_unmerged(kind):
    torch.manual_seed(0)
    b = DinoBackbone.from_spec("random:tiny")
    apply_adapter(b, AdapterConfig(kind=kind, rank=4, alpha=8, targets=["attention", "mlp"]))
    # B starts at zero (adapter == identity): make it non-zero so the check cannot pass trivially
    with torch.no_grad():
        for n, p in b.named_parameters():
            if "lora_B" in n or "lora_magnitude" in n:
                p.add_(torch.randn_like(p) * 0.05)
    b.eval()
    x = torch.randn(3, 3, 42, 56)
    with torch.no_grad():
        unmerged = b(x, layers=2)
        plain = DinoBackbone.from_spec("random:tiny").eval()(x)
        assert (unmerged.cls - plain.cls).abs().max() > 1e-3, "the adapter changed nothing"
        merge_adapter(b)
        assert not adapter_tensors(b), "adapter layers should be gone after merging"
        merged = b(x, layers=2)
    torch.testing.assert_close(merged.cls, unmerged.cls, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged.patch_tokens, unmerged.patch_tokens, atol=1e-4, rtol=1e-4)
    for a, c in zip(merged.layers_patch, unmerged.layers_patch):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)


def _train_in_memory(kind: str, data, run_dir):
    """Train through the engine and keep the trained model in memory (as it is after the last
    epoch), so the test can compare it with what a reload of the run folder rebuilds."""
    cfg = dinotune.build_config("classify", data=str(data), **tiny_options(
        run_dir, adapter=kind, epochs=1, backbone_lr=1e-2, pool="last4", head="mlp", mlp_hidden=16))
    trainer = make_trainer(cfg, run_dir)
    trainer.fit()
    return trainer.model.eval()


@pytest.mark.parametrize("kind", ["lora", "dora", "full", "none"])
def test_save_load_gives_the_trained_models_logits(kind, tiny_folder, tmp_path):
    trained = _train_in_memory(kind, tiny_folder, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last"
    names = {p.name for p in ckpt.iterdir()}
    assert "head.safetensors" in names
    assert ("adapter_model.safetensors" in names) == (kind in ("lora", "dora"))
    assert ("backbone.safetensors" in names) == (kind == "full")
    if kind in ("lora", "dora"):  # adapter + head only: far smaller than the backbone itself
        adapter_bytes = (ckpt / "adapter_model.safetensors").stat().st_size
        backbone_params = sum(p.numel() for p in DinoBackbone.from_spec("random:tiny").parameters())
        assert adapter_bytes < backbone_params * 4 / 5

    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad():
        expected = trained(images=x)
        # the backbone's weights changed in training for every kind that trains it
        fresh = DinoBackbone.from_spec("random:tiny").eval()
        moved = (trained.backbone(x).cls - fresh(x).cls).abs().max()
        assert (moved > 1e-4) == (kind != "none")
        # rebuilt from nothing but the run folder: the same logits, unmerged bit for bit, merged to 1e-5
        unmerged = dinotune.load(tmp_path / "run", checkpoint_name="last", merge=False).model(images=x)
        merged = dinotune.load(tmp_path / "run", checkpoint_name="last", merge=True).model(images=x)
    torch.testing.assert_close(unmerged, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_plain_peft_reads_the_saved_adapter(kind, tiny_folder, tmp_path):
    """The README's promise: ``PeftModel.from_pretrained`` on a checkpoint folder, over the same
    base weights, gives the backbone outputs dinotune's loaded run gives."""
    from peft import PeftModel

    from dinotune.backbone.loading import load_dinov2

    _train_in_memory(kind, tiny_folder, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last"
    plain = PeftModel.from_pretrained(load_dinov2("random:tiny"), str(ckpt)).eval()
    ours = dinotune.load(tmp_path / "run", checkpoint_name="last", merge=False).model.backbone
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = ours(x, layers=1)
        got = plain(pixel_values=x).last_hidden_state
        untouched = load_dinov2("random:tiny").eval()(pixel_values=x).last_hidden_state
    assert (got - untouched).abs().max() > 1e-4  # the adapter was read and does something
    torch.testing.assert_close(got[:, 0], expected.cls, atol=1e-6, rtol=0)
    torch.testing.assert_close(got[:, 1:], expected.patch_tokens, atol=1e-6, rtol=0)


def test_unfrozen_blocks_train_beside_lora_and_reload(tmp_path):
    """--adapter lora --unfreeze-blocks 1 (ExPLoRA): the last block's own weights train with the
    adapter, the others stay at their base values; the run reloads to the same model."""
    from dinotune.backbone.model import DinoBackbone
    from tests.conftest import make_class_folders, tiny_options

    data = make_class_folders(tmp_path / "data" / "train", ["red", "blue"], 3).parent
    make_class_folders(data / "val", ["red", "blue"], 1, seed=1)
    run = dinotune.train(task="classify", data=str(data), **tiny_options(tmp_path / "run", epochs=1, lr=1e-2,
                                                                      backbone_lr=1e-2, unfreeze_blocks=1))
    loaded = dinotune.load(run["run_dir"], device="cpu", merge=False)
    backbone = loaded.model.backbone
    base = DinoBackbone.from_spec("random:tiny")
    fam = backbone.family
    trained = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
               for n, p in backbone.named_parameters() if "lora_" not in n}
    last = backbone.num_layers - 1
    changed = {fam.block_index(n) for n, p in base.named_parameters()
               if n in trained and not torch.equal(p, trained[n])}
    assert changed == {last}  # only the unfrozen block's own weights moved
    assert (Path(run["run_dir"]) / "checkpoints" / "best" / "unfrozen_blocks.safetensors").is_file()
    again = dinotune.load(run["run_dir"], device="cpu")
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(again.model.backbone.eval()(x).cls, loaded.model.backbone.eval()(x).cls)
