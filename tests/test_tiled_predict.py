"""Tiled prediction (``predict --tile``): the merge of duplicates across seams against a brute-force
rule, a one-tile prediction equal to the plain one, batched = one by one, the strip-wise averaged
segmentation equal to averaging every tile's logits over the whole scene at once, GeoJSON features
on the scene's ground, the label GeoTIFF's georeferencing, and the refusals. Tiles shared out under
torchrun: ``test_distributed.py`` (its one launch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
from rasterio.transform import from_origin  # noqa: E402

import dinotune  # noqa: E402
from dinotune.cli import main  # noqa: E402
from dinotune.errors import ConfigError, DataError  # noqa: E402
from dinotune.geo.tiles import tile_windows  # noqa: E402
from dinotune.tasks.detect.merge import candidate_pairs, intersection_over_smaller, merge_detections  # noqa: E402
from tests.export_runs import trained_run  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CRS, ORIGIN = "EPSG:32633", from_origin(500000, 4000000, 10, 10)


def _scene(path: Path, array: np.ndarray, crs: str | None = CRS) -> Path:
    """``array`` (bands x h x w) as a tiled GeoTIFF, georeferenced unless ``crs`` is None."""
    bands, h, w = array.shape
    extra = dict(crs=crs, transform=ORIGIN) if crs else {}
    with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=bands, dtype=array.dtype, tiled=True,
                       blockxsize=32, blockysize=32, **extra) as ds:
        ds.write(array)
    return path


def _pixels(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (3, h, w), dtype=np.uint8)
    base[:, h // 3: h // 3 + 20, w // 4: w // 4 + 20] = 250  # something brighter than the noise
    return base


# ------------------------------------------------------------------------------------- the grid
def test_tile_windows_cover_the_scene_with_the_overlap_asked():
    windows = tile_windows(300, 410, 64, 0.25)
    covered = np.zeros((300, 410), int)
    for w in windows:
        covered[w.row: w.row + w.height, w.col: w.col + w.width] += 1
    assert covered.min() >= 1
    cols = sorted({w.col for w in windows})
    assert cols[1] - cols[0] == 48 and cols[-1] == 410 - 64  # stride 64 x 0.75; the last ends at the border
    assert tile_windows(30, 40, 64, 0.2) == [tile_windows(30, 40, 64, 0.2)[0]]  # one window past a small scene


@pytest.mark.parametrize("layout", ["tiled", "striped-bigtiff", "npy-hwc", "npy-chw"])
def test_windows_read_what_the_array_holds(tmp_path, layout):
    from dinotune.geo.scene import Window, open_scene

    array = np.random.default_rng(1).integers(0, 4000, (4, 70, 90)).astype(np.uint16)
    if layout.startswith("npy"):
        path = tmp_path / "scene.npy"
        np.save(path, array if layout == "npy-chw" else array.transpose(1, 2, 0))
    else:
        path = tmp_path / "scene.tif"
        extra = dict(tiled=True, blockxsize=32, blockysize=32) if layout == "tiled" else dict(tiled=False, BIGTIFF="YES")
        with rasterio.open(path, "w", driver="GTiff", height=70, width=90, count=4, dtype="uint16", crs=CRS,
                           transform=ORIGIN, **extra) as ds:
            ds.write(array)
    with open_scene(path) as scene:
        assert (scene.height, scene.width, scene.bands) == (70, 90, 4)
        assert scene.georeferenced == (not layout.startswith("npy"))
        np.testing.assert_array_equal(scene.read(Window(10, 20, 30, 40)), array[:, 10:40, 20:60])
        edge = scene.read(Window(60, 80, 16, 16))  # past the corner: zeros there
        np.testing.assert_array_equal(edge[:, :10, :10], array[:, 60:, 80:])
        assert not edge[:, 10:].any() and not edge[:, :, 10:].any()


# ------------------------------------------------------------------------------------- merging
def _brute_merge(boxes, scores, labels, method, tiles, threshold=0.5):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    gone, kept, out = set(), [], {}
    for k in order:
        if k in gone:
            continue
        kept.append(k)
        box = boxes[k].copy()
        for j in order:
            if j == k or j in gone or j in kept or labels[j] != labels[k] or tiles[j] == tiles[k]:
                continue
            if intersection_over_smaller(boxes[k: k + 1], boxes[j: j + 1])[0] >= threshold:
                gone.add(j)
                if method == "union":
                    box[:2] = np.minimum(box[:2], boxes[j, :2])
                    box[2:] = np.maximum(box[2:], boxes[j, 2:])
        out[k] = box
    return kept, np.array([out[k] for k in kept]).reshape(-1, 4)


@pytest.mark.parametrize("method", ["nms", "union"])
def test_merge_equals_the_brute_force_rule(method):
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 300, (400, 2))
    wh = rng.uniform(2, 40, (400, 2))
    boxes = np.concatenate([xy, xy + wh], 1)
    scores = np.round(rng.uniform(0, 1, 400), 2)  # ties: broken by input order
    labels = rng.integers(0, 3, 400)
    tiles = rng.integers(0, 4, 400)
    kept, merged = merge_detections(boxes, scores, labels, method, cell=64, tiles=tiles)
    ref_kept, ref_boxes = _brute_merge(boxes, scores, labels, method, tiles)
    assert kept.tolist() == ref_kept
    np.testing.assert_allclose(merged, ref_boxes)
    assert 50 < len(kept) < 400  # the case is not trivial


def test_candidate_pairs_are_every_intersecting_pair():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 500, (200, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 60, (200, 2))], 1)
    i, j = candidate_pairs(boxes, 64)
    found = {(a, b) for a, b in zip(i.tolist(), j.tolist()) if
             intersection_over_smaller(boxes[a: a + 1], boxes[b: b + 1])[0] > 0}
    brute = {(a, b) for a in range(200) for b in range(a + 1, 200)
             if intersection_over_smaller(boxes[a: a + 1], boxes[b: b + 1])[0] > 0}
    assert found == brute and brute


def test_a_box_cut_at_a_seam_is_merged_into_the_whole_one():
    whole, cut = [100, 100, 140, 130], [100, 100, 112, 130]  # IoU 0.3, inside the whole box
    kept, boxes = merge_detections(np.array([cut, whole], float), np.array([0.9, 0.8]), np.array([1, 1]), "nms", 64)
    assert kept.tolist() == [0]  # the best-scoring view survives
    kept, boxes = merge_detections(np.array([cut, whole], float), np.array([0.9, 0.8]), np.array([1, 1]), "union", 64)
    assert boxes.tolist() == [whole]
    kept, _ = merge_detections(np.array([cut, whole], float), np.array([0.9, 0.8]), np.array([1, 2]), "nms", 64)
    assert len(kept) == 2  # another class is another object
    kept, _ = merge_detections(np.array([cut, whole], float), np.array([0.9, 0.8]), np.array([1, 1]), "nms", 64,
                               tiles=np.array([3, 3]))
    assert len(kept) == 2  # one tile's own predictions are the model's set, not duplicates


# ------------------------------------------------------------------------------------- detection
@pytest.fixture(scope="module")
def detect_run(tmp_path_factory):
    return trained_run("detect", tmp_path_factory)


def _dets(record):
    return [(d["category"], d["score"], d["bbox"]) for d in record["detections"]]


def test_one_tile_over_an_image_predicts_what_the_plain_path_does(detect_run, tmp_path):
    from PIL import Image

    picture = tmp_path / "one.png"
    Image.fromarray(_pixels(56, 56).transpose(1, 2, 0)).save(picture)
    plain = dinotune.predict(detect_run, picture, score_threshold=0.0, device="cpu")[0]
    tiled = dinotune.predict(detect_run, picture, score_threshold=0.0, tile="56", overlap=0.0, device="cpu")[0]
    assert tiled["tiling"]["tiles"] == 1 and tiled["georef"] is None
    assert len(plain["detections"]) > 0
    got = _dets(tiled)
    for (c0, s0, b0), (c1, s1, b1) in zip(_dets(plain), got):
        assert c0 == c1 and s0 == pytest.approx(s1, abs=1e-5) and b0 == pytest.approx(b1, abs=0.02)
    assert len(got) == len(plain["detections"])


def test_tiles_batched_equal_tiles_one_by_one(detect_run, tmp_path):
    scene = _scene(tmp_path / "s.tif", _pixels(150, 190))
    one = dinotune.predict(detect_run, scene, tile="56", overlap=0.3, batch_size=1, top_k=1000, device="cpu")[0]
    many = dinotune.predict(detect_run, scene, tile="56", overlap=0.3, batch_size=5, top_k=1000, device="cpu")[0]
    assert one["tiling"]["tiles"] == len(tile_windows(150, 190, 56, 0.3)) > 5
    assert len(one["detections"]) > 0
    np.testing.assert_allclose([d["bbox"] for d in one["detections"]], [d["bbox"] for d in many["detections"]],
                               atol=0.02)
    for d in one["detections"]:  # boxes lie in the scene
        x, y, w, h = d["bbox"]
        assert x >= 0 and y >= 0 and x + w <= 190.01 and y + h <= 150.01


def test_geojson_lies_on_the_scene_in_its_crs_or_lon_lat(detect_run, tmp_path):
    from rasterio.warp import transform_bounds

    scene = _scene(tmp_path / "scene.tif", _pixels(120, 160))
    bounds = (500000, 4000000 - 1200, 500000 + 1600, 4000000)
    for coords in ("crs", "lonlat"):
        out = tmp_path / f"preds-{coords}.geojson"
        assert main(["predict", str(detect_run), str(scene), "--tile", "56", "--overlap", "0.25", "--out", str(out),
                     "--draw-threshold", "0", "--coords", coords, "--device", "cpu", "--top-k", "1000"]) == 0
        doc = json.loads(out.read_text())
        assert doc["properties"]["tiling"]["tile"] == 56 and doc["properties"]["tiling"]["merge"] == "nms"
        assert doc["features"]
        box = bounds if coords == "crs" else transform_bounds(CRS, "EPSG:4326", *bounds)
        assert ("crs" in doc) == (coords == "crs")
        for f in doc["features"]:
            xy = np.asarray(f["geometry"]["coordinates"][0])
            assert (xy[:, 0] >= box[0] - 1e-7).all() and (xy[:, 0] <= box[2] + 1e-7).all()
            assert (xy[:, 1] >= box[1] - 1e-7).all() and (xy[:, 1] <= box[3] + 1e-7).all()
            assert set(f["properties"]) >= {"category", "score", "bbox_px"}


def test_a_scene_without_crs_predicts_in_pixels(detect_run, tmp_path):
    scene = _scene(tmp_path / "plain.tif", _pixels(100, 120), crs=None)
    out = tmp_path / "p.geojson"
    assert main(["predict", str(detect_run), str(scene), "--tile", "56", "--out", str(out), "--draw-threshold", "0",
                 "--device", "cpu"]) == 0
    doc = json.loads(out.read_text())
    assert doc["coordinates"] == "pixels" and "crs" not in doc
    for f in doc["features"]:
        xy = np.asarray(f["geometry"]["coordinates"][0])
        assert xy.min() >= 0 and xy[:, 0].max() <= 120 and xy[:, 1].max() <= 100
    # the same pixels memory-mapped from a .npy give the same objects
    npy = tmp_path / "plain.npy"
    np.save(npy, _pixels(100, 120).transpose(1, 2, 0))
    from_tif = dinotune.predict(detect_run, scene, tile="56", draw_threshold=0.0, device="cpu")[0]
    from_npy = dinotune.predict(detect_run, npy, tile="56", draw_threshold=0.0, device="cpu")[0]
    assert _dets(from_tif) == _dets(from_npy) and from_npy["georef"] is None


def test_a_scene_of_other_bands_is_refused_by_name(detect_run, tmp_path):
    scene = _scene(tmp_path / "s2.tif", np.random.default_rng(0).integers(0, 3000, (5, 64, 64)).astype(np.uint16))
    with pytest.raises(DataError, match="s2.tif: 5 band"):
        dinotune.predict(detect_run, scene, tile="56", device="cpu")
    with pytest.raises(ConfigError, match="--tile"):
        dinotune.predict(detect_run, scene, tile="big", device="cpu")


# ------------------------------------------------------------------------------------- segmentation
@pytest.fixture(scope="module")
def segment_run(tmp_path_factory):
    return trained_run("segment", tmp_path_factory)


@pytest.mark.parametrize("bands", [False, True])
def test_label_geotiff_equals_whole_scene_averaging(segment_run, tmp_path, monkeypatch, bands):
    """The strip-wise output equals every tile's logits averaged over the whole scene at once, also
    when the scene is done in vertical bands (forced here by a tiny strip budget)."""
    from dinotune.runs import load
    from dinotune.tasks.segment import tiled

    if bands:
        monkeypatch.setattr(tiled, "STRIP_BYTES", 1)  # a band per tile column
    from dinotune.tasks.segment.tiled import tile_logits
    from dinotune.tasks.tiling import as_tile_image

    pixels = _pixels(150, 130, seed=2)
    scene = _scene(tmp_path / "scene.tif", pixels)
    out = tmp_path / "labels.tif"
    assert main(["predict", str(segment_run), str(scene), "--tile", "56", "--overlap", "0.3", "--out", str(out),
                 "--device", "cpu", "--window-batch", "3"]) == 0
    with rasterio.open(out) as ds:
        assert (ds.width, ds.height, ds.count) == (130, 150, 1)
        assert ds.crs.to_string() == CRS and ds.transform == ORIGIN
        assert ds.colormap(1)[0][:3] is not None and ds.tags()["tile"] == "56"
        got = ds.read(1)
    run = load(segment_run, device="cpu")
    k = len(run.bundle.class_names)
    total, count = np.zeros((k, 150, 130)), np.zeros((150, 130))
    from dinotune.data.input_spec import InputSpec

    spec = InputSpec.from_meta(run.meta)
    for w in tile_windows(150, 130, 56, 0.3):
        tile = np.zeros((3, 56, 56), np.uint8)
        part = pixels[:, w.row: w.row + 56, w.col: w.col + 56]
        tile[:, : part.shape[1], : part.shape[2]] = part
        logits = tile_logits(run.task, run, [as_tile_image(tile, spec)], [part.shape[1:]])[0]
        total[:, w.row: w.row + part.shape[1], w.col: w.col + part.shape[2]] += logits
        count[w.row: w.row + part.shape[1], w.col: w.col + part.shape[2]] += 1
    expected = (total / count).argmax(0)
    assert (got == expected).mean() > 0.999  # float summation order may flip a near-tie
    assert len(np.unique(got)) > 1


def test_segmentation_tiles_need_a_file_to_write(segment_run, tmp_path):
    scene = _scene(tmp_path / "scene.tif", _pixels(60, 60))
    with pytest.raises(ConfigError, match="--out FILE.tif"):
        dinotune.predict(segment_run, scene, tile="56", device="cpu")
    with pytest.raises(ConfigError, match="add --tile"):
        dinotune.predict(segment_run, scene, out=str(tmp_path / "x.tif"), device="cpu")
    masks = tmp_path / "masks"
    [record] = dinotune.predict(segment_run, [scene], tile="auto", masks=str(masks), device="cpu")
    assert Path(record["mask"]) == masks / "scene.tif" and sum(record["classes"].values()) == pytest.approx(1, abs=1e-3)


# ------------------------------------------------------------------------------------- instances
@pytest.fixture(scope="module")
def instance_run(tmp_path_factory):
    from tests.conftest import make_instance_dataset
    from tests.test_instance_task import TINY

    root = tmp_path_factory.mktemp("inst")
    data = make_instance_dataset(root / "data", {"train": [2, 1], "val": [1]})
    assert main(["train", "instance", "--data", str(data), "--out", str(root / "run"), "--epochs", "1",
                 "--adapter", "full", *TINY]) == 0
    return root / "run"


def test_instance_masks_become_polygons_on_the_scene(instance_run, tmp_path):
    from PIL import Image

    from dinotune.tasks.instance.tiled import polygons_area

    picture = tmp_path / "one.png"
    Image.fromarray(_pixels(56, 56).transpose(1, 2, 0)).save(picture)
    plain = dinotune.predict(instance_run, picture, device="cpu", mask_threshold=0.3)[0]
    tiled = dinotune.predict(instance_run, picture, tile="56", overlap=0.0, device="cpu", mask_threshold=0.3)[0]
    assert len(plain["detections"]) == len(tiled["detections"]) > 0
    for p, t in zip(plain["detections"], tiled["detections"]):
        assert p["score"] == pytest.approx(t["score"], abs=1e-5)
        assert isinstance(t["segmentation"], list)  # COCO polygons in scene pixels
        if p["area"] > 20:  # the outline holds the mask's pixels, up to its half-pixel simplification
            assert polygons_area(t["segmentation"]) == pytest.approx(p["area"], rel=0.25)
    scene = _scene(tmp_path / "scene.tif", _pixels(100, 130))
    out = tmp_path / "objects.geojson"
    assert main(["predict", str(instance_run), str(scene), "--tile", "56", "--out", str(out), "--draw-threshold",
                 "0", "--coords", "crs", "--device", "cpu", "--mask-threshold", "0.3"]) == 0
    doc = json.loads(out.read_text())
    shapes = [f["geometry"] for f in doc["features"]]
    assert shapes and any(len(g["coordinates"][0]) != 5 for g in shapes if g["type"] == "Polygon")  # outlines
    for g in shapes:
        rings = g["coordinates"] if g["type"] == "Polygon" else [r for poly in g["coordinates"] for r in poly]
        xy = np.concatenate([np.asarray(r) for r in rings])
        assert xy[:, 0].min() >= 500000 - 1e-6 and xy[:, 0].max() <= 501300 + 1e-6
        assert xy[:, 1].min() >= 3999000 - 1e-6 and xy[:, 1].max() <= 4000000 + 1e-6


# ------------------------------------------------------------------------------------- tiled vs resized
def test_scene_ap_counts_the_region_only():
    from dinotune.geo.scene import Window
    from dinotune.tasks.detect.scene_eval import scene_ap

    truth = np.array([[10, 10, 20, 20], [110, 10, 120, 20]], float)
    labels = np.array([0, 1])
    left = [Window(0, 0, 100, 100)]
    perfect = scene_ap(truth, labels, truth, np.array([0.9, 0.8]), labels, left, (100, 200), 2)
    assert perfect["AP"] == pytest.approx(1.0) and perfect["objects"] == 1 and perfect["detections"] == 1
    wrong = scene_ap(truth, labels, truth[[1, 0]], np.array([0.9, 0.8]), labels, left, (100, 200), 2)
    assert wrong["AP"] == pytest.approx(0.0)  # the box in the region has the other class


def test_resized_prediction_of_a_scene_that_fits_is_the_plain_prediction(detect_run, tmp_path):
    from PIL import Image

    from dinotune.runs import load
    from dinotune.tasks.detect.scene_eval import resized_detections

    pixels = _pixels(40, 52)
    Image.fromarray(pixels.transpose(1, 2, 0)).save(tmp_path / "small.png")
    run = load(detect_run, device="cpu")
    got = resized_detections(run, _scene(tmp_path / "small.tif", pixels))
    plain = run.predict(tmp_path / "small.png", score_threshold=0.0, top_k=1000)[0]["detections"]
    xywh = [[b[0], b[1], b[2] - b[0], b[3] - b[1]] for b in got["boxes"][: len(plain)]]
    np.testing.assert_allclose(xywh, [d["bbox"] for d in plain], atol=0.02)


def test_tile_auto_is_the_scene_tile_a_run_trained_on():
    from types import SimpleNamespace

    from dinotune.tasks.tiling import Tiling, training_tile

    cfg = SimpleNamespace(backbone=SimpleNamespace(image_size=224))
    from_photos = SimpleNamespace(meta={}, cfg=cfg)
    from_scene = SimpleNamespace(meta={"scene": {"tile": 512}}, cfg=cfg)
    assert Tiling.from_options("auto", training_tile(from_photos)).tile == 224
    assert Tiling.from_options("auto", training_tile(from_scene)).tile == 512
    assert Tiling.from_options("", training_tile(from_scene)) is None
