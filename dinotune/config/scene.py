"""Training from a scene: the data-config fields shared by detection, instance and semantic
segmentation (``SceneDataFields``, mixed into their data sections, so ``dinotune train
detect|instance|segment`` take ``--labels``, ``--tile``, ...).

A scene is one large raster (GeoTIFF, ``.npy``, ...) given as ``--data`` with its labels as
``--labels``: vector polygons or boxes with a class property (GeoJSON, GeoPackage, shapefile), or for
semantic segmentation also a label raster aligned with the scene. Training tiles are cut from it on
the fly; the spatial split holds out whole blocks for validation (``--val-fraction`` of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dinotune.config.base import ConfigError, opt

# What a scene file ends with: GDAL rasters read window by window (dinotune.geo.scene) and
# memory-mapped ``.npy``. Here, below the readers, so flags are checked before any file is opened.
SCENE_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img", ".npy")


@dataclass
class SceneDataFields:
    """Fields of a data section that trains from one scene (all inert unless ``labels`` or ``tile``
    is set and ``data`` is a scene file)."""

    labels: str = opt(
        "", "labels of a scene given as --data (a GeoTIFF, .vrt, .npy ...): vector polygons or boxes with a class "
        "property (GeoJSON, GeoPackage, shapefile; reprojected to the scene's CRS; a file without a CRS is refused); "
        "semantic segmentation also takes a label raster (GeoTIFF of class indices) aligned with the scene. Training "
        "tiles are cut from the scene on the fly", metavar="FILE", default_text="not a scene",
    )
    tile: int = opt(0, "side of the training tiles cut from a scene, in scene pixels (0 = the run's --image-size)",
                    ge=0)
    class_field: str = opt(
        "", "the vector labels' property holding the class", metavar="NAME",
        default_text="the first of class, label, category, class_name, name, type",
    )
    min_visible: float = opt(
        0.5, "scene tiles: an object cut by the tile's border is kept when at least this fraction of its area is "
        "inside, else dropped from that tile (detection, instance segmentation)", gt=0, le=1,
    )
    empty_rate: float = opt(
        0.1, "scene tiles: the fraction of training tiles without any object that are kept (the rest are drawn "
        "again)", ge=0, le=1,
    )
    block: int = opt(
        0, "scene: side of the blocks of the spatial train / validation split, in pixels; at least the tile "
        "(0 = 4 tiles). Validation tiles lie in held-out blocks, never beside a training tile", ge=0,
    )
    tiles_per_epoch: int = opt(
        0, "scene: training tiles per epoch (0 = as many as the grid tiles of the training blocks that are kept)",
        ge=0,
    )
    tile_sampling: Literal["random", "grid"] = opt(
        "random", "scene: training tiles at random positions inside the training blocks (fresh every epoch), or the "
        "tiles of a grid over them",
    )

    def scene_requested(self) -> bool:
        """The user asked to train from a scene (``--labels`` or ``--tile``)."""
        return bool(self.labels) or self.tile > 0

    def check_scene(self, others: dict[str, Any]) -> None:
        """ConfigError for flags that do not go with a scene: ``others`` maps each such flag to its
        value (a non-default value is refused), and ``--labels`` / ``--tile`` without a scene file."""
        if not self.scene_requested():
            return
        data = str(getattr(self, "data", ""))  # the data section's own field
        if data and Path(data).suffix.lower() not in SCENE_SUFFIXES:
            flag = "--labels" if self.labels else "--tile"
            raise ConfigError(f"{flag} trains from a scene, but --data {data} is not a scene file (a GeoTIFF, "
                              f".vrt, .jp2, .img or .npy); leave {flag} out for a dataset folder")
        for flag, value in others.items():
            if value:
                raise ConfigError(f"{flag} {value} does not apply to training from a scene (--labels / --tile): "
                                  "its tiles are cut from the scene and validated on held-out blocks "
                                  "(--val-fraction)")
