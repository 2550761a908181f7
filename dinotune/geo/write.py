"""Georeferenced outputs of a scene: predictions as GeoJSON (``write_geojson``) and a one-band label
GeoTIFF written window by window (``LabelRasterWriter``), so a prediction over a scene larger than
memory lands in GIS software on the right ground, with its classes, colours and settings.

Both are written atomically: under a temporary name in the same folder, moved into place at the end.
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from dinotune.geo.scene import Scene, Window, gdal_env, require_geo
from dinotune.utils import atomic_write_text

# decimals kept: 7 of a degree is ~1 cm; 3 of a metre or a pixel is well below any label's precision
LONLAT_DECIMALS = 7
PLANAR_DECIMALS = 3
BLOCK = 256
_MAX_DESCRIPTION = 1000


def pixel_box(x0: float, y0: float, x1: float, y1: float) -> Any:
    """The rectangle ``x0..x1`` (columns) by ``y0..y1`` (rows) in pixels, a shapely Polygon."""
    from shapely.geometry import box

    return box(x0, y0, x1, y1)


def write_geojson(path: str | Path, features: Sequence[dict], scene: Scene,
                  coords: Literal["crs", "lonlat"] = "lonlat", properties: dict | None = None) -> int:
    """Write ``geojson_document(features, scene, coords, properties)`` at ``path`` (atomically);
    returns how many features it holds."""
    doc = geojson_document(features, scene, coords, properties)
    atomic_write_text(Path(path), json.dumps(doc, default=json_default, separators=(",", ":")) + "\n")
    return len(doc["features"])


def geojson_document(features: Sequence[dict], scene: Scene, coords: Literal["crs", "lonlat"] = "lonlat",
                     properties: dict | None = None) -> dict[str, Any]:
    """``features`` as a GeoJSON FeatureCollection (a dict, ready for ``json.dumps``).

    Each feature is ``{"geometry": shapely geometry in the scene's pixels, "properties": {...}}``.
    On a georeferenced scene the geometry goes through ``scene.transform`` to the scene's CRS, then:
      - ``coords="lonlat"``: to longitude/latitude (EPSG:4326, x = longitude), RFC 7946, no ``crs``
        member, polygons counter-clockwise;
      - ``coords="crs"``: kept in the scene's CRS, named by the legacy (GeoJSON 2008) member
        ``"crs": {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::<code>"}}`` that GDAL
        and QGIS read; a CRS without an EPSG code is written as WKT in the non-standard top-level
        member ``"crs_wkt"`` instead (GDAL ignores it: such a file reads as having no CRS).
    A scene without georeferencing keeps pixel coordinates whatever ``coords`` says, with the
    top-level member ``"coordinates": "pixels"`` and no ``crs``. ``properties`` (the settings, e.g.
    ``{"tile": 416, "overlap": 0.25, "merge": "nms"}``) is written as the top-level member
    ``"properties"``.
    """
    if coords not in ("crs", "lonlat"):
        raise ValueError(f"coords must be 'crs' or 'lonlat', got {coords!r}")
    require_geo("writing GeoJSON")
    import pyproj
    import shapely
    from shapely.affinity import affine_transform
    from shapely.geometry import mapping

    geoms = np.array([f["geometry"] for f in features], dtype=object)
    doc: dict[str, Any] = {"type": "FeatureCollection"}
    decimals = PLANAR_DECIMALS
    if scene.georeferenced:
        t = scene.transform
        matrix = [t.a, t.b, t.d, t.e, t.c, t.f]  # affine's order -> shapely's
        geoms = np.array([None if g is None else affine_transform(g, matrix) for g in geoms], dtype=object)
        crs = pyproj.CRS.from_user_input(scene.crs)
        if coords == "lonlat":
            transformer = pyproj.Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
            geoms = shapely.transform(geoms, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))
            decimals = LONLAT_DECIMALS
        else:
            code = crs.to_epsg()
            if code is not None:
                doc["crs"] = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{code}"}}
            else:
                doc["crs_wkt"] = crs.to_wkt()
        # the pixel -> ground flip of the y axis reverses rings; RFC 7946 wants exteriors counter-clockwise
        geoms = shapely.orient_polygons(geoms, exterior_cw=False)
    else:
        doc["coordinates"] = "pixels"
    geoms = shapely.transform(geoms, lambda xy: np.round(xy, decimals))
    if properties is not None:
        doc["properties"] = properties
    doc["features"] = [{"type": "Feature", "properties": dict(f.get("properties") or {}),
                        "geometry": None if g is None else mapping(g)} for f, g in zip(features, geoms)]
    return doc


def json_default(obj: Any) -> Any:
    """numpy scalars and arrays, paths: as JSON values."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def default_colours(num_classes: int, nodata: int | None = None,
                    colours: Sequence[tuple[int, int, int]] | None = None) -> np.ndarray:
    """``num_classes x 3`` uint8 colours: ``colours`` first, then the Pascal VOC map (the colours of
    dinotune's mask pictures, ``nodata`` white), past 256 classes fixed random colours (seed 0)."""
    from dinotune.viz.segmentation import palette

    given = [] if colours is None else [tuple(int(v) for v in c) for c in colours]
    for c in given:
        if len(c) != 3 or not all(0 <= v <= 255 for v in c):
            raise ValueError(f"a colour is (r, g, b), each 0..255; got {c}")
    ignore = nodata if nodata is not None and 0 <= nodata < 256 else None
    voc = palette(256, ignore_index=ignore, colours=given[:256] or None).astype(np.int64)
    extra = np.random.default_rng(0).integers(0, 256, size=(max(num_classes - 256, 0), 3))
    out = np.concatenate([voc, extra])[:max(num_classes, 1)]
    n_given = min(len(given), num_classes)
    if n_given > 256:
        out[256:n_given] = given[256:n_given]
    return out.astype(np.uint8)


def label_raster_dtype(classes: int, nodata: int | None = None) -> np.dtype:
    """The label GeoTIFF's sample type: uint8, uint16 past 255 classes or for a ``nodata`` above 255."""
    big = classes > 255 or (nodata is not None and nodata > 255)
    return np.dtype(np.uint16 if big else np.uint8)


class LabelRasterWriter:
    """A one-band label GeoTIFF over ``scene``, written window by window (memory follows the window).

    The file has the scene's size, CRS and transform (none for a scene without georeferencing),
    uint8 labels (uint16 past 255 classes or for a ``nodata`` above 255), 256 x 256 DEFLATE tiles,
    BigTIFF when needed, a colour table (``colours``, default ``default_colours``), the class names
    as tags ``CLASS_<i>`` and in the band description, and ``tags`` (tile, overlap, merge, ...) as
    dataset tags. It is written under a hidden temporary name in the same folder and moved to
    ``path`` by ``close``; ``abort`` (or an exception inside ``with``) removes it. Pixels never
    written read as ``nodata`` (0 without one).
    """

    def __init__(self, path: str | Path, scene: Scene, class_names: Sequence[str],
                 colours: Sequence[tuple[int, int, int]] | None = None, nodata: int | None = None,
                 tags: dict | None = None):
        require_geo("writing a label GeoTIFF")
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning

        if not class_names:
            raise ValueError("a label raster needs at least one class name")
        self.path, self.scene = Path(path).expanduser(), scene
        self.dtype = label_raster_dtype(len(class_names), nodata)
        if nodata is not None and not 0 <= nodata <= np.iinfo(self.dtype).max:
            raise ValueError(f"nodata {nodata} does not fit {self.dtype}")
        if nodata is not None and nodata < len(class_names):
            raise ValueError(f"nodata {nodata} is the label of class '{class_names[nodata]}'; pick one above "
                             f"{len(class_names) - 1}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.parent / f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp"
        profile = dict(driver="GTiff", width=scene.width, height=scene.height, count=1, dtype=self.dtype.name,
                       tiled=True, blockxsize=BLOCK, blockysize=BLOCK, compress="deflate", predictor=2,
                       BIGTIFF="IF_SAFER", nodata=nodata)
        if scene.georeferenced:
            profile.update(crs=scene.crs, transform=scene.transform)
        with warnings.catch_warnings(), gdal_env():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            self._dst = rasterio.open(self._tmp, "w", **profile)
        try:
            table = default_colours(len(class_names), nodata, colours)
            cmap = {i: (*map(int, rgb), 255) for i, rgb in enumerate(table)}
            if nodata is not None:
                cmap[nodata] = (255, 255, 255, 0)  # transparent: no prediction there
            self._dst.write_colormap(1, cmap)
            self._dst.update_tags(**{f"CLASS_{i}": str(n) for i, n in enumerate(class_names)})
            self._dst.update_tags(**{str(k): str(v) for k, v in (tags or {}).items()})
            desc = "labels: " + ", ".join(f"{i}={n}" for i, n in enumerate(class_names))
            self._dst.set_band_description(1, desc if len(desc) <= _MAX_DESCRIPTION
                                           else desc[:_MAX_DESCRIPTION - 3] + "...")
        except BaseException:
            self.abort()
            raise
        self._done = False

    def write(self, window: Window, labels: np.ndarray) -> None:
        """Write ``labels`` (``window.height x window.width`` integers) at ``window``, in any order;
        the parts of the window outside the scene are clipped off (tile grids reach past the edge)."""
        from rasterio.windows import Window as RioWindow

        labels = np.asarray(labels)
        if labels.shape != (window.height, window.width):
            raise ValueError(f"labels of shape {labels.shape} for a {window.height} x {window.width} window")
        if labels.dtype.kind not in "iub":
            raise ValueError(f"labels are integers, got {labels.dtype}")
        inside = window.clip(self.scene.height, self.scene.width)
        if not (inside.height and inside.width):
            return
        r, c = inside.row - window.row, inside.col - window.col
        part = labels[r: r + inside.height, c: c + inside.width]
        if part.size and (part.min() < 0 or part.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"labels {part.min()}..{part.max()} do not fit {self.dtype} in {self.path.name}")
        with gdal_env():  # dirty blocks count against the bounded cache too
            self._dst.write(part.astype(self.dtype, copy=False), 1,
                            window=RioWindow(inside.col, inside.row, inside.width, inside.height))

    def close(self) -> Path:
        """Finish the file and move it to ``path``; returns ``path``."""
        if not self._done:
            try:
                with gdal_env():
                    self._dst.close()
                os.replace(self._tmp, self.path)
            except BaseException:
                self.abort()
                raise
            self._done = True
        return self.path

    def abort(self) -> None:
        """Drop the file: nothing is left at ``path`` or under the temporary name."""
        try:
            if not self._dst.closed:
                self._dst.close()
        finally:
            self._tmp.unlink(missing_ok=True)
            self._done = True

    def __enter__(self) -> "LabelRasterWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
