"""Detection (and instance segmentation) records as a GeoJSON FeatureCollection: a polygon per object
(its mask's outline where it has one, else its box) in the scene's CRS or in longitude/latitude,
with its class, score and pixel box as properties. The records carry what the mapping needs
(``"georef"``: the scene's CRS and transform); images without one give pixel coordinates.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dinotune.errors import ConfigError


def _scene_of(record: Mapping[str, Any]) -> Any:
    """A ``geo.Scene`` standing for the record's image: its size and georeferencing, no pixels."""
    from dinotune.geo.scene import Scene

    georef = record.get("georef")
    crs = transform = None
    if georef:
        from rasterio.crs import CRS
        from rasterio.transform import Affine

        crs, transform = CRS.from_user_input(georef["crs"]), Affine(*georef["transform"])
    return Scene(Path(record["image"]), int(record["height"]), int(record["width"]), 0, np.uint8, crs=crs,
                 transform=transform)


def _geometry(detection: Mapping[str, Any]) -> Any:
    """The object's outline in pixels: its polygon segmentation's parts, else its box."""
    import shapely

    from dinotune.geo.write import pixel_box

    rings = detection.get("segmentation")
    if isinstance(rings, list) and rings:
        parts = [shapely.Polygon(np.asarray(r, float).reshape(-1, 2)) for r in rings if len(r) >= 6]
        parts = [p if p.is_valid else shapely.make_valid(p) for p in parts]
        if parts:
            return shapely.union_all(parts)
    x, y, w, h = detection["bbox"]
    return pixel_box(x, y, x + w, y + h)


def geojson_text(results: Sequence[Mapping[str, Any]], coords: str = "lonlat") -> str:
    """One FeatureCollection of every record's detections. Records of several images must agree on
    where they lie: all in longitude/latitude (``coords="lonlat"``, georeferenced scenes), all in
    one CRS, or all in pixels (one image). ConfigError otherwise."""
    from dinotune.geo.write import json_default, geojson_document

    docs = []
    for record in results:
        features = [{"geometry": _geometry(d), "properties": {
            "category": d["category"], "category_id": d["category_id"], "score": d["score"],
            "bbox_px": d["bbox"], **({"area_px": d["area"]} if "area" in d else {}),
            **({"image": record["image"]} if len(results) > 1 else {})}} for d in record["detections"]]
        settings = {"image": record["image"], **({"tiling": record["tiling"]} if record.get("tiling") else {})}
        docs.append(geojson_document(features, _scene_of(record), coords, settings))
    if not docs:
        return json.dumps({"type": "FeatureCollection", "features": []}) + "\n"
    frames = {json.dumps({k: d.get(k) for k in ("crs", "crs_wkt", "coordinates")}, sort_keys=True) for d in docs}
    if len(frames) > 1 or (len(docs) > 1 and docs[0].get("coordinates") == "pixels"):
        raise ConfigError("GeoJSON of several images that do not share one coordinate frame (pixels of different "
                          "images, or different CRSs): write one file per scene, or use --coords lonlat")
    doc = dict(docs[0])
    if len(docs) > 1:
        doc["properties"] = {"images": [d.get("properties") for d in docs]}
        doc["features"] = [f for d in docs for f in d["features"]]
    return json.dumps(doc, default=json_default, separators=(",", ":")) + "\n"
