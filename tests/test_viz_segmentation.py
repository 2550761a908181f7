"""Segmentation pictures (VOC palette, overlays, label PNGs, comparison figures) and the PCA of
patch features (joint fit, deterministic signs, foreground masking, run folders)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinotune
from dinotune.backbone.model import DinoBackbone
from dinotune.viz import pca as pca_mod
from dinotune.api import pca as pca_for
from dinotune.viz.pca import _fit_pca, pca_features, pca_figure
from dinotune.viz.segmentation import (
    IGNORE_COLOUR, colorize, comparison_figure, overlay, palette, save_mask_png,
)
from tests.conftest import tiny_options

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    if not path.is_file() or path.read_bytes()[:8] != PNG_MAGIC:
        return False
    with Image.open(path) as im:
        im.load()
    return not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # atomic: no leftovers


def _mask(h: int = 20, w: int = 30) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.int64)
    m[:, 10:20] = 1
    m[5:15, 20:] = 15
    m[:3, :3] = 255
    return m


def _photo(h: int = 20, w: int = 30, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------- segmentation
def test_palette_matches_voc():
    pal = palette(21)
    assert pal.shape == (256, 3) and pal.dtype == np.uint8
    assert tuple(pal[0]) == (0, 0, 0)
    assert tuple(pal[1]) == (128, 0, 0)
    assert tuple(pal[2]) == (0, 128, 0)
    assert tuple(pal[15]) == (192, 128, 128)
    assert tuple(pal[20]) == (0, 64, 128)
    assert tuple(pal[255]) == IGNORE_COLOUR
    assert tuple(palette(21, ignore_index=None)[255]) == (224, 224, 192)  # VOC's own void colour
    assert len({tuple(c) for c in pal[:21]}) == 21
    with pytest.raises(ValueError):
        palette(0)


def test_colorize_and_overlay():
    pal, m, img = palette(21), _mask(), _photo()
    col = colorize(m, pal)
    assert col.mode == "RGB" and col.size == (30, 20)
    assert np.array_equal(np.asarray(col), pal[m])
    ov = overlay(img, m, pal, alpha=0.5)
    assert ov.size == img.size and ov.mode == "RGB"
    a, b = np.asarray(ov).astype(int), np.asarray(img).astype(int)
    assert np.array_equal(a[m == 255], b[m == 255])  # ignore pixels unchanged
    expected = np.rint(0.5 * b + 0.5 * pal[m].astype(int))
    assert np.abs(a - expected)[m != 255].max() <= 1
    assert np.array_equal(np.asarray(overlay(img, m, pal, alpha=0.0)), np.asarray(img))
    # a mask of another resolution is resized (nearest) to the image
    small = overlay(img, m[::2, ::2], pal)
    assert small.size == img.size
    with pytest.raises(ValueError):
        colorize(np.full((4, 4), 300), pal)


def test_save_mask_png_round_trip(tmp_path):
    m = _mask()
    m[0, -1] = 7
    path = save_mask_png(m, tmp_path / "sub" / "mask.png", palette(21))
    assert _is_png(path)
    with Image.open(path) as im:
        assert im.mode == "P"
        assert np.array_equal(np.asarray(im), m.astype(np.uint8))
        assert im.getpalette()[:6] == [0, 0, 0, 128, 0, 0]


def test_comparison_figure(tmp_path):
    img, gt = _photo(40, 60), np.kron(_mask(), np.ones((2, 2), dtype=np.int64))
    pred = gt.copy()
    pred[20:, :] = 2
    names = [f"c{i}" for i in range(21)]
    assert _is_png(comparison_figure(img, gt, pred, names, tmp_path / "cmp.png"))
    assert _is_png(comparison_figure(img, None, pred[::2, ::2], names, tmp_path / "pred_only.png"))
    many = np.arange(40 * 60).reshape(40, 60) % 40  # 40 classes: the legend is capped
    assert _is_png(comparison_figure(img, many, many, [str(i) for i in range(40)], tmp_path / "many.png"))


# ------------------------------------------------------------------------------------------- PCA
@pytest.fixture(scope="module")
def backbone() -> DinoBackbone:
    return DinoBackbone.from_spec("random:tiny")


def _noise_images() -> list[Image.Image]:
    return [_photo(56, 84, seed=1), _photo(84, 84, seed=2)]


def _two_colours(h: int = 84, w: int = 84) -> np.ndarray:
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (230, 30, 30)
    a[:, w // 2:] = (20, 40, 200)
    return a


def test_pca_shapes_and_joint_scaling(backbone):
    maps = pca_features(backbone, _noise_images(), image_size=None)
    assert [m.shape for m in maps] == [(4, 6, 3), (6, 6, 3)]
    flat = np.concatenate([m.reshape(-1, 3) for m in maps])
    assert flat.min() >= 0 and flat.max() <= 1
    assert np.allclose(flat.min(axis=0), 0) and np.allclose(flat.max(axis=0), 1)  # joint, per component
    alone = pca_features(backbone, _noise_images()[:1], image_size=None)[0]
    assert alone.shape == (4, 6, 3) and not np.allclose(alone, maps[0], atol=1e-3)
    # image_size sets the short side, both sides rounded to multiples of 14
    assert [m.shape for m in pca_features(backbone, _noise_images(), image_size=56)] == [(4, 6, 3), (4, 4, 3)]
    assert pca_features(backbone, [_photo(50, 100)], image_size=28)[0].shape == (2, 4, 3)


def test_pca_signs_are_deterministic(backbone):
    a = pca_features(backbone, _noise_images(), image_size=None)
    b = pca_features(DinoBackbone.from_spec("random:tiny"), _noise_images(), image_size=None)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    x = torch.randn(50, 8, dtype=torch.float64)
    for data in (x, -x, x[:5]):  # covariance and SVD paths
        _, comps = _fit_pca(data, 3)
        pivot = comps.abs().argmax(dim=1)
        assert (comps.gather(1, pivot[:, None]) > 0).all()
    assert torch.allclose(_fit_pca(x, 3)[1], _fit_pca(-x, 3)[1])


def test_first_component_separates_two_flat_regions(backbone):
    m = pca_features(backbone, [Image.fromarray(_two_colours())], image_size=None)[0][..., 0]
    left, right = m[:, :3], m[:, 3:]
    assert left.max() < right.min() or right.max() < left.min()


def test_foreground_threshold_zeroes_background(backbone):
    a = np.zeros((84, 84, 3), np.uint8)
    a[:] = (20, 40, 200)
    a[14:70, 14:70] = (230, 200, 30)  # a 4 x 4-patch object in the middle of a 6 x 6 grid
    m = pca_features(backbone, [Image.fromarray(a)], image_size=None, foreground_threshold=0.5)[0]
    border = np.ones((6, 6), bool)
    border[1:-1, 1:-1] = False
    assert (m[border] == 0).all()
    assert np.allclose(m[~border].max(axis=0), 1)
    plain = pca_features(backbone, [Image.fromarray(a)], image_size=None)[0]
    assert (plain[border] > 0).any()


def test_pca_figure(backbone, tmp_path):
    images = _noise_images() + [Image.fromarray(_two_colours(70, 112))]
    maps = pca_features(backbone, images, image_size=None)
    path = pca_figure(images, maps, tmp_path / "pca.png", titles=["a", "b", "c"])
    assert _is_png(path)


def test_pca_for_spec_and_run(tiny_folder, tmp_path, monkeypatch):
    paths = []
    for i, img in enumerate(_noise_images()):
        paths.append(tmp_path / f"img{i}.png")
        img.save(paths[-1])
    out = pca_for("random:tiny", paths, tmp_path / "out" / "spec.png", image_size=56, device="cpu")
    assert out == tmp_path / "out" / "spec.png" and _is_png(out)

    result = dinotune.train(task="classify", data=str(tiny_folder),
                            **tiny_options(tmp_path / "run", adapter="lora", epochs=1))
    seen = {}
    real = pca_mod.pca_features

    def spy(backbone, images, image_size, **kw):
        seen["size"], seen["backbone"] = image_size, backbone
        return real(backbone, images, image_size, **kw)

    monkeypatch.setattr(pca_mod, "pca_features", spy)
    (tmp_path / "figs").mkdir()
    out = pca_for(result["run_dir"], paths, tmp_path / "figs", device="cpu")
    assert out == tmp_path / "figs" / "pca.png" and _is_png(out)
    assert seen["size"] == 28  # the run's image size
    assert isinstance(seen["backbone"], DinoBackbone)
    assert not any("lora_" in n for n, _ in seen["backbone"].named_parameters())  # adapter merged


def test_pca_for_a_folder_skips_broken_files_and_caps_images(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, img in enumerate(_noise_images() * 2):
        img.save(folder / ("sub" if i % 2 else ".") / f"img{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    seen = {}
    real = pca_mod.pca_features

    def spy(backbone, images, image_size, **kw):
        seen["n"] = len(images)
        return real(backbone, images, image_size, **kw)

    monkeypatch.setattr(pca_mod, "pca_features", spy)
    out = pca_for("random:tiny", [folder], tmp_path / "a.png", image_size=28, device="cpu", max_images=3)
    assert _is_png(out) and seen["n"] == 3
    printed = capsys.readouterr()
    assert "broken.jpg" in printed.err and "first 3 of 4" in printed.err
    with pytest.raises(ValueError, match="--max-images must be at least 1"):
        pca_for("random:tiny", [folder], tmp_path / "b.png", max_images=0)
