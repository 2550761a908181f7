"""Pretraining data: DINOv2's multi-crop views, their crop-major batches, and unlabelled image lists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinotune.data.bands import InputSpec
from dinotune.errors import DataError
from dinotune.tasks.pretrain.data import MultiCropDataset, collate_multicrop, list_images

G, LOC = 32, 16  # global / local crop sizes: small, and above the 9-pixel blur kernel


def _noise_picture(path: Path, seed: int, size: int = 40) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _constant_arrays(root: Path, values: list[float], bands: int = 5, size: int = 40) -> list[Path]:
    """One ``size x size x bands`` .npy per value: band ``c`` of array ``i`` holds ``values[i] + c``."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, v in enumerate(values):
        array = np.full((size, size, bands), v, np.float32) + np.arange(bands, dtype=np.float32)
        np.save(root / f"a{i}.npy", array)
        paths.append(root / f"a{i}.npy")
    return paths


def _band_spec(bands: int = 5) -> InputSpec:
    return InputSpec(bands, [0, 1, 2], [10.0 * (c + 1) for c in range(bands)], [2.0 + c for c in range(bands)],
                     arrays=True)


def test_collated_batch_is_crop_major(tmp_path):
    # constant band arrays keep their values through every crop, so each crop names its image
    spec = _band_spec()
    values = [100.0, 200.0, 300.0]
    ds = MultiCropDataset(_constant_arrays(tmp_path, values), spec, G, LOC, local_crops=4)
    batch = collate_multicrop([ds[i] for i in range(len(values))])
    B = len(values)
    assert set(batch) == {"global", "local"}
    assert batch["global"].shape == (2 * B, 5, G, G) and batch["local"].shape == (4 * B, 5, LOC, LOC)
    assert type(batch["global"]) is torch.Tensor

    def image_of(crop: torch.Tensor) -> int:  # band 0 back in file units, matched to its value
        return values.index(round(float(crop[0].mean()) * spec.std[0] + spec.mean[0]))

    assert [image_of(c) for c in batch["global"]] == [0, 1, 2, 0, 1, 2]  # the two global crops B apart
    assert [image_of(c) for c in batch["local"]] == [0, 1, 2] * 4


def test_pictures_give_three_channel_crops_and_no_local_crops(tmp_path):
    paths = [_noise_picture(tmp_path / f"p{i}.png", i) for i in range(2)]
    ds = MultiCropDataset(paths, InputSpec(), G, LOC, local_crops=0)
    item = ds[0]
    assert item["global"].shape == (2, 3, G, G) and item["global"].dtype == torch.float32
    assert item["local"].shape == (0, 3, LOC, LOC)
    batch = collate_multicrop([ds[0], ds[1]])
    assert batch["global"].shape == (4, 3, G, G) and batch["local"].shape == (0, 3, LOC, LOC)
    assert torch.isfinite(batch["global"]).all()


def test_band_arrays_are_normalised_with_the_spec_and_not_recoloured(tmp_path):
    spec = _band_spec()
    ds = MultiCropDataset(_constant_arrays(tmp_path, [1000.0]), spec, G, LOC, local_crops=2)
    torch.manual_seed(0)
    for _ in range(5):  # several draws: jitter or solarisation, were they applied, would show in some
        item = ds[0]
        for crops in (item["global"], item["local"]):
            assert crops.shape[1] == 5
            expected = torch.tensor([(1000.0 + c - spec.mean[c]) / spec.std[c] for c in range(5)])
            torch.testing.assert_close(crops, expected.view(1, 5, 1, 1).expand_as(crops), rtol=0, atol=1e-3)


def test_same_seed_same_crops(tmp_path):
    ds = MultiCropDataset([_noise_picture(tmp_path / "p.png", 0)], InputSpec(), G, LOC, local_crops=2)
    torch.manual_seed(3)
    first = ds[0]
    torch.manual_seed(3)
    again = ds[0]
    other = ds[0]
    for key in ("global", "local"):
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["global"], other["global"])


def test_unreadable_file_is_replaced(tmp_path, capsys):
    good = _noise_picture(tmp_path / "b.png", 0)
    bad = tmp_path / "a.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    ds = MultiCropDataset([bad, good], InputSpec(), G, LOC, local_crops=1)
    assert ds[0]["global"].shape == (2, 3, G, G)  # the bad file's slot is filled by the next image
    ds[0]
    assert capsys.readouterr().err.count("a.png") == 1  # reported once


def test_list_images_of_any_layout(tmp_path):
    tree = tmp_path / "tree"
    for cls in ("cat", "dog"):
        (tree / cls).mkdir(parents=True)
        _noise_picture(tree / cls / f"{cls}.png", 0)
    coco = tmp_path / "coco"
    (coco / "images").mkdir(parents=True)
    (coco / "annotations").mkdir()
    _noise_picture(coco / "images" / "x.jpg", 1)
    (coco / "annotations" / "instances.json").write_text(json.dumps({"images": [], "annotations": []}))
    assert list_images(tree) == [tree / "cat" / "cat.png", tree / "dog" / "dog.png"]
    assert list_images(coco) == [coco / "images" / "x.jpg"]
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\ntree/dog/dog.png,dog\ncoco/images/x.jpg,car\n")
    assert list_images(listing) == [coco / "images" / "x.jpg", tree / "dog" / "dog.png"]
    assert list_images(tree / "cat" / "cat.png") == [tree / "cat" / "cat.png"]


def test_list_images_refuses_a_folder_without_images(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no pictures here")
    with pytest.raises(DataError, match="empty"):
        list_images(tmp_path / "empty")
    with pytest.raises(DataError, match="not found"):
        list_images(tmp_path / "missing")
