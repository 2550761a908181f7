"""DINOv3 behind the one backbone interface: features, patch size 16, registers, random specs,
local folders, gated hub ids (401 / 403 without a trace), offline hints, `dinotune models`, and
weight decay on the learned tokens."""

from __future__ import annotations

import ast
import io
import time
import tokenize
from pathlib import Path

import pytest
import torch
from torch import nn

import dinotune
from dinotune.backbone import DinoBackbone, final_norm, load_backbone_model, patch_embedding
from dinotune.backbone import loading
from dinotune.backbone.registry import (
    DINOV3_ARCHS,
    HUB_FAMILIES,
    RANDOM_FAMILIES,
    RANDOM_SPECS,
    arch_config,
    model_choices_text,
)
from dinotune.cli import main
from dinotune.errors import BackboneLoadError, ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return DinoBackbone.from_spec("random:dinov3-tiny").eval()


# ------------------------------------------------------------------------------------- features
@pytest.mark.parametrize("h,w", [(16, 16), (32, 80), (48, 32)])
def test_any_multiple_of_16_square_or_not(tiny, h, w):
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        f = tiny(x, layers=3)
        tokens = tiny.model(pixel_values=x).last_hidden_state
    n = (h // 16) * (w // 16)
    assert tiny.family == "dinov3" and tiny.patch_size == 16 and tiny.num_register_tokens == 4
    assert tokens.shape == (2, 1 + 4 + n, 64)  # cls, 4 registers, patches
    assert f.grid == (h // 16, w // 16)
    torch.testing.assert_close(f.cls, tokens[:, 0])
    torch.testing.assert_close(f.patch_tokens, tokens[:, 5:])  # the registers are split off
    assert f.patch_map.shape == (2, 64, h // 16, w // 16)
    assert len(f.layers_cls) == 3 and len(f.layer_maps()) == 3


def test_sizes_not_multiple_of_16_refused(tiny):
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        tiny(torch.randn(1, 3, 28, 32))
    with pytest.raises(ConfigError, match="patch size 16; try 32 or 48"):
        tiny.check_image_size(40, "backbone.image_size")
    tiny.check_image_size(224)  # 224 = 14 * 16: the config default fits both families


def test_layers_pass_through_dinov3s_final_norm(tiny):
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        f = tiny(x, layers=[0, -1])
        out = tiny.model(pixel_values=x, output_hidden_states=True)
        embedded = tiny.model.embeddings(x)
    hidden = out.hidden_states
    assert len(hidden) == 1 + tiny.num_layers
    torch.testing.assert_close(hidden[0], embedded)  # hidden_states[0] is the embedding output
    torch.testing.assert_close(f.layers_cls[0], tiny.model.norm(hidden[1])[:, 0])
    torch.testing.assert_close(f.layers_patch[0], tiny.model.norm(hidden[1])[:, 5:])
    torch.testing.assert_close(f.layers_cls[1], f.cls)
    assert not torch.allclose(f.layers_cls[0], f.cls)
    assert final_norm(tiny.model) is tiny.model.norm


def test_patch_embedding_and_final_norm_of_both_families():
    from dinotune.adapters import apply_adapter
    from dinotune.config import AdapterConfig

    v2, v3 = DinoBackbone.from_spec("random:tiny"), DinoBackbone.from_spec("random:dinov3-tiny")
    assert patch_embedding(v2.model) is v2.model.embeddings.patch_embeddings.projection
    assert patch_embedding(v3.model) is v3.model.embeddings.patch_embeddings
    assert final_norm(v2.model) is v2.model.layernorm
    for b in (v2, v3):
        conv = b.patch_embedding()
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (b.patch_size, b.patch_size)
        apply_adapter(b, AdapterConfig(kind="lora"))  # still found through the PEFT wrapper
        assert b.patch_embedding() is conv and final_norm(b.model) is final_norm(b.hf_model())


# --------------------------------------------------------------------------------- random specs
def test_random_dinov3_specs_reproducible_and_isolated():
    before = torch.random.get_rng_state()
    a = load_backbone_model("random:dinov3-tiny", init_seed=5).state_dict()
    b = load_backbone_model("random:dinov3-tiny", init_seed=5).state_dict()
    c = load_backbone_model("random:dinov3-tiny", init_seed=6).state_dict()
    assert torch.equal(before, torch.random.get_rng_state())
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["model.layer.0.attention.q_proj.weight"], c["model.layer.0.attention.q_proj.weight"])
    assert not torch.equal(a["embeddings.register_tokens"], c["embeddings.register_tokens"])


def test_released_architectures():
    """The sizes of facebookresearch/dinov3 hub/backbones.py (timm's shapes: test_dinov3_parity)."""
    expect = {"small": (384, 12, 6, 1536, False), "small-plus": (384, 12, 6, 1536, True),
              "base": (768, 12, 12, 3072, False), "large": (1024, 24, 16, 4096, False),
              "huge-plus": (1280, 32, 20, 5120, True), "7b": (4096, 40, 32, 8192, True)}
    for size, (width, depth, heads, mlp, gated) in expect.items():
        cfg = arch_config(f"dinov3-{size}")
        got = (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size, cfg.use_gated_mlp)
        assert got == (width, depth, heads, mlp, gated), size
        assert cfg.patch_size == 16 and cfg.num_register_tokens == 4 and cfg.key_bias is False
        assert cfg.hidden_act == ("silu" if gated else "gelu") and cfg.rope_theta == 100.0
        assert cfg.query_bias is (size != "7b") and cfg.layer_norm_eps == 1e-5
    assert set(DINOV3_ARCHS) == set(expect) | {"tiny"}


def test_unknown_random_size_lists_both_families():
    with pytest.raises(BackboneLoadError, match="dinov3-huge") as e:
        load_backbone_model("random:dinov3-huge")
    for spec in ("random:tiny", "random:small-reg4", "random:dinov3-tiny", "random:dinov3-huge-plus", "random:dinov3-7b"):
        assert spec in str(e.value)


def test_local_dinov3_folder_loads_including_the_hubs_older_layout(tmp_path, tiny):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "dinov3"
    tiny.model.save_pretrained(folder)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = tiny(x).patch_tokens
        loaded = DinoBackbone.from_spec(str(folder)).eval()
        assert loaded.family == "dinov3" and not loaded.model.training
        torch.testing.assert_close(loaded(x).patch_tokens, expected, atol=0, rtol=0)
        # the hub's DINOv3 files were written before transformers 5 (blocks at ``layer.N``, not
        # ``model.layer.N``): transformers renames them on load
        weights = folder / "model.safetensors"
        old = {k.replace("model.layer.", "layer."): v for k, v in load_file(str(weights)).items()}
        assert any(k.startswith("layer.0.") for k in old)
        save_file(old, str(weights), metadata={"format": "pt"})
        torch.testing.assert_close(DinoBackbone.from_spec(str(folder)).eval()(x).patch_tokens, expected, atol=0, rtol=0)


# ------------------------------------------------------------------------------- the gated hub
GATED = "facebook/dinov3-vits16-pretrain-lvd1689m"


def _refuse_downloads(monkeypatch, tmp_path: Path, error: type, status: int) -> None:
    """The hub "answers" every file request of transformers with ``error`` (HTTP ``status``):
    transformers wraps it as it would a real answer."""
    import huggingface_hub.constants as hf_constants
    import transformers.utils.hub as transformers_hub
    from huggingface_hub.utils import httpx

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # nothing cached
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: True)

    def download(repo_id, filename, **_):
        url = f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
        raise error(f"{status} Client Error for url: {url}",
                    response=httpx.Response(status, request=httpx.Request("GET", url)))

    monkeypatch.setattr(transformers_hub, "hf_hub_download", download)


@pytest.mark.parametrize("status", [401, 403])
def test_gated_repo_says_how_to_get_access(monkeypatch, tmp_path, status):
    from huggingface_hub.errors import GatedRepoError

    _refuse_downloads(monkeypatch, tmp_path, GatedRepoError, status)
    with pytest.raises(BackboneLoadError) as e:
        load_backbone_model(GATED)
    msg = str(e.value)
    assert f"HTTP {status}" in msg and "gated" in msg
    assert f"https://huggingface.co/{GATED}" in msg and "licence" in msg
    assert "huggingface-cli login" in msg and "HF_TOKEN" in msg and "random:dinov3-" in msg


@pytest.mark.parametrize("error_name, expect", [("HfHubHTTPError", "refused"), ("RepositoryNotFoundError", "not found")])
def test_other_refusals_are_named(monkeypatch, tmp_path, error_name, expect):
    import huggingface_hub.errors as hf_errors

    _refuse_downloads(monkeypatch, tmp_path, getattr(hf_errors, error_name), 403)
    with pytest.raises(BackboneLoadError, match=expect) as e:
        load_backbone_model(GATED)
    assert "huggingface-cli login" in str(e.value)


def test_gated_repo_through_the_cli_is_one_line(monkeypatch, tmp_path, tiny_folder, capsys):
    from huggingface_hub.errors import GatedRepoError

    _refuse_downloads(monkeypatch, tmp_path, GatedRepoError, 401)
    code = main(["train", "classify", "--data", str(tiny_folder), "--model", GATED, "--out", str(tmp_path / "run"),
                 "--device", "cpu", "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and "huggingface-cli login" in err
    assert not (tmp_path / "run").exists()


def test_offline_dinov3_id_fails_fast_with_dinov3_hint(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout=3.0: False)
    t0 = time.monotonic()
    with pytest.raises(BackboneLoadError, match="cannot reach the Hugging Face hub") as e:
        load_backbone_model("facebook/dinov3-vitl16-pretrain-sat493m")
    assert time.monotonic() - t0 < 10
    assert "random:dinov3-{tiny|small|small-plus|base|large|huge-plus|7b}" in str(e.value)


# ------------------------------------------------------------------------ listing and help texts
def test_models_command_groups_by_family(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    positions = [out.index(title) for title in HUB_FAMILIES]
    assert positions == sorted(positions)
    for ids in HUB_FAMILIES.values():
        for h in ids:
            assert h in out
    for spec in RANDOM_SPECS:
        assert f"    {spec} " in out
    assert "patch 16" in out and "patch 14" in out and list(RANDOM_FAMILIES)[-1] == "DINOv3"


def test_help_texts_mention_dinov3(capsys):
    assert "facebook/dinov3-vit7b16-pretrain-sat493m" in model_choices_text()
    assert "random:dinov3-tiny" in model_choices_text()
    with pytest.raises(SystemExit):
        main(["train", "classify", "--help"])
    out = capsys.readouterr().out
    assert "dinov3" in out and "16 for DINOv3" in out


# --------------------------------------------------------------------------------- weight decay
def test_learned_tokens_are_not_decayed_in_full_fine_tuning():
    from dinotune.config import AdapterConfig, OptimConfig
    from dinotune.engine.optim import Phase, build_optimizer
    from dinotune.models.wrapper import BackboneHead

    backbone = DinoBackbone.from_spec("random:dinov3-tiny")
    model = BackboneHead(backbone, nn.Linear(64, 2))
    assert {"backbone.model.embeddings.cls_token", "backbone.model.embeddings.register_tokens",
            "backbone.model.embeddings.mask_token"} <= model.no_weight_decay()
    adapter = AdapterConfig(kind="full")
    phase = Phase(name="train", epochs=1, lr=1e-3, backbone_lr=1e-4, train_backbone=True)
    optimizer = build_optimizer(model, adapter, OptimConfig(weight_decay=0.05), phase)
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    emb = backbone.model.embeddings
    assert decay_of[id(emb.cls_token)] == 0.0 and decay_of[id(emb.register_tokens)] == 0.0
    assert decay_of[id(emb.patch_embeddings.weight)] == 0.05
    assert decay_of[id(backbone.model.model.layer[0].attention.q_proj.weight)] == 0.05
    assert id(emb.mask_token) not in decay_of  # never trained (masked pre-training only)


# ----------------------------------------------------------------------------- the patch size
def test_no_dinov3_patch_size_literal_outside_the_registry():
    """As 14 for DINOv2 (test_architecture): 16 is never written next to a patch size or stride
    outside ``backbone/registry.py`` (16 is a common number, so only such lines are checked)."""
    root = Path(dinotune.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path == root / "backbone" / "registry.py":
            continue
        lines = path.read_text().splitlines()
        for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
            if tok.type == tokenize.NUMBER and ast.literal_eval(tok.string) == 16:
                line = lines[tok.start[0] - 1].lower()
                if "patch" in line or "stride" in line:
                    found.append(f"{path.relative_to(root.parent)}:{tok.start[0]}")
    assert not found, found
