"""Instance segmentation from a scene: detection's scene tiles (``tasks/detect/scene_data.py``) with
each object's mask, the part of its polygon inside the tile in tile pixels: COCO polygons (one per
part), or an RLE rasterised with ``rasterio.features`` when the part has holes (COCO polygons
cannot carve them). Masks then travel as every instance source's do (``InstanceDataset``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from dinotune.geo.sampling import TileObject
from dinotune.geo.scene import Window
from dinotune.tasks.detect.coco import DetectionSource
from dinotune.tasks.detect.scene_data import SceneDetection, SceneDetectionDataset
from dinotune.tasks.instance.data import InstanceDataset
from dinotune.tasks.instance.masks import encode
from dinotune.tasks.instance.sources import InstanceSource, MaskReport


def tile_segmentation(obj: TileObject, window: Window) -> Any:
    """A tile object's mask as a COCO segmentation in tile pixels: ``[[x0, y0, x1, y1, ...], ...]``
    (each polygon part's outline), or ``{"size": [h, w], "counts": str}`` when a part has holes."""
    import shapely

    parts = list(shapely.get_parts(obj.geometry))
    if any(len(p.interiors) for p in parts):
        from affine import Affine
        from rasterio.features import rasterize

        mask = rasterize([(obj.geometry, 1)], out_shape=(window.height, window.width), fill=0,
                         transform=Affine.identity(), dtype="uint8")
        return encode(mask[None].astype(bool))[0]
    # the outline without its closing point (COCO polygons close themselves)
    return [np.asarray(p.exterior.coords, dtype=np.float64)[:-1].ravel().tolist() for p in parts]


class SceneInstanceDataset(SceneDetectionDataset, InstanceDataset):
    """Scene tiles as instance items: ``SceneDetectionDataset``'s windows and draws, ``InstanceDataset``'s
    masks (``segments[i]``: the COCO segmentations of record ``i``'s objects, in tile pixels)."""

    def place_masks(self, i: int, objects: Sequence[TileObject]) -> None:
        self.segments[i] = [tile_segmentation(o, self.windows[i]) for o in objects]


class SceneInstance(SceneDetection):
    """``SceneDetection`` whose sources carry each object's mask and whose items are instance items."""

    dataset_class = SceneInstanceDataset

    def add_masks(self, source: DetectionSource, kept: dict[int, tuple[TileObject, Window]]) -> InstanceSource:
        segmentations = {ann_id: tile_segmentation(o, w) for ann_id, (o, w) in kept.items()}
        fields = {name: getattr(source, name) for name in DetectionSource.__dataclass_fields__}
        return InstanceSource(**fields, segmentations=segmentations, mask_report=MaskReport())
