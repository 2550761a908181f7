"""N-band input: readers (.npy, multi-band TIFF), refusals, band statistics, the widened patch
embedding (pretrained RGB function kept, trainable under LoRA, saved and restored), augmentation,
pictures, and runs end to end (classification on real Sentinel-2 tiles, detection and segmentation
on .npy images, the satellite recipe in configs/)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from safetensors.torch import load_file
from torchvision import tv_tensors

import dinotune
from dinotune.adapters import apply_adapter, trainable_backbone_parameters
from dinotune.backbone.channels import (
    INPUT_EMBEDDING_WEIGHTS,
    adapt_input,
    patch_embedding,
    widen_patch_embedding,
)
from dinotune.backbone.model import DinoBackbone
from dinotune.config import AdapterConfig, ConfigError, build_config
from dinotune.data.arrays import band_header, read_bands
from dinotune.data.bands import (
    IMAGENET_MEAN,
    InputSpec,
    band_statistics,
    check_band_counts,
    read_input,
    stretch_to_rgb,
)
from dinotune.data.images import check_image, header_size
from dinotune.data.transforms import RandomQuarterTurn, classify_eval_transform
from dinotune.errors import DataError
from dinotune.tasks.classify.data import build_classification_data
from tests.conftest import make_class_folders, make_segmentation_folders, shared_data, tiny_options

ROOT = Path(__file__).resolve().parents[1]


def band_tile(label: int, seed: int, size: int = 28, bands: int = 5) -> np.ndarray:
    """``H x W x C`` uint16 'reflectance': class ``label`` is bright in band ``label + 3`` (a band
    outside R, G, B: only a model that reads the extra bands can tell the classes apart)."""
    rng = np.random.default_rng(seed)
    tile = rng.integers(800, 1200, (size, size, bands)).astype(np.uint16)
    tile[..., (label + 3) % bands] += 2000
    return tile


def make_band_folders(root: Path, n: int = 6, bands: int = 5, fmt: str = "npy", layout: str = "hwc",
                      size: int = 28, classes: tuple[str, ...] = ("crop", "water")) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            tile = band_tile(c, 100 * c + i, size, bands)
            if layout == "chw":
                tile = np.moveaxis(tile, 2, 0)
            path = root / name / f"{name}_{i}.{fmt}"
            if fmt == "npy":
                np.save(path, tile)
            else:
                tifffile.imwrite(path, tile, photometric="minisblack", planarconfig="separate" if layout == "chw" else "contig")
    return root


# ------------------------------------------------------------------------------------ readers
def test_npy_and_tiff_layouts_are_detected_forced_and_read_alike(tmp_path):
    tile = band_tile(0, 1, size=20, bands=6)
    np.save(tmp_path / "hwc.npy", tile)
    np.save(tmp_path / "chw.npy", np.moveaxis(tile, 2, 0))
    # GeoTIFF's two ways: samples per pixel (EuroSAT), and planes; and a stack of one-band pages
    tifffile.imwrite(tmp_path / "hwc.tif", tile, photometric="minisblack", planarconfig="contig")
    tifffile.imwrite(tmp_path / "chw.tif", np.moveaxis(tile, 2, 0), photometric="minisblack", planarconfig="separate")
    tifffile.imwrite(tmp_path / "pages.tif", np.moveaxis(tile, 2, 0), photometric="minisblack")
    for name in ("hwc.npy", "chw.npy", "hwc.tif", "chw.tif", "pages.tif"):
        np.testing.assert_array_equal(read_bands(tmp_path / name), tile, err_msg=name)
        assert band_header(tmp_path / name).bands == 6 and header_size(tmp_path / name) == (20, 20)
        x = read_input(tmp_path / name)
        assert x.dtype == torch.float32 and tuple(x.shape) == (6, 20, 20)
    # forcing the layout reads the other axis as bands; a cube with no smaller axis needs the flag
    assert read_bands(tmp_path / "chw.npy", layout="hwc").shape == (6, 20, 20)
    np.save(tmp_path / "cube.npy", np.zeros((8, 8, 8), np.float32))
    with pytest.raises(DataError, match="--band-layout"):
        read_bands(tmp_path / "cube.npy")
    assert read_bands(tmp_path / "cube.npy", layout="chw").shape == (8, 8, 8)
    # a plain RGB TIFF stays a picture, read by Pillow as before
    tifffile.imwrite(tmp_path / "rgb.tif", tile[..., :3].astype(np.uint8), photometric="rgb")
    assert not isinstance(read_input(tmp_path / "rgb.tif"), torch.Tensor)


def test_bad_band_files_are_named_and_skipped_by_the_image_check(tmp_path):
    data = make_band_folders(tmp_path / "d", n=3)
    np.save(data / "crop" / "pickled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (data / "crop" / "cut.npy").write_bytes((data / "crop" / "crop_0.npy").read_bytes()[:300])
    tifffile.imwrite(data / "water" / "cut.tif", band_tile(1, 9), photometric="minisblack", planarconfig="contig")
    (data / "water" / "cut.tif").write_bytes((data / "water" / "cut.tif").read_bytes()[:3000])
    nan = band_tile(1, 8).astype(np.float32)
    nan[3, 4, 2] = np.nan
    np.save(data / "water" / "nan.npy", nan)
    assert "pickle" in check_image(data / "crop" / "pickled.npy")
    assert "NaN" in check_image(data / "water" / "nan.npy") and "band(s) 2" in check_image(data / "water" / "nan.npy")
    assert check_image(data / "crop" / "cut.npy") and check_image(data / "water" / "cut.tif")
    t = classify_eval_transform(28)
    built = build_classification_data(data=str(data), train_transform=t, eval_transform=t, check_images="full")
    skipped = {Path(p).name for p, _ in built.report.skipped}
    assert {"pickled.npy", "cut.npy", "cut.tif", "nan.npy"} <= skipped
    assert len(built.train) == 6 and built.spec.in_channels == 5 and built.spec.arrays


def test_a_file_with_another_band_count_is_refused_naming_it_and_both_counts(tmp_path):
    data = make_band_folders(tmp_path / "d", n=3)
    np.save(data / "water" / "odd.npy", band_tile(1, 5, bands=4))
    with pytest.raises(DataError, match=r"odd\.npy has 4 band\(s\)") as e:
        check_band_counts(sorted(data.rglob("*.npy")))
    assert "than the 5" in str(e.value)
    make_class_folders(tmp_path / "mixed", ["red", "blue"], 2)
    np.save(tmp_path / "mixed" / "red" / "tile.npy", band_tile(0, 1, bands=3))
    t = classify_eval_transform(28)
    with pytest.raises(DataError, match="mixes pictures"):
        build_classification_data(data=str(tmp_path / "mixed"), train_transform=t, eval_transform=t)


def test_band_statistics_and_the_spec_saved_for_a_run(tmp_path):
    data = make_band_folders(tmp_path / "d", n=3)
    paths = sorted(data.rglob("*.npy"))
    mean, std = band_statistics(paths)
    stacked = np.concatenate([np.load(p).reshape(-1, 5) for p in paths]).astype(np.float64)
    np.testing.assert_allclose(mean, stacked.mean(0), rtol=1e-9)
    np.testing.assert_allclose(std, stacked.std(0), rtol=1e-6)
    cfg = build_config("classify", data=str(data), **tiny_options(tmp_path / "r"), rgb_bands="2,1,0")
    from dinotune.tasks import get_task

    meta = get_task(cfg).build_data(None, 14).meta["input"]
    assert meta["in_channels"] == 5 and meta["rgb_bands"] == [2, 1, 0] and meta["arrays"]
    np.testing.assert_allclose(meta["mean"], mean)
    # given statistics win; pictures keep ImageNet's exactly
    cfg = build_config("classify", data=str(data), **tiny_options(tmp_path / "r"), band_mean=[1] * 5, band_std=[2] * 5)
    assert get_task(cfg).build_data(None, 14).meta["input"]["std"] == [2.0] * 5
    pictures = make_class_folders(tmp_path / "p", ["red", "blue"], 2)
    cfg = build_config("classify", data=str(pictures), **tiny_options(tmp_path / "r"))
    assert get_task(cfg).build_data(None, 14).meta["input"]["mean"] == list(IMAGENET_MEAN)
    with pytest.raises(DataError, match="--in-channels 4 but the training files have 5"):
        get_task(build_config("classify", data=str(data), **tiny_options(tmp_path / "r"), in_channels=4)).build_data(None, 14)
    with pytest.raises(ConfigError, match="--rgb-bands"):
        build_config("classify", rgb_bands="0,1").validate()


# --------------------------------------------------------------------------- patch embedding
@pytest.mark.parametrize("spec", ["random:tiny", "random:tiny-reg4", "random:dinov3-tiny"])
def test_widened_embedding_with_extra_kernels_zeroed_equals_the_rgb_model(spec):
    rgb = DinoBackbone.from_spec(spec, init_seed=3).eval()
    wide = DinoBackbone.from_spec(spec, init_seed=3).eval()
    conv = widen_patch_embedding(wide, 7, [4, 2, 0])
    assert wide.config.num_channels == 7 and conv.weight.shape[1] == 7
    old = patch_embedding(rgb)[2].weight
    for rgb_index, band in enumerate([4, 2, 0]):  # the RGB bands keep their pretrained kernels exactly
        assert torch.equal(conv.weight[:, band], old[:, rgb_index])
    extra = [1, 3, 5, 6]
    expected = old.mean(1) * 3 / 7
    for band in extra:  # the others: the mean RGB kernel, scaled by 3 / N
        torch.testing.assert_close(conv.weight[:, band], expected)
    side = 2 * rgb.patch_size
    x = torch.randn(2, 7, side, side)
    with torch.no_grad():
        assert (wide(x).cls - rgb(x[:, [4, 2, 0]]).cls).abs().max() > 1e-2  # the extra bands do count
        conv.weight[:, extra] = 0
        # equal up to float32 summation order (7 input bands summed instead of 3)
        torch.testing.assert_close(wide(x).cls, rgb(x[:, [4, 2, 0]]).cls, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(wide(x).patch_tokens, rgb(x[:, [4, 2, 0]]).patch_tokens, rtol=1e-5, atol=1e-5)


def test_patch_embedding_accessor_finds_the_dinov3_layout():
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    model = DINOv3ViTModel(DINOv3ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, patch_size=16, num_register_tokens=0)).eval()
    parent, name, conv = patch_embedding(model)
    assert name == "patch_embeddings" and conv.in_channels == 3
    widen_patch_embedding(model, 4, [0, 1, 2])
    assert model.config.num_channels == 4
    assert model(pixel_values=torch.randn(1, 4, 32, 32)).last_hidden_state.shape[0] == 1


@pytest.mark.parametrize("kind,trains", [("lora", True), ("dora", True), ("full", True), ("none", False)])
def test_the_widened_embedding_trains_with_every_adapter_that_trains_the_backbone(kind, trains):
    cfg = AdapterConfig(kind=kind, rank=2)
    backbone = DinoBackbone.from_spec("random:tiny")
    apply_adapter(backbone, cfg)
    conv = adapt_input(backbone, 5, [0, 1, 2], trainable=kind != "none")
    ids = {id(p) for _, p in trainable_backbone_parameters(backbone, cfg)}
    assert (id(conv.weight) in ids) == trains and conv.weight.requires_grad == trains
    assert adapt_input(DinoBackbone.from_spec("random:tiny"), 3, [0, 1, 2], True) is None  # plain RGB: untouched


# ------------------------------------------------------------------------- augmentation, pictures
def test_quarter_turns_move_image_bands_and_mask_together():
    image = torch.arange(5 * 6 * 4, dtype=torch.float32).reshape(5, 6, 4)
    mask = (image[2] % 7).to(torch.uint8)  # the mask is a function of band 2's pixels
    turn = RandomQuarterTurn()
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        im, m = turn(tv_tensors.Image(image), tv_tensors.Mask(mask))
        seen.add(tuple(im.shape))
        assert torch.equal(m, (im[2] % 7).to(torch.uint8))
        assert sorted(im.flatten().tolist()) == sorted(image.flatten().tolist())  # exact, no resampling
    assert seen == {(5, 6, 4), (5, 4, 6)}


def test_band_arrays_are_drawn_through_their_rgb_bands_with_a_percentile_stretch():
    tile = np.zeros((10, 10, 4), np.uint16)
    tile[..., 3] = np.arange(100).reshape(10, 10) * 50  # red: band 3
    tile[..., 0] = 7  # a flat band shows black, not noise
    picture = np.asarray(stretch_to_rgb(tile, [3, 1, 0]))
    lo, hi = np.percentile(tile[..., 3], [2, 98])
    assert picture[..., 0].min() == 0 and picture[..., 0].max() == 255
    assert picture[0, 1, 0] == 0 and picture[9, 9, 0] == 255  # at / beyond the 2nd and 98th percentiles
    middle = np.rint((tile[5, 5, 3] - lo) / (hi - lo) * 255)
    assert picture[5, 5, 0] == middle
    assert (picture[..., 1] == 0).all() and (picture[..., 2] == 0).all()


# ---------------------------------------------------------------------------------- end to end
def test_npy_classification_run_saves_and_restores_the_widened_embedding(tmp_path):
    data = make_band_folders(tmp_path / "d", n=4, fmt="npy", layout="chw")
    result = dinotune.train(task="classify", data=str(data), val_data=str(data),
                            **tiny_options(tmp_path / "run", adapter="lora", epochs=2, backbone_lr=5e-2, lr=1e-2,
                                           rgb_bands="2,1,0"))
    best = Path(result["run_dir"]) / "checkpoints" / "best"
    saved = load_file(str(best / INPUT_EMBEDDING_WEIGHTS))
    fresh = DinoBackbone.from_spec("random:tiny")
    widen_patch_embedding(fresh, 5, [2, 1, 0])
    assert not torch.allclose(saved["weight"], patch_embedding(fresh)[2].weight)  # it trained under LoRA
    run = dinotune.load(result["run_dir"], merge=False)
    assert torch.equal(patch_embedding(run.model.backbone)[2].weight, saved["weight"])
    # the reloaded model gives the numbers training measured on the same images
    recorded = json.loads((Path(result["run_dir"]) / "best_metrics.json").read_text())
    again = run.evaluate(str(data))
    assert again["loss"] == pytest.approx(recorded["loss"], rel=1e-5) and again["top1"] == recorded["top1"]
    preds = dinotune.load(result["run_dir"]).predict(str(data / "water"), top_k=1)  # merged LoRA, same answers
    assert len(preds) == 4
    # files that do not fit the model are refused naming both counts
    np.save(tmp_path / "three.npy", band_tile(0, 1, bands=3))
    with pytest.raises(DataError, match=r"the 5 the model takes: .*three\.npy has 3 band\(s\)"):
        run.predict(str(tmp_path / "three.npy"))


def test_satellite_recipe_config_trains_on_npy_tiles(tmp_path):
    data = make_band_folders(tmp_path / "tiles", n=4, bands=4, classes=("cloud", "clear"))
    config = ROOT / "configs" / "satellite-lora-vitl.yaml"
    cfg = build_config("classify", str(config))
    assert (cfg.backbone.model, cfg.head.pool, cfg.adapter.kind, cfg.adapter.rank) == (
        "facebook/dinov2-large", "last4", "lora", 4)
    from dinotune.cli import main

    # one command, as the README gives it, with the model and sizes made tiny
    assert main(["train", "classify", "--config", str(config), "--data", str(data), "--model", "random:tiny",
                 "--image-size", "28", "--batch-size", "4", "--epochs", "1", "--workers", "0", "--no-progress",
                 "--device", "cpu", "--val-fraction", "0.25", "--rgb-bands", "2,1,0", "--out", str(tmp_path / "run")]) == 0
    run = dinotune.load(tmp_path / "run")
    assert run.cfg.head.pool == "last4" and run.cfg.adapter.targets == ["qkv"] and run.cfg.adapter.rank == 4
    assert run.meta["input"]["in_channels"] == 4 and run.meta["input"]["rgb_bands"] == [2, 1, 0]
    assert len(run.predict(str(data))) == 8


def _small_eurosat(tmp_path: Path) -> Path:
    """10 real tiles of each of 3 EuroSAT classes (the whole set is 200: reading and checking them
    all, several times over, was most of the test's time)."""
    source = shared_data("eurosat_ms")
    root = tmp_path / "eurosat"
    for cls in ("Forest", "River", "SeaLake"):
        (root / cls).mkdir(parents=True)
        for f in sorted((source / cls).glob("*.tif"))[:10]:
            shutil.copy(f, root / cls / f.name)
    return root


def test_eurosat_sentinel2_tiles_train_evaluate_predict_end_to_end(tmp_path):
    data = _small_eurosat(tmp_path)
    result = dinotune.train(task="classify", data=str(data), val_fraction=0.2, rgb_bands="3,2,1",
                            **tiny_options(tmp_path / "run", image_size=56, batch_size=32, epochs=1, lr=1e-2))
    run = dinotune.load(result["run_dir"])
    assert run.meta["input"]["in_channels"] == 13 and run.meta["input"]["rgb_bands"] == [3, 2, 1]
    assert 0.0 <= run.evaluate(str(data))["top1"] <= 1.0
    tile = next((data / "Forest").glob("*.tif"))
    assert run.predict(str(tile), top_k=3)[0]["predictions"][0]["class"] in run.bundle.class_names
    files = dinotune.api.analyze(result["run_dir"], data=str(data), samples=4)
    assert any(f.name == "samples.png" for f in files)


def test_detection_and_segmentation_read_npy_images(tmp_path):
    from tests.conftest import make_coco_dataset

    def to_npy(folder: Path, chw: bool) -> None:
        from PIL import Image

        for png in sorted(folder.glob("*.png")):
            tile = np.asarray(Image.open(png).convert("RGB")).astype(np.float32)
            tile = np.concatenate([tile, tile[..., :1] * 0.5], axis=2)  # a 4th band
            np.save(png.with_suffix(".npy"), np.moveaxis(tile, 2, 0) if chw else tile)
            png.unlink()

    coco = make_coco_dataset(tmp_path / "coco", {"train": [1, 2], "val": [1]})
    for split in ("train", "val"):
        to_npy(coco / split, chw=False)
        path = coco / "annotations" / f"instances_{split}.json"
        ann = json.loads(path.read_text())
        for im in ann["images"]:
            im["file_name"] = im["file_name"].replace(".png", ".npy")
        path.write_text(json.dumps(ann))
    det = dinotune.train(task="detect", data=str(coco), **tiny_options(
        tmp_path / "det", image_size=56, batch_size=2, epochs=1, num_queries=3, decoder_layers=1, hidden_dim=16,
        num_heads=2, ffn_dim=16, sampling_points=1))
    out = dinotune.load(det["run_dir"]).predict(str(coco / "val"), draw=str(tmp_path / "drawn"))
    assert out[0]["width"] == 56 and (tmp_path / "drawn" / "val_000.jpg").is_file()

    seg = make_segmentation_folders(tmp_path / "seg", {"train": 2, "val": 1})
    for split in ("train", "val"):
        to_npy(seg / split / "images", chw=True)
    run = dinotune.train(task="segment", data=str(seg), **tiny_options(tmp_path / "seg-run", batch_size=2, epochs=1,
                                                                      decoder="linear"))
    loaded = dinotune.load(run["run_dir"])
    assert loaded.meta["input"]["in_channels"] == 4
    assert "mIoU" in loaded.evaluate(str(seg))
    assert loaded.predict(str(seg / "val" / "images"), draw=str(tmp_path / "overlays"))[0]["classes"]


def test_plain_rgb_runs_are_unchanged(tmp_path, tiny_folder):
    """Pictures: no widened layer, no extra file, ImageNet statistics, the pretrained embedding."""
    result = dinotune.train(task="classify", data=str(tiny_folder), **tiny_options(tmp_path / "run", epochs=1))
    best = Path(result["run_dir"]) / "checkpoints" / "best"
    assert not (best / INPUT_EMBEDDING_WEIGHTS).exists()
    run = dinotune.load(result["run_dir"])
    assert InputSpec.from_meta(run.meta) == InputSpec() and run.model.backbone.config.num_channels == 3


def test_yolo_layout_reads_band_images_with_their_boxes(tmp_path):
    from dinotune.tasks.detect.data import DetectionDataset, find_detection_data
    from dinotune.tasks.detect.transforms import eval_transforms

    root = tmp_path / "yolo"
    for split in ("train", "valid"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
    np.save(root / "images" / "train" / "a.npy", band_tile(0, 1, size=40, bands=6)[:20])  # 20 x 40 x 6
    tifffile.imwrite(root / "images" / "train" / "b.tif", band_tile(1, 2, size=30, bands=6),
                     photometric="minisblack", planarconfig="contig")
    np.save(root / "images" / "valid" / "c.npy", band_tile(0, 3, bands=6))
    (root / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (root / "labels" / "train" / "b.txt").write_text("1 0.25 0.25 0.5 0.5\n")
    (root / "data.yaml").write_text("names: [field, lake]\ntrain: images/train\nval: images/valid\n")
    src = find_detection_data(root, "train", min_box_size=1.0)
    assert [(im.path.name, im.width, im.height) for im in src.images] == [("a.npy", 40, 20), ("b.tif", 30, 30)]
    assert src.targets(1)[0].bbox == pytest.approx((10, 5, 30, 15))
    spec = InputSpec(6, [0, 1, 2], [1000.0] * 6, [300.0] * 6, arrays=True)
    image, target = DetectionDataset(src, eval_transforms(), 56, spec=spec)[0]
    assert tuple(image.shape) == (6, 56, 56)
    # the 40 x 20 tile fills the top half of the canvas; its box scales with it
    torch.testing.assert_close(target["boxes"][0], torch.tensor([0.5, 0.25, 0.5, 0.25]))
