"""Training from a scene end to end: detection, instance and semantic segmentation each train on tiles
cut from a GeoTIFF the tests make (bright squares, labels in another CRS) through the CLI or
``dinotune.api``, and ``eval`` scores the run over the scene's validation blocks (the same split, from
the run's config); segmentation also trains on real EuroSAT-MS tiles stitched into a 13-band scene."""

from __future__ import annotations

import json

import pytest

from dinotune import api
from dinotune.cli import main
from tests.conftest import shared_data
from tests.scene_helpers import eurosat_scene, make_scene, squares, write_geojson, write_vectors

pytest.importorskip("rasterio")
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model", "random:tiny", "--image-size", "56", "--batch-size", "4", "--workers", "0", "--no-progress",
        "--device", "cpu", "--epochs", "1"]
SCENE = ["--tile", "64", "--block", "128", "--val-fraction", "0.25", "--tiles-per-epoch", "8"]
DETR = ["--hidden-dim", "32", "--num-heads", "2", "--ffn-dim", "64", "--decoder-layers", "1", "--num-queries", "10",
        "--sampling-points", "2", "--pyramid-scales", "2", "1"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("scene")
    return make_scene(root / "scene.tif"), write_geojson(root / "labels.geojson", squares()), root


def _meta(run) -> dict:
    return json.loads((run / "checkpoints" / "best" / "meta.json").read_text())


def test_detect_trains_from_a_scene_and_eval_scores_the_validation_blocks(scene, capsys):
    image, labels, root = scene
    run = root / "detect-run"
    assert main(["train", "detect", "--data", str(image), "--labels", str(labels), "--out", str(run), *SCENE,
                 *TINY, *DETR]) == 0
    meta = _meta(run)
    assert meta["class_names"] == ["house", "pool"] and meta["scene"]["val_tiles"] == 4
    assert meta["scene"]["tile"] == 64 and meta["scene"]["train_blocks"] == 3 and not meta["input"]["arrays"]
    capsys.readouterr()
    # the run's own labels for its own scene; the validation blocks from its config: 4 tiles
    assert main(["eval", str(run), "--data", str(image), "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    metrics = json.loads(printed.out)
    assert {"AP", "AP50", "loss"} <= metrics.keys() and metrics["images"] == 4
    assert "tiled (64 px" in printed.err and "resized" in printed.err
    metrics = json.loads(next((run / "eval").glob("*/metrics.json")).read_text())
    # and the validation blocks' objects, predicted in tiles and resized whole, scored alike
    tiled, resized = metrics["scene"]["tiled"], metrics["scene"]["resized"]
    assert tiled["objects"] == resized["objects"] > 0 and metrics["scene"]["tiling"]["tile"] == 64
    assert {"AP", "AP50", "APs"} <= tiled.keys() and {"AP", "AP50", "APs"} <= resized.keys()
    assert main(["eval", str(run), "--data", str(image), "--labels", str(labels), "--split", "test",
                 "--device", "cpu", "--out", str(root / "all.json")]) == 0
    assert json.loads((root / "all.json").read_text())["images"] == 16  # the whole scene's grid


def test_instance_trains_from_a_scene_through_the_api(scene):
    image, labels, root = scene
    run = api.train(task="instance", data=str(image), labels=str(labels), out=str(root / "instance-run"),
                    tile=64, block=128, val_fraction=0.25, tiles_per_epoch=8, tile_sampling="grid",
                    model="random:tiny", image_size=56, batch_size=4, workers=0, progress=False, device="cpu",
                    epochs=1, hidden_dim=32, num_heads=2, ffn_dim=64, decoder_layers=1, num_queries=10,
                    sampling_points=2, pyramid_scales=[2, 1], mask_dim=16, mask_scale=2, mask_points=256)
    assert "segm/AP" in run["metrics"]
    metrics = run.evaluate(str(image), labels=str(labels))
    assert {"AP", "segm/AP", "segm/AP50"} <= metrics.keys() and metrics["images"] == 4


def test_segment_trains_on_a_band_scene_with_reprojected_labels(scene, capsys):
    _, _, root = scene
    image = make_scene(root / "bands.tif", bands=4, dtype="uint16")
    gpkg = write_vectors(root / "labels.gpkg", squares(), "EPSG:3857")
    run = root / "segment-run"
    assert main(["train", "segment", "--data", str(image), "--labels", str(gpkg), "--out", str(run), *SCENE,
                 *TINY]) == 0
    err = capsys.readouterr().err
    assert "reprojected from EPSG:3857 to EPSG:32633" in err and "spatial split: 3 training and 1 validation" in err
    meta = _meta(run)
    assert meta["class_names"] == ["background", "house", "pool"]
    assert meta["input"]["arrays"] and meta["input"]["in_channels"] == 4
    assert main(["eval", str(run), "--data", str(image), "--labels", str(gpkg), "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert "mIoU" in metrics and metrics["images"] == 4


def test_eval_refuses_labels_beside_a_dataset_and_subsets_of_a_scene(scene, capsys):
    image, labels, root = scene
    run = root / "detect-run"
    if not run.exists():
        pytest.skip("needs the detection run of the first test")
    assert main(["eval", str(run), "--data", str(root), "--labels", str(labels), "--device", "cpu"]) != 0
    assert "goes with a scene" in capsys.readouterr().err
    assert main(["eval", str(run), "--data", str(image), "--subset", "2", "--device", "cpu"]) != 0
    assert "is a scene" in capsys.readouterr().err


def test_segment_trains_on_real_eurosat_tiles_stitched_into_a_scene(tmp_path, capsys):
    root = shared_data("eurosat_ms")
    image, labels, classes = eurosat_scene(root, tmp_path)
    run = tmp_path / "run"
    assert main(["train", "segment", "--data", str(image), "--labels", str(labels), "--out", str(run), "--tile", "64",
                 "--block", "128", "--val-fraction", "0.25", "--rgb-bands", "3", "2", "1", *TINY]) == 0
    meta = _meta(run)
    assert meta["class_names"] == ["background", *classes] and meta["input"]["in_channels"] == 13
    assert meta["input"]["rgb_bands"] == [3, 2, 1] and meta["scene"]["val_tiles"] == 4
    capsys.readouterr()
    assert main(["eval", str(run), "--data", str(image), "--device", "cpu"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert "mIoU" in metrics and metrics["images"] == 4
    # and the 13-band scene predicted in tiles: a label GeoTIFF on the scene's grid
    import rasterio

    out = tmp_path / "landcover.tif"
    assert main(["predict", str(run), str(image), "--tile", "auto", "--overlap", "0.25", "--out", str(out),
                 "--device", "cpu"]) == 0
    with rasterio.open(image) as scene, rasterio.open(out) as labels_out:
        assert (labels_out.width, labels_out.height) == (scene.width, scene.height)
        assert labels_out.crs == scene.crs and labels_out.transform == scene.transform
        assert labels_out.read(1).max() < len(meta["class_names"])
