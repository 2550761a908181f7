"""Georeferenced outputs: GeoJSON in the scene's CRS / in lon/lat lies on the scene's ground (read
back with GDAL and as JSON), pixel GeoJSON for a plain scene, and the label GeoTIFF written window
by window equals the labels, with the scene's georeferencing, colours and tags, and leaves no
temporary file."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
pyogrio = pytest.importorskip("pyogrio")
shapely = pytest.importorskip("shapely")

from rasterio.transform import xy  # noqa: E402
from rasterio.warp import transform_bounds  # noqa: E402

from dinotune.geo.scene import Window  # noqa: E402
from dinotune.geo.vectors import read_vector_labels  # noqa: E402
from dinotune.geo.write import LabelRasterWriter, pixel_box, write_geojson  # noqa: E402
from dinotune.viz.segmentation import palette  # noqa: E402

from tests.test_geo_vectors import TRANSFORM, H, W, make_scene  # noqa: E402  (the same scene maker)
SETTINGS = {"tile": 416, "overlap": 0.25, "merge": "nms"}


@pytest.fixture
def scene(tmp_path):
    with make_scene(tmp_path / "scene.tif") as s:
        yield s


FEATURES = [{"geometry": pixel_box(10, 20, 30, 40), "properties": {"class": "car", "score": np.float32(0.5)}},
            {"geometry": pixel_box(0, 0, W, H), "properties": {"class": "field", "score": 0.9}},
            {"geometry": pixel_box(250.5, 150.25, 299, 199), "properties": {"class": "car"}}]


def all_points(doc):
    return np.array([p for f in doc["features"] for ring in f["geometry"]["coordinates"] for p in ring])


def test_geojson_in_the_scene_crs(tmp_path, scene):
    out = tmp_path / "pred.geojson"
    assert write_geojson(out, FEATURES, scene, coords="crs", properties=SETTINGS) == 3
    doc = json.loads(out.read_text())
    assert doc["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633" and doc["properties"] == SETTINGS
    assert pyogrio.read_info(out)["crs"] == "EPSG:32633"  # GDAL reads the legacy member
    pts = all_points(doc)
    left, bottom, right, top = rasterio.open(scene.path).bounds
    assert (pts[:, 0] >= left).all() and (pts[:, 0] <= right).all()
    assert (pts[:, 1] >= bottom).all() and (pts[:, 1] <= top).all()
    first = shapely.geometry.shape(doc["features"][0]["geometry"])
    (x0, x1), (y1, y0) = xy(TRANSFORM, [20, 40], [10, 30], offset="ul")  # rows 20..40 -> north..south
    assert first.bounds == pytest.approx((x0, y0, x1, y1))
    assert doc["features"][0]["properties"] == {"class": "car", "score": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.geojson", "scene.tif"]  # no temporary file left


def test_geojson_in_lonlat_round_trips(tmp_path, scene):
    out = tmp_path / "pred.geojson"
    write_geojson(out, FEATURES, scene, properties=SETTINGS)
    doc = json.loads(out.read_text())
    assert "crs" not in doc and doc["properties"] == SETTINGS
    west, south, east, north = transform_bounds("EPSG:32633", "EPSG:4326", *rasterio.open(scene.path).bounds)
    pts, eps = all_points(doc), 1e-6
    assert (pts[:, 0] >= west - eps).all() and (pts[:, 0] <= east + eps).all()
    assert (pts[:, 1] >= south - eps).all() and (pts[:, 1] <= north + eps).all()
    assert all(shapely.geometry.shape(f["geometry"]).exterior.is_ccw for f in doc["features"])  # RFC 7946
    back = read_vector_labels(out, scene)  # lon/lat -> the scene's pixels again
    assert back.reprojected and back.classes == ["car", "field", "car"]
    for feat, geom in zip(FEATURES, back.geometries):
        assert shapely.hausdorff_distance(feat["geometry"], geom) < 0.01  # 7 decimals of a degree: ~1 cm


def test_geojson_of_a_plain_scene_is_in_pixels(tmp_path):
    with make_scene(tmp_path / "plain.tif", crs=None) as plain:
        out = tmp_path / "pred.geojson"
        write_geojson(out, FEATURES[:1], plain, coords="lonlat")
        doc = json.loads(out.read_text())
        assert doc["coordinates"] == "pixels" and "crs" not in doc and "properties" not in doc
        assert shapely.geometry.shape(doc["features"][0]["geometry"]).equals(pixel_box(10, 20, 30, 40))
    with pytest.raises(ValueError, match="coords"):
        write_geojson(out, [], plain, coords="utm")


def windows_out_of_order():
    # quarters of the scene, the last two reaching past its edge (tile grids do)
    return [Window(100, 150, 150, 200), Window(0, 0, 100, 150), Window(100, 0, 128, 150), Window(0, 150, 100, 256)]


def test_label_raster_in_windows_out_of_order(tmp_path, scene):
    labels = np.random.default_rng(0).integers(0, 3, size=(H + 60, W + 110), dtype=np.uint8)
    out = tmp_path / "labels.tif"
    with LabelRasterWriter(out, scene, ["background", "car", "field"], None, tags=SETTINGS) as writer:
        for w in windows_out_of_order():
            writer.write(w, labels[w.row: w.row + w.height, w.col: w.col + w.width])
    with rasterio.open(out) as ds:
        assert (ds.width, ds.height, ds.count, ds.dtypes[0]) == (W, H, 1, "uint8")
        assert ds.crs == scene.crs and ds.transform == scene.transform
        assert np.array_equal(ds.read(1), labels[:H, :W])
        assert ds.block_shapes[0] == (256, 256) and ds.compression.name.lower() == "deflate"
        cmap = ds.colormap(1)
        assert cmap[1] == (*palette()[1].tolist(), 255) and cmap[2] == (*palette()[2].tolist(), 255)
        tags = ds.tags()
        assert (tags["CLASS_0"], tags["CLASS_1"], tags["CLASS_2"]) == ("background", "car", "field")
        assert (tags["tile"], tags["overlap"], tags["merge"]) == ("416", "0.25", "nms")
        assert "1=car" in ds.descriptions[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.tif", "scene.tif"]


def test_label_raster_abort_leaves_nothing(tmp_path, scene):
    out = tmp_path / "labels.tif"
    with pytest.raises(RuntimeError, match="boom"):
        with LabelRasterWriter(out, scene, ["a", "b"], [(1, 2, 3), (4, 5, 6)]) as writer:
            writer.write(Window(0, 0, 10, 10), np.ones((10, 10), np.uint8))
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scene.tif"]


def test_label_raster_of_a_plain_scene_and_many_classes(tmp_path):
    with make_scene(tmp_path / "plain.tif", crs=None) as plain:
        names = [f"c{i}" for i in range(300)]
        writer = LabelRasterWriter(tmp_path / "many.tif", plain, names, [(9, 8, 7)], nodata=300)
        full = np.arange(H * W, dtype=np.int64).reshape(H, W) % 300
        writer.write(Window(0, 0, H, W), full)
        with pytest.raises(ValueError, match="shape"):
            writer.write(Window(0, 0, 5, 5), full)
        assert writer.close() == tmp_path / "many.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(tmp_path / "many.tif") as ds:
            assert ds.dtypes[0] == "uint16" and ds.crs is None and ds.nodata == 300
            assert np.array_equal(ds.read(1), full)
            assert ds.colormap(1)[0] == (9, 8, 7, 255) and ds.tags()["CLASS_299"] == "c299"
