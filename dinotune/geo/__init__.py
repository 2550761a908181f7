"""Scenes larger than memory: windowed reads of GeoTIFF / ``.npy`` / pictures (``scene``), the tile
grid and the spatial split (``tiles``), vector labels in the scene's pixels (``vectors``), and
georeferenced outputs (``write``: GeoJSON, label GeoTIFF).

Torch-free; rasterio, shapely and pyproj (the ``geo`` extra) are imported where they are used, so
the rest of dinotune installs and runs without GDAL.
"""

from dinotune.geo.scene import Scene, Window, open_scene
from dinotune.geo.tiles import block_split, tile_windows

__all__ = ["Scene", "Window", "open_scene", "tile_windows", "block_split"]
