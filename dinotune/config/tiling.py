"""Options of tiled prediction (``predict --tile``), shared by the tasks whose outputs lie on the image
(detection, instance and semantic segmentation): one flag set, one meaning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dinotune.config.base import opt

MergeChoice = Literal["nms", "union"]
CoordsChoice = Literal["lonlat", "crs"]


@dataclass
class TilePredictOptions:
    """``predict --tile``: a scene (GeoTIFF, ``.npy``) or a large picture predicted window by window."""

    tile: str = opt("", "predict in TILE x TILE windows read from disk as needed (GeoTIFF / .npy scenes of any size, "
                    "large photos), merged into one result per image; auto = the tile a run trained from a scene "
                    "used, else its --image-size",
                    metavar="TILE|auto", default_text="off: the whole image resized")
    overlap: float = opt(0.2, "--tile: fraction of a tile shared with its neighbours (objects cut by one tile's border "
                         "are whole in the next)", ge=0, lt=1)


@dataclass
class TiledBoxOptions(TilePredictOptions):
    """``predict --tile`` of tasks whose results are boxes (and masks) merged across seams, written as GeoJSON."""

    merge: MergeChoice = opt(
        "nms", "--tile: how duplicates across tile seams are resolved. nms = class-wise NMS by intersection "
        "over the smaller box (>= 0.5), keeping the best-scoring view (a box cut at a seam lies inside the whole one); "
        "union = the same matches merged into their union box with the best score (joins an object split between "
        "tiles, but may join touching neighbours)")
    coords: CoordsChoice = opt(
        "lonlat", "GeoJSON output of a georeferenced scene: lonlat = longitude/latitude (EPSG:4326, as RFC 7946 "
        "wants); crs = the scene's own coordinate system, named in the file. Scenes without one give pixels")


def parse_tile(value: str | int, image_size: int) -> int:
    """``--tile``'s value in pixels: 0 (off) for an empty value, the run's training size for ``auto``,
    else a positive whole number (ConfigError otherwise)."""
    from dinotune.errors import ConfigError

    text = str(value).strip().lower()
    if text in ("", "0", "off"):
        return 0
    if text == "auto":
        return int(image_size)
    try:
        tile = int(text)
    except ValueError:
        raise ConfigError(f"--tile {value!r}: a tile size in pixels (e.g. 512) or auto") from None
    if tile < 16:
        raise ConfigError(f"--tile {value!r}: tiles must be at least 16 pixels")
    return tile
