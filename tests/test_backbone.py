"""Backbone features: token bookkeeping, layer selection, maps, image sizes."""

from __future__ import annotations

import pytest
import torch

from dinotune.backbone import DinoBackbone, to_map


@pytest.fixture(scope="module")
def tiny():
    return DinoBackbone.from_spec("random:tiny").eval()


@pytest.mark.parametrize("h,w", [(14, 14), (28, 56), (70, 42), (224, 224)])
def test_any_multiple_of_14(tiny, h, w):
    with torch.no_grad():
        f = tiny(torch.randn(2, 3, h, w), layers=4)
    assert f.grid == (h // 14, w // 14)
    assert f.cls.shape == (2, 64)
    assert f.patch_tokens.shape == (2, (h // 14) * (w // 14), 64)
    assert f.patch_map.shape == (2, 64, h // 14, w // 14)
    assert len(f.layers_cls) == 4 and len(f.layer_maps()) == 4
    assert f.patch_mean.shape == (2, 64)


def test_rejects_sizes_not_multiple_of_14(tiny):
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        tiny(torch.randn(1, 3, 30, 28))


def test_layers_are_normed_and_ordered(tiny):
    x = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        f = tiny(x, layers=[0, -1])
        raw = tiny.model(pixel_values=x, output_hidden_states=True).hidden_states
    # intermediate layers pass through the final LayerNorm, as DINOv2's get_intermediate_layers(norm=True)
    torch.testing.assert_close(f.layers_cls[0], tiny.model.layernorm(raw[1])[:, 0])
    torch.testing.assert_close(f.layers_cls[1], f.cls)
    torch.testing.assert_close(f.layers_patch[1], f.patch_tokens)
    assert not torch.allclose(f.layers_cls[0], f.cls)
    assert tiny.resolve_layers(2) == [2, 3] and tiny.resolve_layers([0, -2]) == [0, 2]
    with pytest.raises(ValueError):
        tiny.resolve_layers(5)
    with pytest.raises(ValueError):
        tiny.resolve_layers([4])


def test_register_tokens_are_split_off():
    b = DinoBackbone.from_spec("random:small-reg4").eval()
    assert b.num_register_tokens == 4
    x = torch.randn(1, 3, 28, 42)
    with torch.no_grad():
        f = b(x)
        tokens = b.model(pixel_values=x).last_hidden_state
    assert tokens.shape[1] == 1 + 4 + 6
    torch.testing.assert_close(f.patch_tokens, tokens[:, 5:])
    torch.testing.assert_close(f.cls, tokens[:, 0])


def test_to_map_layout():
    tokens = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)  # B=2, N=2x3, C=3
    m = to_map(tokens, (2, 3))
    assert m.shape == (2, 3, 2, 3)
    # token n sits at row n // w, column n % w
    assert torch.equal(m[1, :, 1, 2], tokens[1, 5])
    assert torch.equal(m[0, :, 0, 1], tokens[0, 1])


def test_fingerprint_tracks_weights():
    a = DinoBackbone.from_spec("random:tiny", init_seed=0)
    b = DinoBackbone.from_spec("random:tiny", init_seed=0)
    c = DinoBackbone.from_spec("random:tiny", init_seed=1)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
