"""Round two, weights and caches a user did not write: YOLO weights and model YAMLs that run code
(R2-H1), official ``.pth`` files that declare more than they hold (R2-H5: stride-0 tensors, a
deflated zip entry), official files whose shapes make no model, a tampered feature cache, an export
``--out`` that is a link."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from hostile.common import FAST, case, classify_data, refused, run, run_capped, warned
from tests.conftest import make_coco_dataset
from tests.test_hostile_weights import official_dinov2, official_dinov3


def _payload(marker: Path) -> object:
    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))
    return Payload()


def _pca(tmp: Path, model: Path) -> list[str]:
    image = tmp / "a.png"
    Image.new("RGB", (28, 28), (200, 30, 30)).save(image)
    return ["pca", "--model", str(model), str(image), "--out", str(tmp / "pca.png"), "--image-size", "28",
            "--device", "cpu"]


# --------------------------------------------------------------------------- R2-H1: code from YOLO files
@case("R2-H1", "compare --yolo evil.pt whose unpickling runs code", hole=True)
def _(tmp: Path):
    marker = tmp / "PAYLOAD_RAN"
    evil = tmp / "evil.pt"
    torch.save({"model": _payload(marker), "train_args": {}}, evil)
    data = make_coco_dataset(tmp / "coco", {"val": [1, 1]})
    code, err = run_capped(["compare", "--data", str(data), "--yolo", str(evil), "--out", str(tmp / "cmp"),
                            "--device", "cpu"], timeout=300)
    ok, why = refused(code, err, str(evil))
    return ok and not marker.exists(), ("PAYLOAD RAN; " if marker.exists() else "") + why


@case("R2-H1", "compare --yolo evil.yaml whose activation is Python ultralytics would eval", hole=True)
def _(tmp: Path):
    import ultralytics

    marker = tmp / "YAML_RAN"
    source = Path(ultralytics.__file__).parent / "cfg" / "models" / "v8" / "yolov8.yaml"
    evil = tmp / "evil.yaml"
    evil.write_text(source.read_text() + f"\nactivation: \"open({str(marker)!r}, 'w').close() or nn.SiLU()\"\n")
    data = make_coco_dataset(tmp / "coco", {"val": [1, 1]})
    code, err = run_capped(["compare", "--data", str(data), "--yolo", str(evil), "--out", str(tmp / "cmp"),
                            "--device", "cpu", "--class-map", "0=red"], timeout=300)
    ok, why = refused(code, err, str(evil))
    return ok and not marker.exists(), ("PAYLOAD RAN; " if marker.exists() else "") + why


# -------------------------------------------------------- R2-H5: a small file declaring a huge model
@case("R2-H5", "7 KB official .pth of stride-0 tensors declaring a 16384-wide DINOv2", hole=True)
def _(tmp: Path):
    wide = tmp / "dinov2_wide.pth"
    torch.save(official_dinov2(dim=16384, depth=1, make=lambda *s: torch.zeros(1).expand(*s)), wide)
    code, err = run_capped(_pca(tmp, wide), cap_mb=1000, timeout=300)
    return refused(code, err, str(wide), "16384", "stores 1")


@case("R2-H5", "2 MB official .pth whose deflated zip entry unpacks to 2 GiB", hole=True)
def _(tmp: Path):
    small = tmp / "small.pth"
    torch.save({"extra": torch.zeros(1000), **official_dinov2()}, small)  # "extra": the first storage, data/0
    n = 1 << 29  # float32 values: 2 GiB
    bomb = tmp / "bomb.pth"
    with zipfile.ZipFile(small) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as out:
        for name in src.namelist():
            if name.endswith("/data.pkl"):  # "extra" and its storage: 1000 -> n values (BININT2 -> BININT)
                out.writestr(name, src.read(name).replace(b"M\xe8\x03", b"J" + n.to_bytes(4, "little")))
            elif name.endswith("/data/0"):
                with out.open(name, "w", force_zip64=True) as entry:  # 2 GiB: past the plain zip limit
                    zeros = bytes(1 << 26)
                    for _ in range(n * 4 // len(zeros)):
                        entry.write(zeros)
            else:
                out.writestr(name, src.read(name))
    code, err = run_capped(_pca(tmp, bomb), cap_mb=1000, timeout=300)
    ok, why = refused(code, err, str(bomb), "compressed")
    return ok, f"{bomb.stat().st_size // 1024} KB file: {why}"


# ------------------------------------------------------------- R2-wt-1: official files making no model
_ODD = {
    "no blocks.N keys": ({k.replace("blocks.", "layers."): v for k, v in official_dinov2().items()}, "no blocks.N"),
    "a 0 x 0 patch": (official_dinov2(patch=0), "patch_embed.proj.weight"),
    "width 0": (official_dinov2(dim=0), "cls_token"),
    "width 32, narrower than a head": (official_dinov2(dim=32), "width 32"),
    "DINOv3 MLP width 0": (official_dinov3(mlp=0), "blocks.0.mlp.fc1.weight"),
    "DINOv3 RoPE periods of 0 entries": (official_dinov3(periods=torch.zeros(0)), "rope_embed.periods"),
    "DINOv3 RoPE periods of 1000 entries": (official_dinov3(periods=torch.ones(1000)), "rope_embed.periods"),
}
for _name, (_sd, _needle) in _ODD.items():
    @case("R2-wt-1", f"official .pth with {_name}")
    def _(tmp: Path, _sd=_sd, _needle=_needle):
        path = tmp / "odd.pth"
        torch.save(_sd, path)
        return refused(*run(_pca(tmp, path)), str(path), _needle)


@case("R2-wt-2", "official .pth holding NaN weights")
def _(tmp: Path):
    path = tmp / "nan.pth"
    torch.save({**official_dinov2(), "norm.weight": torch.full((64,), float("nan"))}, path)
    return refused(*run(_pca(tmp, path)), str(path), "norm.weight", "NaN")


# ------------------------------------------------------------------- R2-wt-3: a tampered feature cache
def _tampered(kind: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    f, y = tensors["features"], tensors["labels"]
    return {"missing tensors": {"features": f},
            "labels out of range": {"features": f, "labels": y + 7},
            "wrong width": {"features": f[:, :-1].contiguous(), "labels": y},
            "fewer rows": {"features": f[:-1].contiguous(), "labels": y[:-1].contiguous()},
            "NaN features": {"features": torch.full_like(f, float("nan")), "labels": y}}[kind]


for _kind in ("truncated", "missing tensors", "labels out of range", "wrong width", "fewer rows", "NaN features"):
    @case("R2-wt-3", f"feature cache: {_kind}")
    def _(tmp: Path, _kind=_kind):
        data = classify_data(tmp)
        common = ["train", "classify", "--data", str(data), *FAST, "--adapter", "none", "--no-augment",
                  "--cache-features", "--cache-dir", str(tmp / "cache")]
        code, err = run([*common, "--out", str(tmp / "a")])
        assert code == 0, err
        path = next((tmp / "cache").glob("train-*.safetensors"))
        good = {k: v.clone() for k, v in load_file(str(path)).items()}
        if _kind == "truncated":
            path.write_bytes(path.read_bytes()[:100])
        else:
            save_file(_tampered(_kind, good), str(path))
        ok, why = warned(*run([*common, "--out", str(tmp / "b")]), path.name, "extracting the features again")
        again = load_file(str(path))
        fixed = torch.equal(again["labels"], good["labels"]) and torch.allclose(again["features"], good["features"])
        return ok and fixed, why + ("" if fixed else "; the cache was not rebuilt")


# ---------------------------------------------------------------------------- R2-wt-4: export --out LINK
@case("R2-wt-4", "export --format hf --out LINK (a symlink to a folder)")
def _(tmp: Path):
    target = tmp / "target"
    target.mkdir()
    (tmp / "link").symlink_to(target)
    run_dir = tmp / "no-run"  # refused before the run is read: nothing is loaded for minutes first
    return refused(*run(["export", str(run_dir), "--format", "hf", "--out", str(tmp / "link")]),
                   str(tmp / "link"), "symbolic link")
