"""Backbone families (``dinotune.backbone.families``): each family finds its own blocks, embeddings,
patch convolution and final norm, plainly and under PEFT; DINOv2's position embeddings fixed for an
export size are transformers' interpolation and leave the model as it was; unknown types are refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dinotune.adapters import apply_adapter
from dinotune.backbone import DinoBackbone
from dinotune.backbone.families import DINOV2, DINOV3, FAMILIES, MODEL_TYPES, family_for
from dinotune.backbone.registry import RANDOM_FAMILIES
from dinotune.config import AdapterConfig
from dinotune.engine.optim import layer_id
from dinotune.errors import BackboneLoadError

pytestmark = pytest.mark.usefixtures("one_thread")

# family -> random specs of it (with and without registers for DINOv2)
SPECS = {DINOV2: ["random:tiny", "random:tiny-reg4"], DINOV3: ["random:dinov3-tiny"]}
ALL_SPECS = [(family, spec) for family, specs in SPECS.items() for spec in specs]


def _lora(spec: str) -> DinoBackbone:
    backbone = DinoBackbone.from_spec(spec)
    apply_adapter(backbone, AdapterConfig(kind="lora", rank=2, targets=["attention", "mlp"]))
    return backbone


def test_every_family_is_tested_and_model_types_are_unique():
    assert set(SPECS) == set(FAMILIES)
    assert len(MODEL_TYPES) == sum(len(f.model_types) for f in FAMILIES)
    for family in FAMILIES:
        assert family == family.name and str(family) == family.name and family_for(family.model_types[0]) is family


@pytest.mark.parametrize("family,spec", ALL_SPECS)
@pytest.mark.parametrize("peft", [False, True], ids=["plain", "lora"])
def test_block_matcher_finds_every_blocks_parameters(family, spec, peft):
    backbone = _lora(spec) if peft else DinoBackbone.from_spec(spec)
    assert backbone.family is family and family_for(backbone.model) is family
    names = [n for n, _ in backbone.named_parameters()]
    if peft:  # the names the optimizer sees under PEFT: base_model.model.<transformers name>
        assert all(n.startswith("model.base_model.model.") for n in names) and any("lora_A" in n for n in names)
    by_block: dict[int, set[str]] = {}
    for name in names:
        index = family.block_index(name)
        if index is not None:
            by_block.setdefault(index, set()).add(name)
    assert sorted(by_block) == list(range(backbone.num_layers))
    # each block's parameters are exactly those of the block module the family lists
    blocks = family.blocks(backbone)
    assert len(blocks) == backbone.num_layers
    for i, block in enumerate(blocks):
        assert len(by_block[i]) == len(list(block.parameters())), f"block {i}"
    # module names too (the block itself included), and nothing outside the blocks matches
    hf_names = dict(backbone.hf_model().named_modules())
    assert [family.block_index(n) for n, m in hf_names.items() if any(m is b for b in blocks)] == list(range(len(blocks)))
    outside = [n for n in names if family.block_index(n) is None]
    assert outside and all(family.in_embeddings(n) or "norm" in n for n in outside), outside
    assert any(family.in_embeddings(n) for n in names)


@pytest.mark.parametrize("family,spec", ALL_SPECS)
def test_layer_ids_follow_the_family(family, spec):
    backbone = _lora(spec)
    ids = {layer_id(n, backbone.num_layers, family) for n, _ in backbone.named_parameters()}
    assert ids == set(range(backbone.num_layers + 2))  # embeddings, every block, the final norm


@pytest.mark.parametrize("family,spec", ALL_SPECS)
def test_patch_embedding_and_final_norm_are_found_plainly_and_under_peft(family, spec):
    backbone = DinoBackbone.from_spec(spec)
    hf = backbone.hf_model()
    parent, attribute, conv = family.patch_embedding(backbone)
    assert isinstance(conv, nn.Conv2d) and getattr(parent, attribute) is conv
    assert conv.kernel_size == (backbone.patch_size,) * 2 and conv.in_channels == 3
    # the convolution transformers runs: the patch tokens change when it does
    x = torch.randn(1, 3, 2 * backbone.patch_size, 2 * backbone.patch_size)
    with torch.no_grad():
        before = hf(pixel_values=x).last_hidden_state
        conv.weight.add_(1.0)
        assert not torch.allclose(before, hf(pixel_values=x).last_hidden_state)
    norm = family.final_norm(hf)
    assert isinstance(norm, nn.LayerNorm)
    apply_adapter(backbone, AdapterConfig(kind="lora", rank=2))
    assert family.patch_embedding(backbone.model)[2] is conv and family.patch_embedding(hf)[2] is conv
    assert family.final_norm(backbone.model) is norm and backbone.patch_embedding() is conv


def test_no_decay_names_are_the_learned_tokens():
    v2, v3 = DinoBackbone.from_spec("random:tiny-reg4"), DinoBackbone.from_spec("random:dinov3-tiny")
    leaf = {n.rsplit(".", 1)[-1] for n in v2.no_weight_decay()}
    assert leaf == {"cls_token", "mask_token", "register_tokens", "position_embeddings"}
    assert {n.rsplit(".", 1)[-1] for n in v3.no_weight_decay()} == {"cls_token", "mask_token", "register_tokens"}


@pytest.mark.parametrize("wrap", ["backbone", "hf", "peft"])
def test_dinov2_fixed_position_embeddings_are_transformers_interpolation(wrap):
    backbone = DinoBackbone.from_spec("random:tiny")  # learned for 224 x 224 (16 x 16 patches)
    if wrap == "peft":
        apply_adapter(backbone, AdapterConfig(kind="lora", rank=2))
    target = {"backbone": backbone, "hf": backbone.hf_model(), "peft": backbone.model}[wrap]
    embeddings = backbone.hf_model().embeddings
    with torch.no_grad():
        embeddings.position_embeddings.normal_()  # a table that is not constant, so resampling shows
    h, w = 70, 42  # another grid (5 x 3), not square
    tokens = torch.zeros(1, 1 + 5 * 3, backbone.embed_dim)
    x, other = torch.randn(1, 3, h, w), torch.randn(1, 3, 28, 56)
    with torch.no_grad():
        expected = embeddings.interpolate_pos_encoding(tokens, h, w)
        out, out_other = backbone(x), backbone(other)
        with DINOV2.fixed_position_embeddings(target, h, w):
            fixed = embeddings.interpolate_pos_encoding(tokens, h, w)
            inside = backbone(x)
        after = backbone(other)
    assert expected.shape == (1, 16, 64) and not torch.allclose(expected[:, 1:], embeddings.position_embeddings[:, 1:16])
    torch.testing.assert_close(fixed, expected, rtol=0, atol=0)
    torch.testing.assert_close(inside.patch_tokens, out.patch_tokens, rtol=0, atol=0)
    # restored: the method is the class's again and other sizes interpolate as before
    assert "interpolate_pos_encoding" not in vars(embeddings)
    torch.testing.assert_close(after.patch_tokens, out_other.patch_tokens, rtol=0, atol=0)


def test_dinov3_position_fix_changes_nothing():
    backbone = DinoBackbone.from_spec("random:dinov3-tiny")
    x = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        out = backbone(x)
        with backbone.family.fixed_position_embeddings(backbone, 48, 80):
            inside = backbone(x)
    torch.testing.assert_close(inside.patch_tokens, out.patch_tokens, rtol=0, atol=0)


def test_classifier_classes_exist_in_transformers():
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    for family in FAMILIES:
        for model_type in family.model_types:
            found = family.classifier(model_type)
            theirs = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES.get(model_type)
            if found is None:  # DINOv3: transformers has none (a new release that adds one shows here)
                assert family is DINOV3 and theirs is None, (model_type, theirs)
                continue
            assert found.class_name == theirs
            cls = getattr(transformers, found.class_name)
            config = transformers.AutoConfig.for_model(model_type, hidden_size=32, num_hidden_layers=1,
                                                       num_attention_heads=2, image_size=28, patch_size=14)
            assert family_for(getattr(cls(config), found.base_attribute)) is family


def test_input_statistics_are_imagenets():
    for family in FAMILIES:
        assert family.mean == (0.485, 0.456, 0.406) and family.std == (0.229, 0.224, 0.225)


def test_family_for_accepts_types_configs_and_models_and_refuses_others():
    from transformers import ViTConfig, ViTModel

    backbone = DinoBackbone.from_spec("random:dinov3-tiny")
    for thing in ("dinov3_vit", backbone.config, backbone.hf_model(), backbone):
        assert family_for(thing) is DINOV3
    with pytest.raises(BackboneLoadError, match=r"'vit' model, not DINOv2 or DINOv3 \(model types DINOv2: dinov2, "
                                                r"dinov2_with_registers; DINOv3: dinov3_vit\)"):
        family_for("vit")
    tiny_vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(BackboneLoadError, match="'vit'"):
        DinoBackbone(tiny_vit)
    with pytest.raises(TypeError, match="model_type"):
        family_for(nn.Linear(2, 2))


def test_random_specs_are_grouped_by_their_family():
    for group, specs in RANDOM_FAMILIES.items():
        family = DINOV3 if group.startswith("DINOv3") else DINOV2
        for spec in specs[:1]:
            assert DinoBackbone.from_spec(spec).family is family
