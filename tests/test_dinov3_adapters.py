"""Every adapter kind and target alias on both families; a DINOv3 run saved and rebuilt from its
folder gives the trained model's logits (the random spec + seed re-create the base weights)."""

from __future__ import annotations

import pytest
import torch

import dinotune
from dinotune.adapters import adapter_tensors, apply_adapter, merge_adapter, resolve_targets, trainable_backbone_parameters
from dinotune.backbone import DinoBackbone
from dinotune.config import AdapterConfig, ConfigError
from tests.conftest import make_trainer, tiny_options

pytestmark = pytest.mark.usefixtures("one_thread")

# family -> (random spec, MLP leaf names, a valid image side)
FAMILIES = {"dinov2": ("random:tiny", ["fc1", "fc2"], 28), "dinov3": ("random:dinov3-tiny", ["down_proj", "up_proj"], 32)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_target_aliases_resolve_on_both_families(family):
    spec, mlp_leaves, _ = FAMILIES[family]
    b = DinoBackbone.from_spec(spec)  # 4 blocks
    attn = resolve_targets(b, ["attention"])
    assert len(attn) == 4 * 4 and {n.rsplit(".", 1)[-1] for n in attn} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    qkv = resolve_targets(b, ["qkv"], last_n_blocks=2)
    assert len(qkv) == 6 and all(".layer.2." in n or ".layer.3." in n for n in qkv)
    mlp = resolve_targets(b, ["mlp"], last_n_blocks=1)
    assert sorted(n.rsplit(".", 1)[-1] for n in mlp) == mlp_leaves and all(".layer.3." in n for n in mlp)
    named = resolve_targets(b, ["q_proj", mlp_leaves[0]])
    assert len(named) == 8
    other = {"fc1": "up_proj", "down_proj": "fc2"}[mlp_leaves[0]]  # the other family's MLP name
    with pytest.raises(ConfigError, match=f"'{other}' matches no linear layer.*{mlp_leaves[0]}"):
        resolve_targets(b, [other])


def test_gated_dinov3_mlp_targets():
    from transformers import AutoModel

    from dinotune.backbone.registry import arch_config

    with torch.device("meta"):  # module names are all this needs: no weights
        b = DinoBackbone(AutoModel.from_config(arch_config("dinov3-small-plus")))
    mlp = resolve_targets(b, ["mlp"], last_n_blocks=1)
    assert sorted(n.rsplit(".", 1)[-1] for n in mlp) == ["down_proj", "gate_proj", "up_proj"]
    assert resolve_targets(b, ["gate_proj"], last_n_blocks=2) == ["model.layer.10.mlp.gate_proj", "model.layer.11.mlp.gate_proj"]


@pytest.mark.parametrize("kind", ["none", "lora", "dora", "full"])
def test_every_kind_on_dinov3(kind):
    torch.manual_seed(0)
    b = DinoBackbone.from_spec("random:dinov3-tiny")
    cfg = AdapterConfig(kind=kind, rank=4, alpha=8, targets=["attention", "mlp"], last_n_blocks=2)
    apply_adapter(b, cfg)
    trainable = {n for n, p in b.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in trainable_backbone_parameters(b, cfg)}
    if kind == "none":
        assert not trainable
        return
    if kind == "full":
        assert "model.embeddings.register_tokens" in trainable and "model.embeddings.mask_token" not in trainable
        return
    assert trainable and all(".layer.2." in n or ".layer.3." in n for n in trainable)
    # B starts at zero (the adapter is an identity): make it non-zero so merging is really tested
    with torch.no_grad():
        for n, p in b.named_parameters():
            if "lora_B" in n or "lora_magnitude" in n:
                p.add_(torch.randn_like(p) * 0.05)
    b.eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        unmerged = b(x, layers=2)
        plain = DinoBackbone.from_spec("random:dinov3-tiny").eval()(x)
        assert (unmerged.cls - plain.cls).abs().max() > 1e-3, "the adapter changed nothing"
        merge_adapter(b)
        assert not adapter_tensors(b)
        merged = b(x, layers=2)
    torch.testing.assert_close(merged.patch_tokens, unmerged.patch_tokens, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(merged.layers_cls[0], unmerged.layers_cls[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_dinov3_run_rebuilt_from_its_folder_gives_the_same_logits(kind, tiny_folder, tmp_path):
    run = tmp_path / "run"
    cfg = dinotune.build_config("classify", data=str(tiny_folder), **tiny_options(
        run, model="random:dinov3-tiny", image_size=32, adapter=kind, epochs=1, backbone_lr=1e-2, pool="last4",
        init_seed=3))
    trainer = make_trainer(cfg, run)
    trainer.fit()
    trained = trainer.model.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = trained(images=x)
        fresh = DinoBackbone.from_spec("random:dinov3-tiny", init_seed=3).eval()
        assert (trained.backbone(x).cls - fresh(x).cls).abs().max() > 1e-4  # training moved the backbone
        loaded = dinotune.load(run, checkpoint_name="last", merge=False)
        assert loaded.cfg.backbone.model == "random:dinov3-tiny" and loaded.cfg.backbone.init_seed == 3
        unmerged = loaded.model(images=x)
        merged = dinotune.load(run, checkpoint_name="last", merge=True).model(images=x)
    torch.testing.assert_close(unmerged, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-4)
