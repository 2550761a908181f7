"""Vector labels on a scene: reprojection lands on the right pixels (checked against pyproj and
rasterio independently), the CRS rules refuse what cannot be placed, and what is left out is
counted and named."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

rasterio = pytest.importorskip("rasterio")
pyogrio = pytest.importorskip("pyogrio")
shapely = pytest.importorskip("shapely")
pyproj = pytest.importorskip("pyproj")

from rasterio.transform import from_origin, rowcol, xy  # noqa: E402

from dinotune.errors import DataError  # noqa: E402
from dinotune.geo.scene import open_scene  # noqa: E402
from dinotune.geo.vectors import read_vector_labels  # noqa: E402

H, W = 200, 300
TRANSFORM = from_origin(500000, 4000000, 10, 10)


def make_scene(path, crs="EPSG:32633"):
    profile = dict(driver="GTiff", height=H, width=W, count=1, dtype="uint8")
    if crs:
        profile.update(crs=crs, transform=TRANSFORM)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(np.zeros((1, H, W), np.uint8))
    return open_scene(path)


@pytest.fixture
def scene(tmp_path):
    with make_scene(tmp_path / "scene.tif") as s:
        yield s


def ground(x, y):
    """The UTM coordinates of pixel corner (x = column, y = row), by rasterio."""
    gx, gy = xy(TRANSFORM, y, x, offset="ul")
    return float(gx), float(gy)


def utm_corners(x0, y0, x1, y1):
    """The UTM corners of a pixel rectangle."""
    return [ground(x, y) for x, y in [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]]


def to_crs(points, crs):
    t = pyproj.Transformer.from_crs("EPSG:32633", crs, always_xy=True)
    return [t.transform(x, y) for x, y in points]


def feature(coords, props, kind="Polygon"):
    geometry = {"type": kind, "coordinates": [coords + coords[:1]] if kind == "Polygon" else coords}
    return {"type": "Feature", "properties": props, "geometry": geometry}


def write_geojson(path, features, crs_member=None):
    doc = {"type": "FeatureCollection", "features": features}
    if crs_member:
        doc["crs"] = {"type": "name", "properties": {"name": crs_member}}
    path.write_text(json.dumps(doc))
    return path


def write_ogr(path, polygons, classes, crs, driver):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "'crs' was not provided": on purpose
        pyogrio.raw.write(path, shapely.to_wkb(np.array(polygons, dtype=object)), [np.array(classes, dtype=object)],
                          ["class"], driver=driver, geometry_type="Polygon", crs=crs)
    return path


def test_lonlat_polygon_lands_on_the_right_pixels(tmp_path, scene):
    lonlat = to_crs(utm_corners(50.25, 20.5, 80.75, 60.0), "EPSG:4326")
    path = write_geojson(tmp_path / "l.geojson", [feature([list(p) for p in lonlat], {"class": "field"})])
    labels = read_vector_labels(path, scene)
    assert labels.classes == ["field"] and labels.reprojected and labels.source_crs == "EPSG:4326"
    got = np.array(labels.geometries[0].exterior.coords)[:4]
    # independently: lon/lat -> UTM with pyproj, UTM -> row/col with rasterio
    to_utm = pyproj.Transformer.from_crs("EPSG:4326", "EPSG:32633", always_xy=True)
    xs, ys = to_utm.transform([p[0] for p in lonlat], [p[1] for p in lonlat])
    rows, cols = rowcol(TRANSFORM, xs, ys)
    assert np.array_equal(np.floor(got[:, 1]).astype(int), rows) and np.array_equal(
        np.floor(got[:, 0]).astype(int), cols)
    assert np.allclose(got, [(50.25, 20.5), (80.75, 20.5), (80.75, 60.0), (50.25, 60.0)], atol=1e-3)
    assert "reprojected from EPSG:4326 to EPSG:32633" in labels.summary()


def test_geopackage_in_web_mercator_is_reprojected(tmp_path, scene):
    poly = shapely.Polygon(to_crs(utm_corners(10, 10, 40, 30), "EPSG:3857"))
    path = write_ogr(tmp_path / "l.gpkg", [poly], ["roof"], "EPSG:3857", "GPKG")
    labels = read_vector_labels(path, scene)
    assert labels.reprojected and labels.source_crs == "EPSG:3857" and labels.classes == ["roof"]
    assert shapely.box(10, 10, 40, 30).symmetric_difference(labels.geometries[0]).area < 1e-2
    assert "reprojected from EPSG:3857 to EPSG:32633" in labels.summary()


def test_same_crs_is_not_reprojected(tmp_path, scene):
    path = write_ogr(tmp_path / "l.gpkg", [shapely.Polygon(utm_corners(1, 2, 3, 4))], ["a"], "EPSG:32633", "GPKG")
    labels = read_vector_labels(path, scene)
    assert not labels.reprojected and labels.geometries[0].symmetric_difference(shapely.box(1, 2, 3, 4)).area < 1e-9


def test_shapefile_without_prj_is_refused_by_name(tmp_path, scene):
    path = write_ogr(tmp_path / "noprj.shp", [shapely.Polygon(utm_corners(1, 2, 3, 4))], ["a"], None,
                     "ESRI Shapefile")
    (tmp_path / "noprj.prj").unlink(missing_ok=True)
    with pytest.raises(DataError, match=r"noprj\.shp.*no coordinate reference system.*\.prj"):
        read_vector_labels(path, scene)


def test_geojson_with_projected_coordinates_and_no_crs_member_is_refused(tmp_path, scene):
    utm = [list(p) for p in utm_corners(1, 2, 3, 4)]
    path = write_geojson(tmp_path / "utm.geojson", [feature(utm, {"class": "a"})])
    with pytest.raises(DataError, match=r"utm\.geojson.*not longitude/latitude and the file names no CRS"):
        read_vector_labels(path, scene)
    named = write_geojson(tmp_path / "named.geojson", [feature(utm, {"class": "a"})], "urn:ogc:def:crs:EPSG::32633")
    labels = read_vector_labels(named, scene)
    assert not labels.reprojected and len(labels.geometries) == 1


def test_outside_points_lines_invalid_and_missing_class(tmp_path, scene):
    def utm(x0, y0, x1, y1):
        return [list(p) for p in utm_corners(x0, y0, x1, y1)]

    bowtie = [list(ground(*p)) for p in [(10, 10), (20, 20), (20, 10), (10, 20)]]
    features = [
        feature(utm(-20, -20, 10, 10), {"class": "a"}),          # partly inside: kept whole
        feature(utm(400, 300, 500, 400), {"class": "a"}),        # outside
        feature(utm(-50, 0, 0, 10), {"class": "a"}),             # touches the left edge only: outside
        feature(list(ground(5, 5)), {"class": "a"}, "Point"),
        feature(utm(1, 1, 2, 1)[:2], {"class": "a"}, "LineString"),
        feature(bowtie, {"class": "b"}),                         # self-intersecting: repaired
        feature(utm(1, 1, 5, 5), {"class": None}),
    ]
    path = write_geojson(tmp_path / "mixed.geojson", features, "urn:ogc:def:crs:EPSG::32633")
    labels = read_vector_labels(path, scene)
    assert labels.outside == 2
    assert labels.classes == ["a", "b"]
    assert labels.geometries[0].bounds == pytest.approx((-20, -20, 10, 10))
    assert labels.geometries[1].is_valid and labels.geometries[1].area == pytest.approx(50)
    assert labels.skipped == ["feature 3: a Point geometry, not a polygon",
                              "feature 4: a LineString geometry, not a polygon",
                              "feature 6: no class (the field 'class' is empty)"]
    text = labels.summary()
    assert "2 feature(s) entirely outside the scene" in text and "3 feature(s) skipped: feature 3" in text


def test_class_field_auto_detection_and_run_classes(tmp_path, scene):
    utm = [list(p) for p in utm_corners(1, 1, 5, 5)]
    path = write_geojson(tmp_path / "l.geojson", [feature(utm, {"num": 1, "Label": v}) for v in ("tree", "car")],
                         "urn:ogc:def:crs:EPSG::32633")
    assert read_vector_labels(path, scene).classes == ["tree", "car"]
    labels = read_vector_labels(path, scene, classes=["background", "tree"])
    assert labels.classes == ["tree"]
    assert labels.skipped == ["feature 1: class 'car' is not one of the run's classes (background, tree)"]
    assert read_vector_labels(path, scene, class_field="NUM").classes == ["1", "1"]
    bare = write_geojson(tmp_path / "bare.geojson", [feature(utm, {"foo": 1, "bar": "x"})],
                         "urn:ogc:def:crs:EPSG::32633")
    with pytest.raises(DataError, match=r"bare\.geojson: no class field.*foo, bar"):
        read_vector_labels(bare, scene)
    with pytest.raises(DataError, match=r"no field 'kind'.*foo, bar"):
        read_vector_labels(bare, scene, class_field="kind")


def test_scene_without_crs_takes_pixels_and_refuses_a_crs(tmp_path):
    with make_scene(tmp_path / "plain.tif", crs=None) as plain:
        assert not plain.georeferenced
        pixels = write_geojson(tmp_path / "px.geojson", [feature([[250, 10], [400, 10], [400, 50], [250, 50]],
                                                                 {"class": "a"})])
        labels = read_vector_labels(pixels, plain)
        assert labels.source_crs is None and not labels.reprojected
        assert labels.geometries[0].equals(shapely.box(250, 10, 400, 50))  # pixels as given, kept whole
        assert "pixel coordinates" in labels.summary()
        gpkg = write_ogr(tmp_path / "utm.gpkg", [shapely.box(1, 1, 2, 2)], ["a"], "EPSG:32633", "GPKG")
        with pytest.raises(DataError, match=r"utm\.gpkg.*has no CRS, so labels in EPSG:32633 cannot be placed"):
            read_vector_labels(gpkg, plain)
        named = write_geojson(tmp_path / "ll.geojson", [feature([[1, 1], [2, 1], [2, 2]], {"class": "a"})],
                              "urn:ogc:def:crs:OGC:1.3:CRS84")
        with pytest.raises(DataError, match="cannot be placed"):
            read_vector_labels(named, plain)


def test_unreadable_and_missing_files_are_named(tmp_path, scene):
    bad = tmp_path / "broken.geojson"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"broken\.geojson: not a readable vector file"):
        read_vector_labels(bad, scene)
    with pytest.raises(DataError, match=r"nothere\.gpkg: no such label file"):
        read_vector_labels(tmp_path / "nothere.gpkg", scene)


def test_large_geojson_trusts_gdal_and_the_coordinates(tmp_path, scene, monkeypatch):
    # above the size limit the raw JSON is not parsed: the coordinates alone tell pixels from lon/lat
    monkeypatch.setattr("dinotune.geo.vectors.RAW_JSON_LIMIT", 0)
    utm = write_geojson(tmp_path / "utm.geojson", [feature([list(p) for p in utm_corners(1, 2, 3, 4)], {"class": "a"})])
    with pytest.raises(DataError, match=r"utm\.geojson.*not longitude/latitude"):
        read_vector_labels(utm, scene)
    with make_scene(tmp_path / "plain.tif", crs=None) as plain:
        px = write_geojson(tmp_path / "px.geojson", [feature([[200, 10], [250, 10], [250, 50]], {"class": "a"})])
        assert read_vector_labels(px, plain).source_crs is None
