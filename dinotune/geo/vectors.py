"""Vector labels (GeoJSON, GeoPackage, shapefile: any OGR format) placed in a scene's pixels.

A label file in another CRS than the scene is reprojected (and says so); one with no CRS is
refused by name when the scene is georeferenced; labels outside the scene are counted and
reported; a scene without a CRS takes labels in pixel coordinates. Geometries come back as
shapely polygons in the scene's pixel coordinates (x = column, y = row, pixel corners: the scene's
top-left corner is (0, 0)), kept whole: clipping to tiles happens later.

GDAL reports a GeoJSON without a ``crs`` member as EPSG:4326 (RFC 7946), so a GeoJSON is looked at
twice: its coordinates must then be longitude/latitude, and on a scene without a CRS such a file
is taken as pixels.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dinotune.errors import DataError
from dinotune.geo.scene import Scene, require_geo

# the class property when none is named, first match wins (case-insensitive)
AUTO_CLASS_FIELDS = ("class", "label", "category", "class_name", "name", "type")
# the raw JSON is parsed (to see whether it names a CRS) only below this size; above, GDAL is trusted
RAW_JSON_LIMIT = 200 * 1024 ** 2
_GEOJSON_DRIVERS = {"GeoJSON", "GeoJSONSeq"}
_SHOWN_SKIPS = 3


@dataclass
class VectorLabels:
    """Polygons of one label file in a scene's pixels.

    Attributes:
        geometries: shapely Polygon / MultiPolygon, pixel coordinates (x = column, y = row, float).
        classes: the class name of each geometry (``str`` of the class property's value).
        source: the label file.
        source_crs: the file's CRS as text (``"EPSG:4326"``); None when taken as pixels.
        reprojected: the labels were in another CRS than the scene's and were reprojected.
        outside: features entirely outside the scene (dropped).
        skipped: ``"feature <i>: <reason>"`` per feature left out for another reason.
        scene_crs: the scene's CRS as text, None without one.
    """

    geometries: list
    classes: list[str]
    source: Path
    source_crs: str | None
    reprojected: bool
    outside: int = 0
    skipped: list[str] = field(default_factory=list)
    scene_crs: str | None = None

    def summary(self) -> str:
        """What was read, for a person: the file, polygons per class, reprojection, what was left out."""
        counts = Counter(self.classes)
        per_class = ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))
        lines = [f"{self.source}: {len(self.geometries)} polygon(s)" + (f" ({per_class})" if per_class else "")]
        if self.reprojected:
            lines.append(f"  reprojected from {self.source_crs} to {self.scene_crs}")
        elif self.source_crs is None:
            lines.append("  in pixel coordinates (the scene has no CRS)")
        else:
            lines.append(f"  in {self.source_crs}, the scene's CRS")
        if self.outside:
            lines.append(f"  {self.outside} feature(s) entirely outside the scene, dropped")
        if self.skipped:
            more = len(self.skipped) - _SHOWN_SKIPS
            shown = "; ".join(self.skipped[:_SHOWN_SKIPS]) + (f"; and {more} more" if more > 0 else "")
            lines.append(f"  {len(self.skipped)} feature(s) skipped: {shown}")
        return "\n".join(lines)


def read_vector_labels(path: str | Path, scene: Scene, class_field: str = "",
                       classes: Sequence[str] = ()) -> VectorLabels:
    """The polygons of ``path`` in ``scene``'s pixel coordinates, with their classes.

    ``class_field``: the property holding the class; "" picks the first of ``AUTO_CLASS_FIELDS``
    present. ``classes``: a run's class names; a value outside them is skipped and named (not a new
    class). Raises DataError (naming the file) when it cannot be read, has no class field, has no
    CRS while the scene has one, or has a CRS while the scene has none.
    """
    require_geo("reading vector labels")
    import pyogrio
    import shapely

    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such label file")
    try:
        info = pyogrio.read_info(path)
        fname = _class_field(path, list(info["fields"]), class_field)
        meta, _, wkb, values = pyogrio.raw.read(path, columns=[fname])
    except DataError:
        raise
    except Exception as exc:  # pyogrio raises DataSourceError, DataLayerError, ... for unreadable files
        raise DataError(f"{path}: not a readable vector file ({exc})") from None
    geoms = shapely.force_2d(shapely.from_wkb(wkb))
    label_crs = _label_crs(path, info.get("driver", ""), meta.get("crs"), scene, geoms)
    geoms, source_crs, reprojected = _to_pixels(path, scene, label_crs, geoms)

    scene_box = shapely.box(0, 0, scene.width, scene.height)
    out = VectorLabels([], [], path, source_crs, reprojected, scene_crs=_scene_crs_text(scene))
    allowed = set(classes)
    for i, (geom, value) in enumerate(zip(geoms, values[0])):
        name = _class_name(value)
        polygon, reason = _polygonal(geom)
        if reason is None and name is None:
            reason = f"no class (the field '{fname}' is empty)"
        elif reason is None and allowed and name not in allowed:
            reason = f"class '{name}' is not one of the run's classes ({_listed(classes)})"
        if reason is not None:
            out.skipped.append(f"feature {i}: {reason}")
        elif not polygon.intersects(scene_box) or polygon.touches(scene_box):
            out.outside += 1
        else:
            out.geometries.append(polygon)
            out.classes.append(name)
    return out


def _class_field(path: Path, fields: list[str], wanted: str) -> str:
    """The field named ``wanted`` (exact, else case-insensitive), or the first auto field present."""
    by_lower = {f.lower(): f for f in reversed(fields)}  # reversed: the first spelling wins
    if wanted:
        if wanted in fields:
            return wanted
        if wanted.lower() in by_lower:
            return by_lower[wanted.lower()]
        raise DataError(f"{path}: no field '{wanted}' for the class; its fields are {_listed(fields)}")
    for candidate in AUTO_CLASS_FIELDS:
        if candidate in by_lower:
            return by_lower[candidate]
    raise DataError(f"{path}: no class field (looked for {', '.join(AUTO_CLASS_FIELDS)}); its fields are "
                    f"{_listed(fields)}: name the one holding the class")


def _label_crs(path: Path, driver: str, crs: str | None, scene: Scene, geoms: np.ndarray) -> str | None:
    """The labels' CRS after the RFC 7946 default is seen through, or a DataError by the rules above."""
    import shapely

    bounds = shapely.total_bounds(geoms)
    # no geometry at all: nothing contradicts longitude/latitude
    lonlat = not np.all(np.isfinite(bounds)) or (max(abs(bounds[0]), abs(bounds[2])) <= 180
                                                 and max(abs(bounds[1]), abs(bounds[3])) <= 90)
    if crs is not None and driver in _GEOJSON_DRIVERS and _is_wgs84(crs):
        def names_crs() -> bool | None:  # parsed only when it matters: not for lon/lat on a georeferenced scene
            return _geojson_names_crs(path) if driver == "GeoJSON" else False  # a sequence has no crs member

        if scene.georeferenced and not lonlat and not names_crs():
            raise DataError(f"{path}: has no coordinate reference system: its coordinates are not longitude/"
                            "latitude and the file names no CRS (add the GeoJSON's crs member, or write it in "
                            "longitude/latitude)")
        names = None if scene.georeferenced else names_crs()
        if not scene.georeferenced and (names is False or (names is None and not lonlat)):
            return None  # no crs member: GDAL's EPSG:4326 is only RFC 7946's default, these are pixels
    if scene.georeferenced:
        if crs is None:
            raise DataError(f"{path}: has no coordinate reference system, so its labels cannot be placed on "
                            f"{scene.path.name} ({_scene_crs_text(scene)}); give it one (a .prj beside the "
                            "shapefile, or the GeoJSON's crs member)")
        if not lonlat and _is_wgs84(crs):
            raise DataError(f"{path}: says {crs} but its coordinates are not longitude/latitude "
                            f"(they span {_bounds_text(bounds)}); fix the file's CRS")
    elif crs is not None:
        raise DataError(f"{path}: the scene {scene.path.name} has no CRS, so labels in {_crs_text(crs)} cannot be "
                        "placed; give labels in pixel coordinates (no CRS), or georeference the scene")
    return crs


def _geojson_names_crs(path: Path) -> bool | None:
    """Whether a GeoJSON file has a top-level ``crs`` member; None when too large to parse or unparseable."""
    try:
        if path.stat().st_size >= RAW_JSON_LIMIT:
            return None
        with open(path, "rb") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return isinstance(doc, dict) and doc.get("crs") is not None


def _to_pixels(path: Path, scene: Scene, crs: str | None, geoms: np.ndarray
               ) -> tuple[np.ndarray, str | None, bool]:
    """``geoms`` in the scene's pixels, the labels' CRS as text, and whether they were reprojected."""
    import pyproj
    import shapely
    from shapely.affinity import affine_transform

    if not scene.georeferenced:
        return geoms, None, False  # pixels already (the rules above refused a CRS)
    source, target = pyproj.CRS.from_user_input(crs), pyproj.CRS.from_user_input(scene.crs)
    reprojected = not _same_crs(source, target)
    if reprojected:
        transformer = pyproj.Transformer.from_crs(source, target, always_xy=True)
        geoms = shapely.transform(geoms, lambda xy: np.column_stack(transformer.transform(xy[:, 0], xy[:, 1])))
    inv = ~scene.transform
    matrix = [inv.a, inv.b, inv.d, inv.e, inv.c, inv.f]  # affine's order -> shapely's
    pixels = np.array([None if g is None else affine_transform(g, matrix) for g in geoms], dtype=object)
    return pixels, _crs_text(source), reprojected


def _same_crs(a: Any, b: Any) -> bool:
    """The same CRS, whatever the spelling (EPSG code, WKT from a .prj, axis order)."""
    if a.equals(b, ignore_axis_order=True):
        return True
    code_a, code_b = a.to_authority(min_confidence=90), b.to_authority(min_confidence=90)
    return code_a is not None and code_a == code_b


def _polygonal(geom: Any) -> tuple[Any, str | None]:
    """``(polygon or multipolygon, None)``, or ``(None, why it cannot be a label)``."""
    import shapely

    if geom is None:
        return None, "no geometry"
    kind = geom.geom_type
    if kind in ("Point", "MultiPoint", "LineString", "MultiLineString", "LinearRing"):
        return None, f"a {kind} geometry, not a polygon"
    if geom.is_empty:
        return None, "empty geometry"
    if not np.all(np.isfinite(shapely.bounds(geom))):
        return None, "coordinates that cannot be reprojected into the scene's CRS"
    why = None
    if not geom.is_valid:
        why = shapely.is_valid_reason(geom)
        geom = shapely.make_valid(geom)
    parts = [g for g in shapely.get_parts(geom) if g.geom_type in ("Polygon", "MultiPolygon") and not g.is_empty]
    polys = [p for g in parts for p in shapely.get_parts(g)]
    if not polys:
        return None, f"invalid geometry that cannot be repaired ({why})" if why else f"a {kind} without polygons"
    if len(polys) == 1:
        return polys[0], None
    # the polygons of a collection may overlap; a valid multipolygon's parts never do
    return (shapely.union_all(polys) if kind == "GeometryCollection" else shapely.MultiPolygon(polys)), None


def _class_name(value: Any) -> str | None:
    """The class as text; None for a missing value (null, NaN, blank)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)  # an integer column with nulls reads as floats: 3.0 is class "3"
    text = str(value).strip()
    return text or None


def _is_wgs84(crs: str) -> bool:
    import pyproj

    return pyproj.CRS.from_user_input(crs).equals(pyproj.CRS.from_epsg(4326), ignore_axis_order=True)


def _crs_text(crs: Any) -> str:
    """``"EPSG:32633"`` when the CRS has an authority code, else its name."""
    import pyproj

    crs = pyproj.CRS.from_user_input(crs)
    code = crs.to_authority(min_confidence=70)
    return f"{code[0]}:{code[1]}" if code else crs.name


def _scene_crs_text(scene: Scene) -> str | None:
    return _crs_text(scene.crs) if scene.georeferenced else None


def _bounds_text(bounds: np.ndarray) -> str:
    return f"x {bounds[0]:.6g}..{bounds[2]:.6g}, y {bounds[1]:.6g}..{bounds[3]:.6g}"


def _listed(names: Sequence[str], limit: int = 12) -> str:
    names = list(names)
    shown = ", ".join(str(n) for n in names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") if names else "(none)"
