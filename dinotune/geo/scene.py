"""One scene read window by window: a GeoTIFF (any size, tiled or striped, BigTIFF) through rasterio,
a ``.npy`` through a memory map, a picture (JPEG, PNG, ...) decoded once. Memory follows the
windows asked for, never the scene (pictures excepted: they are decoded whole, as today).

Windows are in pixels, ``row``/``col`` of the top-left corner; the parts of a window outside the
scene read as zeros, so every tile of a grid has the same shape.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinotune.config.scene import SCENE_SUFFIXES
from dinotune.data.arrays import BandLayout, band_axis, is_npy
from dinotune.errors import DataError, ImageReadError

# what GDAL reads window by window (the config's list of scene files, less .npy); other picture
# formats are decoded whole by Pillow
RASTER_EXTENSIONS = set(SCENE_SUFFIXES) - {".npy"}


# GDAL keeps decoded blocks in a process-wide cache of 5 % of the machine's memory by default (1.2 GB
# on a 24 GB machine, 6 GB on a 128 GB one): a scene read once, row of tiles after row of tiles,
# only needs the blocks of the rows a tile overlap re-reads. Bounded here for every read and write.
GDAL_CACHE_MB = 64


def gdal_env() -> Any:
    """A ``rasterio.Env`` with GDAL's block cache bounded to ``GDAL_CACHE_MB``; entered around each
    read and write (it is thread-local, and tiles are read on a worker thread)."""
    import rasterio

    return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB)


def require_geo(what: str) -> None:
    """Refuse, naming the extra to install, when rasterio / shapely / pyproj are missing."""
    try:
        import pyproj  # noqa: F401
        import rasterio  # noqa: F401
        import shapely  # noqa: F401
    except ImportError as exc:
        raise DataError(f"{what} needs the geo extra (rasterio, shapely, pyproj): pip install 'dinotune[geo]' "
                        f"({exc.name} is missing)") from None


@dataclass(frozen=True)
class Window:
    """A pixel window: top-left ``row``, ``col`` and its ``height`` x ``width``."""

    row: int
    col: int
    height: int
    width: int

    @property
    def bounds(self) -> tuple[int, int, int, int]:
        """``(x0, y0, x1, y1)`` in pixels (x = column)."""
        return self.col, self.row, self.col + self.width, self.row + self.height

    def clip(self, height: int, width: int) -> "Window":
        """The part inside a ``height`` x ``width`` scene (may be empty: height or width 0)."""
        r0, c0 = max(self.row, 0), max(self.col, 0)
        r1, c1 = min(self.row + self.height, height), min(self.col + self.width, width)
        return Window(r0, c0, max(r1 - r0, 0), max(c1 - c0, 0))


class Scene:
    """A raster read by windows.

    Attributes:
        path: the file.
        height, width, bands: its size.
        dtype: the samples' numpy dtype.
        crs: its coordinate reference system (a ``rasterio.crs.CRS``), None without one.
        transform: pixel -> CRS coordinates (an ``affine.Affine``), None without georeferencing.
        picture: the file is a picture decoded by Pillow (upright 8-bit RGB), not a raster or array.
    """

    def __init__(self, path: Path, height: int, width: int, bands: int, dtype: np.dtype, *, crs: Any = None,
                 transform: Any = None, picture: bool = False):
        self.path, self.height, self.width, self.bands = Path(path), height, width, bands
        self.dtype, self.crs, self.transform, self.picture = np.dtype(dtype), crs, transform, picture

    @property
    def rgb8(self) -> bool:
        """Three 8-bit bands: what a run trained on pictures takes (scaled by 1/255, as pictures are)."""
        return self.bands == 3 and self.dtype == np.uint8

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None and self.transform is not None

    def read(self, window: Window) -> np.ndarray:
        """``bands x window.height x window.width`` samples in the scene's dtype; zeros outside it."""
        inside = window.clip(self.height, self.width)
        out = np.zeros((self.bands, window.height, window.width), dtype=self.dtype)
        if inside.height and inside.width:
            r, c = inside.row - window.row, inside.col - window.col
            out[:, r: r + inside.height, c: c + inside.width] = self._read(inside)
        return out

    def _read(self, window: Window) -> np.ndarray:
        raise NotImplementedError

    def read_overview(self, max_side: int) -> tuple[np.ndarray, float]:
        """The whole scene shrunk so its longer side is at most ``max_side``: ``(bands x h x w, factor)``
        with ``factor`` = overview pixels per scene pixel (1 when it already fits). Memory follows the
        overview: rasters are read decimated (averaged, from their overviews where they have them),
        arrays sampled at the overview's pixel centres."""
        factor = min(1.0, max_side / max(self.height, self.width))
        h, w = max(1, round(self.height * factor)), max(1, round(self.width * factor))
        return self._overview(h, w), factor

    def _overview(self, h: int, w: int) -> np.ndarray:
        rows = np.minimum(((np.arange(h) + 0.5) * self.height / h).astype(int), self.height - 1)
        cols = np.minimum(((np.arange(w) + 0.5) * self.width / w).astype(int), self.width - 1)
        return np.stack([self.read(Window(int(r), 0, 1, self.width))[:, 0, cols] for r in rows], axis=1)

    def close(self) -> None:
        pass

    def __enter__(self) -> "Scene":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def describe(self) -> str:
        where = f"CRS {self.crs.to_string()}" if self.georeferenced else "no georeferencing (pixel coordinates)"
        return f"{self.path.name}: {self.width} x {self.height} pixels, {self.bands} band(s) {self.dtype}, {where}"


class _RasterScene(Scene):
    def __init__(self, path: Path):
        import rasterio
        from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

        try:
            with warnings.catch_warnings(), gdal_env():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self._ds = rasterio.open(path)
        except RasterioIOError as exc:
            raise ImageReadError(f"{path}: not a readable raster ({exc})") from None
        ds = self._ds
        if len(set(ds.dtypes)) != 1:
            raise DataError(f"{path}: bands of different types ({', '.join(ds.dtypes)}); write them as one type")
        georef = ds.crs is not None and not ds.transform.is_identity
        super().__init__(path, ds.height, ds.width, ds.count, np.dtype(ds.dtypes[0]), crs=ds.crs if georef else None,
                         transform=ds.transform if georef else None)

    def _read(self, window: Window) -> np.ndarray:
        from rasterio.windows import Window as RioWindow

        try:
            with gdal_env():
                return self._ds.read(window=RioWindow(window.col, window.row, window.width, window.height))
        except Exception as exc:  # rasterio raises its own types for damaged blocks
            raise ImageReadError(f"{self.path}: cannot read the window {window} ({exc})") from None

    def _overview(self, h: int, w: int) -> np.ndarray:
        from rasterio.enums import Resampling

        with gdal_env():
            return self._ds.read(out_shape=(self.bands, h, w), resampling=Resampling.average)

    def close(self) -> None:
        self._ds.close()


class _ArrayScene(Scene):
    """A ``.npy`` memory-mapped (``layout``: which axis holds the bands), or a picture held whole."""

    def __init__(self, path: Path, array: np.ndarray, band_axis_: int | None, picture: bool):
        self._array, self._axis = array, band_axis_
        shape = [s for i, s in enumerate(array.shape) if i != band_axis_]
        bands = 1 if band_axis_ is None else array.shape[band_axis_]
        super().__init__(path, shape[0], shape[1], bands, array.dtype, picture=picture)

    def _read(self, window: Window) -> np.ndarray:
        rows, cols = slice(window.row, window.row + window.height), slice(window.col, window.col + window.width)
        if self._axis is None:
            return np.asarray(self._array[rows, cols])[None]
        if self._axis == 0:
            return np.asarray(self._array[:, rows, cols])
        return np.ascontiguousarray(np.moveaxis(np.asarray(self._array[rows, cols, :]), -1, 0))


def is_scene_file(path: Path) -> bool:
    """A file ``open_scene`` reads window by window (GDAL rasters and ``.npy``)."""
    suffix = Path(path).suffix.lower()
    return suffix in RASTER_EXTENSIONS or is_npy(Path(path))


def open_scene(path: str | Path, layout: BandLayout = "auto", max_pixels: int = 0) -> Scene:
    """The scene in ``path``: GDAL rasters (``.tif``, ``.vrt``, ``.jp2``, ...) through rasterio,
    ``.npy`` memory-mapped, other pictures decoded whole (``max_pixels`` bounds those).
    ImageReadError / DataError name the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such scene file")
    if is_npy(path):
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ImageReadError(f"{path}: not a readable .npy array ({exc})") from None
        return _ArrayScene(path, array, band_axis(tuple(array.shape), layout, path), picture=False)
    if path.suffix.lower() in RASTER_EXTENSIONS:
        require_geo("reading a scene window by window")
        return _RasterScene(path)
    from dinotune.data.images import load_image

    picture = np.asarray(load_image(path, max_pixels))  # H x W x 3 uint8, upright
    return _ArrayScene(path, picture, 2, picture=True)
