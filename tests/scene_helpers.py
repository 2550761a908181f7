"""Scenes the scene tests make with rasterio: a georeferenced GeoTIFF with bright squares (the objects)
and label files of those squares in any CRS (reprojected with pyproj from the pixel corners), and a
scene stitched from real EuroSAT-MS tiles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SCENE_CRS = "EPSG:32633"
ORIGIN = (500000.0, 5000000.0)  # x, y of the top-left corner in SCENE_CRS (metres), 1 m pixels
COLOURS = {"house": (230, 60, 40), "pool": (40, 90, 235)}


def squares(size: int = 256) -> list[tuple[str, int, int, int]]:
    """``(class, row, col, side)`` of the objects: a regular pattern of 16-pixel squares, two classes."""
    out = []
    for r in range(8, size - 16, 40):
        for c in range(8, size - 16, 40):
            out.append(("house" if (r // 40 + c // 40) % 2 else "pool", r, c, 16))
    return out


def make_scene(path: Path, size: int = 256, bands: int = 3, dtype: str = "uint8", seed: int = 0) -> Path:
    """A ``size x size`` GeoTIFF in ``SCENE_CRS`` with 1 m pixels: dark noise and bright squares
    (``squares``); 3-band uint8 (a picture) or ``bands`` of uint16 (band arrays)."""
    import rasterio
    from affine import Affine

    rng = np.random.default_rng(seed)
    image = rng.normal(40, 8, (size, size, 3))
    for name, r, c, s in squares(size):
        image[r: r + s, c: c + s] = COLOURS[name]
    image = np.clip(image, 0, 255)
    if dtype == "uint8":
        data = image.astype(np.uint8).transpose(2, 0, 1)
    else:
        data = np.stack([image[..., b % 3] * 10 + 100 * b for b in range(bands)]).astype(dtype)
    with rasterio.open(path, "w", driver="GTiff", height=size, width=size, count=data.shape[0], dtype=data.dtype,
                       crs=SCENE_CRS, transform=Affine(1.0, 0.0, ORIGIN[0], 0.0, -1.0, ORIGIN[1])) as ds:
        ds.write(data)
    return path


def pixel_polygon(row: float, col: float, height: float, width: float, crs: str) -> list[list[float]]:
    """The ring of a pixel rectangle's corners in ``crs`` (from the scene's own CRS with pyproj)."""
    from pyproj import Transformer

    corners = [(col, row), (col + width, row), (col + width, row + height), (col, row + height), (col, row)]
    xs = [ORIGIN[0] + x for x, _ in corners]
    ys = [ORIGIN[1] - y for _, y in corners]
    if crs != SCENE_CRS:
        xs, ys = Transformer.from_crs(SCENE_CRS, crs, always_xy=True).transform(xs, ys)
    return [[float(x), float(y)] for x, y in zip(xs, ys)]


def write_geojson(path: Path, objects: list[tuple[str, int, int, int]], crs: str = "EPSG:4326",
                  name_crs: bool | None = None) -> Path:
    """A GeoJSON of ``objects`` (``squares``' tuples) with a ``class`` property, coordinates in
    ``crs``; the file names its CRS unless it is longitude/latitude (RFC 7946's default), or as
    ``name_crs`` says."""
    features = [{"type": "Feature", "properties": {"class": name},
                 "geometry": {"type": "Polygon", "coordinates": [pixel_polygon(r, c, s, s, crs)]}}
                for name, r, c, s in objects]
    doc: dict = {"type": "FeatureCollection", "features": features}
    if name_crs if name_crs is not None else crs != "EPSG:4326":
        doc["crs"] = {"type": "name", "properties": {"name": crs}}
    path.write_text(json.dumps(doc))
    return path


def write_vectors(path: Path, objects: list[tuple[str, int, int, int]], crs: str | None) -> Path:
    """``objects`` as any OGR format by the file's suffix (``.gpkg``, ``.shp``) in ``crs`` (None: no CRS)."""
    import warnings

    import pyogrio
    import shapely

    geoms = [shapely.Polygon(pixel_polygon(r, c, s, s, crs or SCENE_CRS)) for _, r, c, s in objects]
    wkb = np.array([shapely.to_wkb(g) for g in geoms], dtype=object)
    with warnings.catch_warnings():  # pyogrio warns of a file without a CRS: that is the point of crs=None
        warnings.simplefilter("ignore", UserWarning)
        pyogrio.raw.write(path, wkb, field_data=[np.array([n for n, *_ in objects], dtype=object)], fields=["class"],
                          geometry_type="Polygon", crs=crs, driver=None)
    return path


def eurosat_scene(root: Path, out: Path, grid: int = 4) -> tuple[Path, Path, list[str]]:
    """A ``grid x grid`` mosaic of real EuroSAT-MS tiles (13-band uint16, 64 x 64, read with rasterio)
    written as one GeoTIFF, and a GeoJSON with one polygon per tile carrying the tile's class (its
    folder name). The tiles come from different UTM zones and places, so they cannot be mosaicked by
    their own transforms: they are placed side by side in a synthetic grid (10 m pixels in
    EPSG:32632), and the labels are written in that CRS. Returns ``(scene, labels, classes)``."""
    import rasterio
    from affine import Affine

    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    picked = [(classes[k % len(classes)], sorted((root / classes[k % len(classes)]).glob("*.tif"))[k // len(classes)])
              for k in range(grid * grid)]
    side = 64
    mosaic = np.zeros((13, grid * side, grid * side), dtype=np.uint16)
    features = []
    origin = (400000.0, 5600000.0)
    for k, (name, path) in enumerate(picked):
        r, c = divmod(k, grid)
        with rasterio.open(path) as ds:
            mosaic[:, r * side: (r + 1) * side, c * side: (c + 1) * side] = ds.read()
        x0, y0 = origin[0] + c * side * 10, origin[1] - r * side * 10
        ring = [[x0, y0], [x0 + side * 10, y0], [x0 + side * 10, y0 - side * 10], [x0, y0 - side * 10], [x0, y0]]
        features.append({"type": "Feature", "properties": {"class": name},
                         "geometry": {"type": "Polygon", "coordinates": [ring]}})
    scene = out / "eurosat_mosaic.tif"
    with rasterio.open(scene, "w", driver="GTiff", height=mosaic.shape[1], width=mosaic.shape[2], count=13,
                       dtype="uint16", crs="EPSG:32632", transform=Affine(10.0, 0.0, origin[0], 0.0, -10.0, origin[1])) as ds:
        ds.write(mosaic)
    labels = out / "eurosat_tiles.geojson"
    labels.write_text(json.dumps({"type": "FeatureCollection", "crs": {"type": "name", "properties":
                                                                           {"name": "EPSG:32632"}},
                                  "features": features}))
    return scene, labels, sorted({name for name, _ in picked})
