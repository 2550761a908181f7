"""Parity of the official DINOv2 ``.pth`` converter against an independent implementation: timm.

timm loads official facebookresearch/dinov2 checkpoints through ``checkpoint_filter_fn`` ->
``_convert_dinov2`` (timm/models/vision_transformer.py). Here that mapping is run backwards: a
randomly initialised timm DINOv2 model is re-keyed into the OFFICIAL torch-hub layout, saved as a
``.pth``, loaded by ``dinotune`` (official -> Hugging Face), and the final normed tokens of both
models are compared. Every tensor is randomised (LayerScale gammas, norms, biases included), so a
missing, transposed or misordered tensor changes the output far beyond the tolerance.

The position-embedding grid equals the input grid everywhere, so neither side interpolates.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

timm = pytest.importorskip("timm")
from timm.layers import SwiGLUPacked  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from dinotune.backbone import BackboneLoadError, DinoBackbone, load_dinov2  # noqa: E402
from dinotune.backbone.convert import CheckpointFormatError, load_official_checkpoint  # noqa: E402
from dinotune.backbone.registry import RANDOM_SPECS  # noqa: E402
from tests.conftest import randomize_parameters  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

IMG = 98  # 7 x 7 patches of 14 px: small, and the timm pos_embed grid equals the input grid
ATOL = 1e-4


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _timm_to_official(tsd: dict[str, Tensor], swiglu: bool, seed: int = 123) -> dict[str, Tensor]:
    """Invert timm's ``_convert_dinov2``: timm VisionTransformer keys -> official dinov2 keys.

    timm -> official differences:
    * official ``mask_token`` (1, C) has no timm counterpart (timm drops it): added as zeros.
    * SwiGLU: official ``mlp.w12`` / ``mlp.w3`` are timm's ``mlp.fc1`` / ``mlp.fc2`` (packed
      SwiGLU, first half of ``w12`` is the SiLU-gated half in both: ``silu(x1) * x2``).
    * registers: timm's reg models are ``no_embed_class``: ``pos_embed`` covers only patches and
      the position embedding of the class token is folded into ``cls_token``
      (timm: ``cls_token = cls + pos_embed[:, 0]``, ``pos_embed = pos_embed[:, 1:]``). Official
      DINOv2 adds ``pos_embed`` to ``[cls, patches]`` and then inserts the registers after cls
      without position embedding; timm concatenates ``[cls, reg, patches + pos]``. Both give
      ``[cls + p0, reg, patches + pos]``, so the layouts are equivalent: any ``p0`` works, we pick a
      random one and store ``cls_token = timm_cls - p0`` so a converter that forgot to add
      ``pos_embed[:, 0]`` to the class token would be caught.
    Every timm key must be consumed, so nothing silently stays unconverted.
    """
    tsd = dict(tsd)
    out: dict[str, Tensor] = {}
    dim = tsd["cls_token"].shape[-1]
    if "reg_token" in tsd:
        p0 = torch.randn(1, 1, dim, generator=torch.Generator().manual_seed(seed)) * 0.5
        out["register_tokens"] = tsd.pop("reg_token").clone()
        out["cls_token"] = tsd.pop("cls_token") - p0
        out["pos_embed"] = torch.cat([p0, tsd.pop("pos_embed")], dim=1)
    else:
        out["cls_token"] = tsd.pop("cls_token").clone()
        out["pos_embed"] = tsd.pop("pos_embed").clone()
    out["mask_token"] = torch.zeros(1, dim)
    for k in list(tsd):
        if k.startswith(("patch_embed.proj.", "norm.", "blocks.")):
            new = k
            if swiglu:
                new = new.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
            out[new] = tsd.pop(k).clone()
    assert not tsd, f"timm tensors left unmapped: {sorted(tsd)}"
    return out


def _timm_dinov2(name: str, seed: int) -> nn.Module:
    model = timm.create_model(name, pretrained=False, img_size=IMG, num_classes=0)
    randomize_parameters(model, seed)
    return model.eval()


def _tiny_swiglu_vit(seed: int, embed_dim: int = 64, depth: int = 2) -> nn.Module:
    """A tiny ViT configured like timm's ``vit_giant_patch14_dinov2`` (packed SwiGLU, SiLU).

    timm's giant uses ``mlp_ratio=2.66667 * 2``: for 1536 that yields int(1536 * 5.33334) = 8192 =
    2 * 4096, i.e. exactly DINOv2's ``(int(dim * 4 * 2 / 3) + 7) // 8 * 8`` doubled (packed w12).
    For small dims the two formulas disagree (64 * 5.33334 -> 341: odd, GluMlp even asserts it is
    even; DINOv2 gives (170 + 7) // 8 * 8 = 176 -> 352 packed), so the ratio is set so that
    ``int(dim * mlp_ratio)`` equals 2 * DINOv2's width exactly.
    """
    hidden = (int(embed_dim * 4 * 2 / 3) + 7) // 8 * 8
    model = VisionTransformer(
        img_size=IMG,
        patch_size=14,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // 64,  # official DINOv2: 64-dim heads; the converter infers dim // 64
        init_values=1e-5,
        mlp_ratio=2 * hidden / embed_dim,
        mlp_layer=SwiGLUPacked,
        act_layer=nn.SiLU,
        num_classes=0,
    )
    assert model.blocks[0].mlp.fc1.out_features == 2 * hidden
    randomize_parameters(model, seed)
    return model.eval()


def _save(tmp_path, sd: dict[str, Tensor], name: str = "dinov2.pth"):
    path = tmp_path / name
    torch.save(sd, path)
    return path


def _pixels(seed: int = 7, batch: int = 2) -> Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _check_parity(tmp_path, timm_model: nn.Module, swiglu: bool, n_reg: int) -> None:
    official = _timm_to_official(timm_model.state_dict(), swiglu=swiglu)
    path = _save(tmp_path, official)
    x = _pixels()
    with torch.no_grad():
        ref = timm_model.forward_features(x)  # [cls, regs, patches], after the final norm
        bb = DinoBackbone.from_spec(str(path))  # = DinoBackbone(load_dinov2(path))
        hf = bb.model
        got = hf(pixel_values=x).last_hidden_state
        feats = bb(x)

    n_patch = (IMG // 14) ** 2
    assert ref.shape == (2, 1 + n_reg + n_patch, timm_model.embed_dim)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < ATOL, (got - ref).abs().max().item()
    # a non-trivial model: tokens differ from each other and from the input-independent part
    assert ref[:, 0].std() > 0.1 and (ref[0] - ref[1]).abs().max() > 0.1

    assert hf.config.num_hidden_layers == len(timm_model.blocks)
    assert hf.config.hidden_size == timm_model.embed_dim
    assert hf.config.use_swiglu_ffn is swiglu
    assert (getattr(hf.config, "num_register_tokens", 0) or 0) == n_reg

    # the DinoBackbone features: the cls / patch split must skip the registers
    assert feats.grid == (IMG // 14, IMG // 14)
    torch.testing.assert_close(feats.cls, ref[:, 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(feats.patch_tokens, ref[:, 1 + n_reg :], atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------
# 1-3: parity with timm
# --------------------------------------------------------------------------------------------


def test_small_matches_timm(tmp_path):
    _check_parity(tmp_path, _timm_dinov2("vit_small_patch14_dinov2", seed=1), swiglu=False, n_reg=0)


def test_small_reg4_matches_timm(tmp_path):
    model = _timm_dinov2("vit_small_patch14_reg4_dinov2", seed=2)
    assert model.no_embed_class and model.num_reg_tokens == 4
    _check_parity(tmp_path, model, swiglu=False, n_reg=4)


def test_swiglu_giant_layout_matches_timm(tmp_path):
    model = _tiny_swiglu_vit(seed=3)
    _check_parity(tmp_path, model, swiglu=True, n_reg=0)
    hf = load_dinov2(str(tmp_path / "dinov2.pth"))  # the plain loader, without DinoBackbone
    assert hf.encoder.layer[0].mlp.gate_proj.out_features == 176  # DINOv2's SwiGLU width for 64
    x = _pixels(seed=8)
    with torch.no_grad():
        torch.testing.assert_close(
            hf(pixel_values=x).last_hidden_state, model.forward_features(x), atol=ATOL, rtol=0
        )


def test_swiglu_reg4_with_two_heads_matches_timm(tmp_path):
    """Two 64-dim heads catch a q/k/v split or a head split done in the wrong order."""
    model = VisionTransformer(
        img_size=IMG, patch_size=14, embed_dim=128, depth=2, num_heads=2, init_values=1e-5,
        mlp_ratio=2 * ((int(128 * 4 * 2 / 3) + 7) // 8 * 8) / 128, mlp_layer=SwiGLUPacked,
        act_layer=nn.SiLU, num_classes=0, reg_tokens=4, no_embed_class=True,
    )
    randomize_parameters(model, seed=4)
    _check_parity(tmp_path, model.eval(), swiglu=True, n_reg=4)


# --------------------------------------------------------------------------------------------
# 4: checkpoint layouts and error handling
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_official() -> dict[str, Tensor]:
    """A 4-block, 128-wide (2 heads) official-layout state dict from a random timm ViT."""
    model = VisionTransformer(
        img_size=IMG, patch_size=14, embed_dim=128, depth=4, num_heads=2, init_values=1e-5,
        num_classes=0,
    )
    randomize_parameters(model, seed=5)
    return _timm_to_official(model.eval().state_dict(), swiglu=False)


def test_block_chunks_layout_loads_identically(tmp_path, small_official):
    # official block_chunks=2 for depth 4: chunk c holds its blocks under their GLOBAL index
    # (earlier positions are Identity placeholders): blocks.0.0, blocks.0.1, blocks.1.2, blocks.1.3
    chunked = {}
    for k, v in small_official.items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 2}.{k.split('.', 1)[1]}"
        chunked[k] = v
    assert "blocks.1.3.attn.qkv.weight" in chunked
    plain = load_dinov2(str(_save(tmp_path, small_official, "plain.pth")))
    chunk = load_dinov2(str(_save(tmp_path, chunked, "chunked.pth")))
    assert chunk.config.num_hidden_layers == 4
    sd_p, sd_c = plain.state_dict(), chunk.state_dict()
    assert sd_p.keys() == sd_c.keys()
    for k in sd_p:
        assert torch.equal(sd_p[k], sd_c[k]), k
    x = _pixels(batch=1)
    with torch.no_grad():
        assert torch.equal(plain(pixel_values=x).last_hidden_state, chunk(pixel_values=x).last_hidden_state)


def test_wrapped_training_checkpoint_loads(tmp_path, small_official):
    """A training checkpoint ({"teacher": {"backbone.*": ...}}) holds the same weights."""
    wrapped = {"teacher": {f"backbone.{k}": v for k, v in small_official.items()}, "iteration": 5}
    wrapped["teacher"]["dino_head.mlp.0.weight"] = torch.zeros(3, 3)
    plain = load_dinov2(str(_save(tmp_path, small_official, "plain.pth")))
    teacher = load_dinov2(str(_save(tmp_path, wrapped, "teacher.pth")))
    for k, v in plain.state_dict().items():
        assert torch.equal(v, teacher.state_dict()[k]), k


def test_not_a_dinov2_state_dict(tmp_path):
    path = _save(tmp_path, {"foo": torch.zeros(3)}, "foo.pth")
    with pytest.raises(CheckpointFormatError, match="not an official DINOv2 checkpoint") as exc:
        load_dinov2(str(path))
    assert str(path) in str(exc.value)
    with pytest.raises(CheckpointFormatError) as exc:
        load_official_checkpoint(path)
    assert str(path) in str(exc.value)


def test_non_dict_checkpoint(tmp_path):
    path = _save(tmp_path, [torch.zeros(3)], "list.pth")
    with pytest.raises(CheckpointFormatError, match="not a state dict") as exc:
        load_dinov2(str(path))
    assert str(path) in str(exc.value)


def test_missing_tensor_names_file(tmp_path, small_official):
    broken = {k: v for k, v in small_official.items() if k != "blocks.2.attn.proj.weight"}
    path = _save(tmp_path, broken, "broken.pth")
    with pytest.raises(CheckpointFormatError, match="blocks.2.attn.proj.weight") as exc:
        load_dinov2(str(path))
    assert str(path) in str(exc.value)


@pytest.mark.parametrize(
    "case, match",
    [
        ("non_square_grid", "not a square grid"),
        ("swiglu_width", "SwiGLU width"),
        ("mlp_size_mismatch", "size mismatch"),
    ],
)
def test_shape_problems_name_file(tmp_path, small_official, case, match):
    sd = dict(small_official)
    if case == "non_square_grid":
        sd["pos_embed"] = sd["pos_embed"][:, :-1]
    elif case == "swiglu_width":  # a packed w12 whose half-width is not DINOv2's formula
        for i in range(4):
            del sd[f"blocks.{i}.mlp.fc1.weight"], sd[f"blocks.{i}.mlp.fc1.bias"]
            del sd[f"blocks.{i}.mlp.fc2.weight"], sd[f"blocks.{i}.mlp.fc2.bias"]
            sd[f"blocks.{i}.mlp.w12.weight"] = torch.zeros(400, 128)
    else:  # mlp_ratio 2 instead of DINOv2's 4
        for i in range(4):
            sd[f"blocks.{i}.mlp.fc1.weight"] = sd[f"blocks.{i}.mlp.fc1.weight"][:256]
            sd[f"blocks.{i}.mlp.fc1.bias"] = sd[f"blocks.{i}.mlp.fc1.bias"][:256]
            sd[f"blocks.{i}.mlp.fc2.weight"] = sd[f"blocks.{i}.mlp.fc2.weight"][:, :256]
    path = _save(tmp_path, sd, f"{case}.pth")
    with pytest.raises(CheckpointFormatError, match=match) as exc:
        load_dinov2(str(path))
    assert str(path) in str(exc.value)


def test_missing_pth_path(tmp_path):
    path = tmp_path / "nope" / "dinov2_vits14_pretrain.pth"
    with pytest.raises(BackboneLoadError, match="not found") as exc:
        load_dinov2(str(path))
    assert str(path) in str(exc.value)


def test_garbage_pth_file(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"this is not a torch checkpoint\x00\x01\x02" * 10)
    with pytest.raises(CheckpointFormatError, match="cannot be read") as exc:
        load_dinov2(str(path))
    assert str(path) in str(exc.value)
    with pytest.raises(CheckpointFormatError) as exc:
        load_official_checkpoint(str(path))
    assert str(path) in str(exc.value)


# --------------------------------------------------------------------------------------------
# 5: random: specs
# --------------------------------------------------------------------------------------------


def test_random_tiny_architecture():
    m = load_dinov2("random:tiny")
    assert m.config.model_type == "dinov2"
    assert (m.config.hidden_size, m.config.num_hidden_layers, m.config.num_attention_heads) == (64, 4, 4)
    assert len(m.encoder.layer) == 4
    assert m.embeddings.cls_token.shape == (1, 1, 64)
    assert not hasattr(m.embeddings, "register_tokens")
    assert not m.training


def test_random_small_reg4_architecture():
    m = load_dinov2("random:small-reg4")
    assert m.config.model_type == "dinov2_with_registers"
    assert (m.config.hidden_size, m.config.num_hidden_layers, m.config.num_attention_heads) == (384, 12, 6)
    assert m.config.num_register_tokens == 4
    assert m.embeddings.register_tokens.shape == (1, 4, 384)
    bb = DinoBackbone(m)
    assert bb.num_register_tokens == 4
    f = bb(torch.zeros(1, 3, 28, 42))
    assert f.patch_tokens.shape == (1, 6, 384) and f.grid == (2, 3)


def test_random_seed_reproducible_and_isolated():
    before = torch.random.get_rng_state()
    a = load_dinov2("random:tiny", init_seed=11).state_dict()
    b = load_dinov2("random:tiny", init_seed=11).state_dict()
    c = load_dinov2("random:tiny", init_seed=12).state_dict()
    assert torch.equal(before, torch.random.get_rng_state())  # the global RNG is left alone
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    w = "encoder.layer.0.attention.q_proj.weight"
    assert not torch.equal(a[w], c[w])
    assert not torch.equal(a["embeddings.patch_embeddings.projection.weight"],
                           c["embeddings.patch_embeddings.projection.weight"])


def test_unknown_random_size_lists_choices():
    with pytest.raises(BackboneLoadError, match="huge") as exc:
        load_dinov2("random:huge")
    for spec in RANDOM_SPECS:
        assert spec in str(exc.value)


def test_unknown_spec_lists_choices():
    with pytest.raises(BackboneLoadError, match="not a model") as exc:
        load_dinov2("not a model")
    msg = str(exc.value)
    assert "facebook/dinov2-small" in msg and ".pth" in msg and "random:tiny" in msg
