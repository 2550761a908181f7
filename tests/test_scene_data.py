"""Tiles cut from a scene for training (``geo.sampling``, ``tasks/*/scene_data.py``), on a GeoTIFF the
tests make with rasterio (bright squares) and labels written in another CRS: a tile's targets are the
squares inside it (clipped, an object less visible than --min-visible dropped), empty tiles are kept
at the set rate, training and validation windows never overlap, a label raster gives the masks the
polygons give, and bad label files are reprojected, refused or counted, said by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dinotune.cli import main
from dinotune.config import build_config
from dinotune.errors import ConfigError, DataError
from dinotune.geo.sampling import LabelIndex, TileSampler, plan_scene
from dinotune.geo.scene import Window, open_scene
from dinotune.geo.vectors import read_vector_labels
from dinotune.tasks import get_task
from dinotune.utils import set_quiet
from tests.scene_helpers import make_scene, squares, write_geojson, write_vectors

pytest.importorskip("rasterio")
pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(model="random:tiny", image_size=56, tile=64, block=128, val_fraction=0.25, workers=0, device="cpu")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("scene")
    return make_scene(root / "scene.tif"), write_geojson(root / "labels.geojson", squares())


@pytest.fixture
def loud():
    """Info lines reach stderr (the suite runs quiet)."""
    set_quiet(False)
    yield
    set_quiet(True)


def expected_boxes(window: Window, min_visible: float) -> set[tuple]:
    """The squares inside ``window`` as the tile should see them: ``(class, x0, y0, x1, y1)`` in tile pixels."""
    out = set()
    for name, r, c, s in squares():
        x0, y0 = max(c, window.col), max(r, window.row)
        x1, y1 = min(c + s, window.col + window.width), min(r + s, window.row + window.height)
        if x1 <= x0 or y1 <= y0 or (x1 - x0) * (y1 - y0) / (s * s) < min_visible:
            continue
        out.add((name, x0 - window.col, y0 - window.row, x1 - window.col, y1 - window.row))
    return out


def item_boxes(target: dict, names: list[str], tile: int) -> set[tuple]:
    """An item's boxes back in tile pixels (normalised cxcywh on a canvas the tile fills)."""
    out = set()
    for (cx, cy, w, h), label in zip(target["boxes"].tolist(), target["labels"].tolist()):
        box = [round(v * tile, 3) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)]
        out.add((names[label], *box))
    return out


def build(task: str, **options):
    cfg = build_config(task, None, **{**SMALL, **options})
    cfg.validate()
    return cfg, get_task(cfg).build_data(None, 14)


def test_detection_targets_are_the_squares_inside_each_tile(scene):
    image, labels = scene
    # 0.45: no square's visible share is near it (whole pixels of 16 x 16), so reprojection's rounding cannot tip it
    cfg, data = build("detect", data=str(image), labels=str(labels), augment=False, min_visible=0.45)
    names = data.meta["class_names"]
    assert names == ["house", "pool"] and data.meta["scene"]["val_blocks"] == 1
    for i in range(len(data.val)):  # the validation grid: fixed tiles, whole squares
        _, target = data.val[i]
        assert item_boxes(target, names, 64) == expected_boxes(data.val.windows[i], 0.45)
    torch.manual_seed(0)
    cut = 0
    for i in range(40):  # random windows: squares cut by the border, kept or dropped by --min-visible
        _, target = data.train[i % len(data.train)]
        window = data.train.windows[i % len(data.train)]
        assert item_boxes(target, names, 64) == expected_boxes(window, 0.45)
        cut += len(expected_boxes(window, 0.01) - expected_boxes(window, 1.0))
    assert cut  # some squares were cut


def test_min_visible_drops_an_object_cut_too_far(scene):
    image, labels = scene
    with open_scene(image) as s:
        found = read_vector_labels(labels, s)
        index = LabelIndex(found.geometries, [0] * len(found.geometries), s.height, s.width)
    # the square at rows 8..24, columns 8..24: 12 of its 16 columns inside, then 4
    kept = index.clip(Window(0, 12, 30, 30), 0.5)
    assert [tuple(round(v, 6) for v in o.box) for o in kept] == [(0.0, 8.0, 12.0, 24.0)]
    assert kept[0].visible == pytest.approx(0.75)
    assert index.clip(Window(0, 20, 30, 30), 0.5) == []
    assert len(index.clip(Window(0, 20, 30, 30), 0.2)) == 1


def test_empty_tiles_are_kept_at_the_set_rate(tmp_path):
    image = make_scene(tmp_path / "scene.tif")
    corner = [o for o in squares() if o[1] < 40 and o[2] < 40]  # one square: most tiles are empty
    labels = write_geojson(tmp_path / "corner.geojson", corner)
    with open_scene(image) as s:
        found = read_vector_labels(labels, s)
        index = LabelIndex(found.geometries, [0], s.height, s.width)
    plan = plan_scene(256, 256, 32, 128, 0.25, seed=1)
    sampler = TileSampler(plan, index.any_in, "random", 0.3, seed=0)
    rng = np.random.default_rng(0)
    drawn = [sampler.draw(rng) for _ in range(1500)]
    assert sampler.drawn_empty > 1000
    assert sampler.kept_empty / sampler.drawn_empty == pytest.approx(0.3, abs=0.04)
    empty = sum(1 for w in drawn if not index.any_in(w))
    assert empty == sampler.kept_empty  # every empty tile returned was one kept at the rate
    fine = plan_scene(256, 256, 8, 128, 0.25, seed=1)  # 768 training grid tiles, for a rate to be seen
    grid = TileSampler(fine, index.any_in, "grid", 0.3, seed=0)
    assert grid.full_grid >= 1 and grid.empty_grid > 700
    assert (len(grid.kept) - grid.full_grid) / grid.empty_grid == pytest.approx(0.3, abs=0.06)
    none = TileSampler(plan, index.any_in, "grid", 0.0, seed=0)
    assert all(index.any_in(w) for w in none.windows())


def test_training_and_validation_windows_never_overlap():
    plan = plan_scene(300, 260, 40, 100, 0.3, seed=3)
    assert plan.val_blocks and plan.train_blocks
    val = plan.val_grid()
    rng = np.random.default_rng(0)
    train = plan.train_grid() + [plan.random_window(rng) for _ in range(2000)]

    def overlap(a: Window, b: Window) -> bool:
        return a.row < b.row + b.height and b.row < a.row + a.height and a.col < b.col + b.width and b.col < a.col + a.width

    for w in train:  # wholly inside one training block (inside the scene: windows may reach past its edge)
        assert any(overlap(w.clip(300, 260), b) and b.row <= w.row and b.col <= w.col and
                   min(w.row + w.height, 300) <= b.row + b.height and min(w.col + w.width, 260) <= b.col + b.width
                   for b in plan.train_blocks), w
        assert not any(overlap(w.clip(300, 260), v.clip(300, 260)) for v in val)
    assert plan_scene(300, 260, 40, 100, 0.3, seed=3).val_blocks == plan.val_blocks  # the seed decides it
    with pytest.raises(ConfigError, match="--block 30 is smaller than the tile"):
        plan_scene(300, 260, 40, 30, 0.3, seed=3)


def test_segment_masks_from_polygons_and_from_a_label_raster_agree(scene, tmp_path):
    import rasterio

    image, labels = scene
    _, data = build("segment", data=str(image), labels=str(labels), tile_sampling="grid", augment=False)
    assert data.meta["class_names"] == ["background", "house", "pool"]
    with rasterio.open(image) as src:  # the label raster of the same squares, on the scene's grid
        profile = dict(src.profile, count=1, dtype="uint8")
    raster = np.zeros((256, 256), dtype=np.uint8)
    for name, r, c, s in squares():
        raster[r: r + s, c: c + s] = 1 if name == "house" else 2
    with rasterio.open(tmp_path / "labels.tif", "w", **profile) as dst:
        dst.write(raster[None])
    _, from_raster = build("segment", data=str(image), labels=str(tmp_path / "labels.tif"), tile_sampling="grid",
                           augment=False, class_names=["background", "house", "pool"])
    for i in range(len(data.val)):
        a, b = data.val[i], from_raster.val[i]
        w = data.val.windows[i]
        assert torch.equal(a["mask"], b["mask"])
        assert torch.equal(a["mask"], torch.from_numpy(raster[w.row: w.row + 64, w.col: w.col + 64]).long())


def test_band_scene_gets_per_band_statistics_from_training_windows(tmp_path):
    image = make_scene(tmp_path / "bands.tif", bands=5, dtype="uint16")
    labels = write_geojson(tmp_path / "labels.geojson", squares())
    _, data = build("detect", data=str(image), labels=str(labels))
    spec = data.meta["input"]
    assert spec["arrays"] and spec["in_channels"] == 5 and len(spec["mean"]) == 5
    assert spec["mean"][4] > spec["mean"][0] + 300  # band b holds 100 * b more (scene_helpers)
    image_tensor, _ = data.val[0]
    assert image_tensor.shape == (5, 56, 56) and image_tensor.dtype == torch.float32


def test_labels_in_another_crs_are_reprojected_and_said(scene, tmp_path, capsys, loud):
    image, _ = scene
    gpkg = write_vectors(tmp_path / "labels.gpkg", squares(), "EPSG:3857")
    _, data = build("detect", data=str(image), labels=str(gpkg))
    err = capsys.readouterr().err
    assert "reprojected from EPSG:3857 to EPSG:32633" in err
    assert data.meta["class_names"] == ["house", "pool"]
    _, target = data.val[0]
    assert item_boxes(target, data.meta["class_names"], 64) == expected_boxes(data.val.windows[0], 0.5)


def test_labels_without_a_crs_are_refused_by_name(scene, tmp_path, capsys):
    image, _ = scene
    shp = write_vectors(tmp_path / "nocrs.shp", squares(), None)
    with pytest.raises(DataError, match="nocrs.shp: has no coordinate reference system"):
        build("detect", data=str(image), labels=str(shp))
    assert main(["train", "segment", "--data", str(image), "--labels", str(shp), "--out", str(tmp_path / "run"),
                 "--model", "random:tiny", "--image-size", "56", "--device", "cpu"]) != 0
    assert "nocrs.shp: has no coordinate reference system" in capsys.readouterr().err


def test_labels_outside_the_scene_are_counted(scene, tmp_path, capsys, loud):
    image, _ = scene
    outside = squares() + [("house", 300, 300, 16), ("pool", -50, 20, 16)]
    labels = write_geojson(tmp_path / "outside.geojson", outside)
    build("detect", data=str(image), labels=str(labels))
    assert "2 feature(s) entirely outside the scene" in capsys.readouterr().err


def test_scene_flags_that_do_not_fit_are_refused(scene, tmp_path):
    image, labels = scene
    with pytest.raises(ConfigError, match="is not a scene file"):
        build("detect", data=str(tmp_path), labels=str(labels))
    with pytest.raises(ConfigError, match="--subset 3 does not apply"):
        build("segment", data=str(image), labels=str(labels), subset=3)
    with pytest.raises(ConfigError, match="smaller than the tile"):
        build("detect", data=str(image), labels=str(labels), block=32)
