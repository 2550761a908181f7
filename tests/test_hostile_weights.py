"""Weights and caches a user did not write: YOLO files that would run code, official ``.pth`` files
whose shapes the file does not hold (or that make no model), a tampered feature cache, an export
``--out`` that is a link.

The two holes run the command line under a memory cap (``main_capped``: in this process, its data
segment capped for the call), so an open hole fails its test instead of taking the machine; the YOLO
payload leaves a marker file if it ever runs.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import dinotune
from dinotune.backbone.loading import load_backbone_model
from dinotune.cli import main
from dinotune.errors import CheckpointError, CheckpointFormatError, ExportError
from tests.conftest import main_capped, make_coco_dataset, tiny_options

pytestmark = pytest.mark.usefixtures("one_thread")

_BLOCK = ("norm1.weight", "norm1.bias", "attn.proj.bias", "ls1.gamma", "norm2.weight", "norm2.bias", "mlp.fc2.bias",
          "ls2.gamma")


def official_dinov2(dim: int = 64, depth: int = 2, patch: int = 14, grid: int = 2, make=torch.zeros) -> dict:
    """An official-layout DINOv2 state dict of ``make(*shape)`` tensors (facebookresearch/dinov2 names)."""
    sd = {"cls_token": make(1, 1, dim), "pos_embed": make(1, 1 + grid * grid, dim), "mask_token": make(1, dim),
          "patch_embed.proj.weight": make(dim, 3, patch, patch), "patch_embed.proj.bias": make(dim),
          "norm.weight": make(dim), "norm.bias": make(dim)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + n: make(dim) for n in _BLOCK})
        sd.update({b + "attn.qkv.weight": make(3 * dim, dim), b + "attn.qkv.bias": make(3 * dim),
                   b + "attn.proj.weight": make(dim, dim), b + "mlp.fc1.weight": make(4 * dim, dim),
                   b + "mlp.fc1.bias": make(4 * dim), b + "mlp.fc2.weight": make(dim, 4 * dim)})
    return sd


def official_dinov3(dim: int = 64, heads: int = 4, mlp: int = 256, periods: torch.Tensor | None = None) -> dict:
    """An official-layout DINOv3 state dict (storage tokens, RoPE periods, masked key bias), 2 blocks."""
    head_dim = dim // heads
    sd = {"cls_token": torch.zeros(1, 1, dim), "storage_tokens": torch.zeros(1, 4, dim),
          "mask_token": torch.zeros(1, dim), "patch_embed.proj.weight": torch.zeros(dim, 3, 16, 16),
          "patch_embed.proj.bias": torch.zeros(dim), "norm.weight": torch.zeros(dim), "norm.bias": torch.zeros(dim),
          "rope_embed.periods": periods if periods is not None
          else 100.0 ** (2 * torch.arange(head_dim // 4) / (head_dim // 2))}
    for i in range(2):
        b = f"blocks.{i}."
        sd.update({b + n: torch.zeros(dim) for n in _BLOCK})
        sd.update({b + "attn.qkv.weight": torch.zeros(3 * dim, dim), b + "attn.qkv.bias": torch.zeros(3 * dim),
                   b + "attn.qkv.bias_mask": torch.ones(3 * dim), b + "attn.proj.weight": torch.zeros(dim, dim),
                   b + "mlp.fc1.weight": torch.zeros(mlp, dim), b + "mlp.fc1.bias": torch.zeros(mlp),
                   b + "mlp.fc2.weight": torch.zeros(dim, mlp)})
    return sd


def _refused(path: Path, *needles: str) -> str:
    with pytest.raises(CheckpointFormatError) as exc:
        load_backbone_model(str(path))
    message = str(exc.value)
    assert str(path) in message and "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


# ------------------------------------------------------------------------------------ the holes
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_yolo_weights_with_a_payload_never_run(tmp_path, capsys):
    pytest.importorskip("ultralytics")
    marker = tmp_path / "PAYLOAD_RAN"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Payload(marker), "train_args": {}}, evil)
    data = make_coco_dataset(tmp_path / "coco", {"val": [1, 1]})
    code, err = main_capped(["compare", "--data", str(data), "--yolo", str(evil), "--out", str(tmp_path / "cmp"),
                             "--device", "cpu"], capsys)
    assert not marker.exists(), "the payload in the .pt file ran"
    lines = [ln for ln in err.splitlines() if ln.startswith("dinotune: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert str(evil) in lines[0] and "safe mode" in lines[0]


def test_official_pth_of_expanded_tensors_builds_no_model(tmp_path, capsys):
    """3 KB on disk, a 16384-wide model declared: refused before any model is built (today's code
    allocates some 13 GB for it)."""
    wide = tmp_path / "dinov2_wide.pth"
    torch.save(official_dinov2(dim=16384, depth=1, make=lambda *s: torch.zeros(1).expand(*s)), wide)
    assert wide.stat().st_size < 20_000
    image = tmp_path / "a.png"
    Image.new("RGB", (28, 28), (200, 30, 30)).save(image)
    code, err = main_capped(["pca", "--model", str(wide), str(image), "--out", str(tmp_path / "pca.png"),
                             "--image-size", "28", "--device", "cpu"], capsys, cap_mb=1000)
    lines = [ln for ln in err.splitlines() if ln.startswith("dinotune: error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert str(wide) in lines[0] and "16384" in lines[0] and "stores 1" in lines[0]


# ------------------------------------------------------------------- YOLO files (in this process)
def test_yolo_model_yaml_with_a_payload_never_runs_and_saved_weights_still_load(tmp_path, monkeypatch):
    ultralytics = pytest.importorskip("ultralytics")
    from dinotune.tasks.detect.compare import open_yolo

    monkeypatch.chdir(tmp_path)  # ultralytics may write settings or downloads next to the cwd
    marker = tmp_path / "YAML_RAN"
    source = Path(ultralytics.__file__).parent / "cfg" / "models" / "v8" / "yolov8.yaml"
    evil = tmp_path / "evil.yaml"
    evil.write_text(source.read_text() + f"\nactivation: \"open({str(marker)!r}, 'w').close() or nn.SiLU()\"\n")
    with pytest.raises(CheckpointError) as exc:
        open_yolo(str(evil))
    assert not marker.exists(), "the model YAML's activation was evaluated"
    assert str(evil) in str(exc.value)
    saved = tmp_path / "mine.pt"
    open_yolo(str(source)).save(str(saved))  # what ultralytics writes: loads in its safe mode
    assert len(open_yolo(str(saved)).names) == 80


def test_without_a_safe_mode_a_local_yolo_file_is_refused(tmp_path, monkeypatch):
    pytest.importorskip("ultralytics")
    from ultralytics.nn import tasks

    from dinotune.tasks.detect.compare import open_yolo

    monkeypatch.setattr(tasks._SafeLoad, "SUPPORTED", False)  # as an older ultralytics or torch < 2.6
    weights = tmp_path / "best.pt"
    torch.save({"model": None}, weights)
    with pytest.raises(CheckpointError, match="cannot load a file without running code from it") as exc:
        open_yolo(str(weights))
    assert str(weights) in str(exc.value)


def test_yolo_weights_of_another_kind_are_refused_by_name(tmp_path):
    pytest.importorskip("ultralytics")
    from dinotune.tasks.detect.compare import open_yolo

    with pytest.raises(ValueError, match="model.onnx: expected ultralytics .pt weights or a model .yaml"):
        open_yolo(str(tmp_path / "model.onnx"))


# ------------------------------------------------------------------------ official .pth files
def test_declared_more_than_stored_is_refused(tmp_path):
    """Stride-0 tensors, and many tensors viewing one storage, declare values the file does not hold."""
    sd = official_dinov2()
    sd["blocks.1.mlp.fc1.weight"] = torch.zeros(1).expand(256, 64)
    torch.save(sd, tmp_path / "expanded.pth")
    _refused(tmp_path / "expanded.pth", "blocks.1.mlp.fc1.weight", "256 x 64", "stores 1 ")
    shared, base = official_dinov2(depth=8), torch.zeros(256 * 64 + 8)
    for i in range(8):  # eight overlapping windows of one storage
        shared[f"blocks.{i}.mlp.fc1.weight"] = base.as_strided((256, 64), (64, 1), i)
    torch.save(shared, tmp_path / "shared.pth")
    _refused(tmp_path / "shared.pth", "viewing one storage")


def test_compressed_archive_entries_are_refused_before_unpacking(tmp_path):
    """torch.load inflates a deflated entry in full: 20 KB could unpack to 20 MB (20 MB to 20 GB)."""
    plain = tmp_path / "plain.pth"
    torch.save({**official_dinov2(), "cls_token": torch.zeros(1, 1, 64), "big": torch.zeros(5_000_000)}, plain)
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w") as out:
        for name in src.namelist():
            out.writestr(zipfile.ZipInfo(name), src.read(name), compress_type=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < plain.stat().st_size // 100
    _refused(bomb, "is compressed", "never compresses")


def test_baseline_weights_with_a_compressed_entry_are_refused(tmp_path):
    """``--baseline-weights`` reads a torchvision state dict with the same archive check."""
    from dinotune.errors import DinotuneError
    from dinotune.tasks.detect.baseline import _read as read_weights_file

    plain, bomb = tmp_path / "plain.pth", tmp_path / "bomb.pth"
    torch.save({"big": torch.zeros(2_000_000)}, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w") as out:
        for name in src.namelist():
            out.writestr(zipfile.ZipInfo(name), src.read(name), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(DinotuneError, match="is compressed"):
        read_weights_file(str(bomb))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DinotuneError, match="cannot be read as a torch state dict"):
        read_weights_file(str(tmp_path / "junk.pth"))


@pytest.mark.parametrize("name, sd, needles", [
    ("no-blocks", {k.replace("blocks.", "layers."): v for k, v in official_dinov2().items()},
     ["no blocks.N.* tensors"]),
    ("a-gap", {k: v for k, v in official_dinov2(depth=3).items() if not k.startswith("blocks.1.")},
     ["no blocks.1.* tensors"]),
    ("patch-0", official_dinov2(patch=0), ["patch_embed.proj.weight", "64 x 3 x 0 x 0"]),
    ("width-0", official_dinov2(dim=0), ["cls_token", "1 x 1 x 0"]),
    ("width-32", official_dinov2(dim=32), ["width 32", "64-dim heads"]),
    ("no-grid", official_dinov2(grid=0), ["pos_embed holds 0 patch positions"]),
    ("scalar-cls", {**official_dinov2(), "cls_token": torch.zeros(())}, ["cls_token", "a single value"]),
    ("mask-5", {**official_dinov2(), "mask_token": torch.zeros(1, 5)}, ["do not fit together"]),
    ("qkv-narrow", {**official_dinov2(), "blocks.1.attn.qkv.weight": torch.zeros(192, 32)},
     ["size mismatch", "q_proj"]),
    ("nan", {**official_dinov2(), "norm.weight": torch.full((64,), float("nan"))}, ["norm.weight", "NaN"]),
    ("v3-periods-0", official_dinov3(periods=torch.zeros(0)), ["rope_embed.periods is empty"]),
    ("v3-periods-1000", official_dinov3(periods=torch.ones(1000)), ["1000 values", "width of 64"]),
    ("v3-mlp-0", official_dinov3(mlp=0), ["blocks.0.mlp.fc1.weight", "a width of 0"]),
    ("v3-width-0", official_dinov3(dim=0, heads=1, periods=torch.ones(1)), ["cls_token", "1 x 1 x 0"]),
])
def test_official_pth_that_makes_no_model_is_one_line(tmp_path, name, sd, needles):
    path = tmp_path / f"{name}.pth"
    torch.save(sd, path)
    _refused(path, *needles)


def test_good_official_files_still_load(tmp_path):
    torch.save(official_dinov2(), tmp_path / "v2.pth")
    torch.save(official_dinov3(), tmp_path / "v3.pth")
    assert load_backbone_model(str(tmp_path / "v2.pth")).config.hidden_size == 64
    assert load_backbone_model(str(tmp_path / "v3.pth")).config.num_attention_heads == 4


def test_cli_names_the_file_in_one_line(tmp_path, capsys):
    path = tmp_path / "periods.pth"
    torch.save(official_dinov3(periods=torch.zeros(0)), path)
    image = tmp_path / "a.png"
    Image.new("RGB", (28, 28)).save(image)
    assert main(["pca", "--model", str(path), str(image), "--out", str(tmp_path / "p.png"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("dinotune: error:") == 1 and "Traceback" not in err and str(path) in err


# ------------------------------------------------------------------------------ feature cache
def _tamper(kind: str, tensors: dict) -> dict:
    f, y = tensors["features"], tensors["labels"]
    return {
        "missing": {"features": f},
        "labels": {"features": f, "labels": y + 7},
        "negative": {"features": f, "labels": y - 5},
        "width": {"features": f[:, :-1].contiguous(), "labels": y},
        "rows": {"features": f[:-1].contiguous(), "labels": y[:-1].contiguous()},
        "nan": {"features": f.clone().fill_(float("nan")), "labels": y},
        "dtype": {"features": f.double(), "labels": y},
    }[kind]


def test_check_cache_says_what_does_not_fit():
    from dinotune.tasks.classify.probe import check_cache

    good = {"features": torch.randn(6, 128), "labels": torch.tensor([0, 1, 0, 1, 0, 1])}
    assert check_cache(good, 6, 128, {0, 1}) is None
    expect = {"missing": "not features and labels", "labels": "labels 7, 8", "negative": "labels -5, -4",
              "width": "127 wide, the model gives 128", "rows": "for a dataset of 6 images",
              "nan": "NaN", "dtype": "float64"}
    for kind, needle in expect.items():
        why = check_cache(_tamper(kind, good), 6, 128, {0, 1})
        assert why is not None and needle in why, (kind, why)


@pytest.mark.parametrize("kind", ["truncated", "labels", "nan"])
def test_a_tampered_cache_is_rebuilt_with_one_warning(tiny_folder, tmp_path, capsys, kind):
    opts = dict(adapter="none", epochs=1, augment=False, cache_features=True, cache_dir=str(tmp_path / "cache"))
    dinotune.train(task="classify", data=str(tiny_folder), **tiny_options(tmp_path / "a", **opts))
    path = next((tmp_path / "cache").glob("train-*.safetensors"))
    good = {k: v.clone() for k, v in load_file(str(path)).items()}  # not a view of the file changed below
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        save_file(_tamper(kind, good), str(path))
    capsys.readouterr()
    dinotune.train(task="classify", data=str(tiny_folder), **tiny_options(tmp_path / "b", **opts))
    err = capsys.readouterr().err
    warnings = [ln for ln in err.splitlines() if str(path) in ln and "extracting the features again" in ln]
    assert len(warnings) == 1, err
    rebuilt = load_file(str(path))
    assert torch.equal(rebuilt["labels"], good["labels"]) and torch.allclose(rebuilt["features"], good["features"])
    history = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(h["train/loss"])) for h in history)


# ------------------------------------------------------------------------------------- export
def test_export_out_that_is_a_link_is_refused_before_loading(tmp_path, capsys):
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(ExportError, match="symbolic link"):  # the run does not exist: nothing was loaded
        dinotune.export(tmp_path / "no-run", link, format="hf")
    assert main(["export", str(tmp_path / "no-run"), "--format", "hf", "--out", str(link)]) == 2
    err = capsys.readouterr().err
    assert err.count("dinotune: error:") == 1 and str(link) in err and "symbolic link" in err
    assert link.is_symlink() and not any(target.iterdir())
