"""Semantic segmentation from a scene: tiles cut from one raster, each tile's label map from vector
labels rasterised in the tile (``rasterio.features``; class ``i`` of the sorted class names gets
value ``i + 1``, 0 is ``background``) or read from a label raster aligned with the scene, by the
same window. Items are ``SegmentationDataset``'s, so transforms, collate, loss and mIoU are the
task's own. Pixels of a tile outside the scene (a tile at its right or bottom edge) are
``ignore_index``.

Validation tiles are the grid of the validation blocks; training tiles the grid of the training
blocks (``--tile-sampling grid``) or a fresh random window per item. A tile "without objects" (for
``--empty-rate``) is one with no label polygon, or whose label raster window is all background.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dinotune.data.input_spec import InputSpec
from dinotune.errors import DataError, ImageReadError
from dinotune.geo.sampling import LabelIndex, TileSampler
from dinotune.geo.scene import RASTER_EXTENSIONS, Scene, Window, open_scene
from dinotune.geo.tiles import tile_windows
from dinotune.geo.vectors import read_vector_labels
from dinotune.tasks.base import TaskData, files_fingerprint
from dinotune.tasks.scene_data import (
    SceneHandle,
    eval_labels,
    eval_windows,
    item_rng,
    plan_for,
    report_plan,
    require_labels,
    scene_info,
    scene_spec,
)
from dinotune.tasks.segment.data import SegmentationDataset, SegmentationSource
from dinotune.tasks.tiling import open_input_scene
from dinotune.utils import info, warn

BACKGROUND = "background"  # the name of label 0 when the labels do not name it


def _label_dtype(num_classes: int, ignore_index: int) -> Any:
    """uint8 label maps when the labels fit (the mask readers' rule), else int64."""
    return np.uint8 if 0 <= ignore_index <= 255 and num_classes <= 256 else np.int64


def _outside_ignored(labels: np.ndarray, window: Window, height: int, width: int, ignore_index: int) -> np.ndarray:
    """``labels`` with the part of ``window`` beyond the scene set to ``ignore_index``."""
    inside = window.clip(height, width)
    r1, c1 = inside.row - window.row + inside.height, inside.col - window.col + inside.width
    labels[r1:, :] = ignore_index
    labels[:, c1:] = ignore_index
    return labels


class VectorLabelMap:
    """Label maps of tiles from polygons (``index`` labels: class indices, 0 the background)."""

    def __init__(self, index: LabelIndex, num_classes: int, ignore_index: int):
        self.index, self.num_classes, self.ignore_index = index, num_classes, ignore_index

    def read(self, window: Window) -> np.ndarray:
        """``h x w`` labels of ``window``: each polygon's class (later polygons over earlier ones), 0
        elsewhere, ``ignore_index`` outside the scene."""
        dtype = _label_dtype(self.num_classes, self.ignore_index)
        raster_dtype = np.uint8 if dtype == np.uint8 else np.int32  # types GDAL's rasteriser writes
        labels = self.index.rasterize(window, range(self.num_classes), 0, raster_dtype).astype(dtype, copy=False)
        return _outside_ignored(labels, window, self.index.height, self.index.width, self.ignore_index)

    def has_objects(self, window: Window) -> bool:
        """A polygon of a class other than the background meets ``window``."""
        return any(o.label > 0 for o in self.index.clip(window))


class RasterLabelMap:
    """Label maps of tiles read from a label raster (one band of class indices) by the same window."""

    def __init__(self, handle: SceneHandle, num_classes: int, ignore_index: int):
        self.handle, self.num_classes, self.ignore_index = handle, num_classes, ignore_index

    def read(self, window: Window) -> np.ndarray:
        """``h x w`` labels; DataError naming the file for a value that is no class."""
        scene = self.handle.get()
        labels = scene.read(window)[0].astype(_label_dtype(self.num_classes, self.ignore_index))
        bad = np.unique(labels[(labels >= self.num_classes) & (labels != self.ignore_index)])
        if bad.size:
            raise DataError(f"{self.handle.path}: label values {bad[:10].tolist()} in the window {window} are no class "
                            f"(0..{self.num_classes - 1}, or {self.ignore_index} ignored)")
        return _outside_ignored(labels, window, scene.height, scene.width, self.ignore_index)

    def has_objects(self, window: Window) -> bool:
        labels = self.read(window)
        return bool(((labels != 0) & (labels != self.ignore_index)).any())


def is_label_raster(path: str | Path) -> bool:
    return Path(path).suffix.lower() in RASTER_EXTENSIONS


def _check_aligned(labels: Scene, scene: Scene) -> None:
    """A label raster covers the scene pixel for pixel: the same size and, when both are
    georeferenced, the same CRS and transform. DataError naming the label file otherwise."""
    if labels.bands != 1:
        raise DataError(f"{labels.path}: a label raster has one band of class indices, this one has {labels.bands}")
    if (labels.height, labels.width) != (scene.height, scene.width):
        raise DataError(f"{labels.path}: {labels.width} x {labels.height} pixels, but the scene {scene.path.name} is "
                        f"{scene.width} x {scene.height}; a label raster must be aligned with its scene pixel for pixel")
    if labels.georeferenced and scene.georeferenced and (
            labels.crs != scene.crs or not labels.transform.almost_equals(scene.transform, precision=1e-6)):
        raise DataError(f"{labels.path}: its grid ({labels.crs}, {tuple(labels.transform)[:6]}) is not the scene's "
                        f"({scene.crs}, {tuple(scene.transform)[:6]}); resample it onto the scene's grid first")


def _raster_values(labels: Scene, ignore_index: int) -> list[int]:
    """The distinct label values of a label raster (``ignore_index`` left out), read block by block."""
    found: set[int] = set()
    for w in tile_windows(labels.height, labels.width, 1024, 0.0):
        found.update(int(v) for v in np.unique(labels.read(w.clip(labels.height, labels.width))))
    found.discard(ignore_index)
    return sorted(found)


class SceneSegmentationDataset(SegmentationDataset):
    """Segmentation items of scene tiles: item ``i`` is ``windows[i]`` of the scene and its label
    map (``label_map.read``). With a drawing ``sampler`` each item first gets a fresh window. Other
    arguments as for ``SegmentationDataset``."""

    def __init__(self, source: SegmentationSource, train: bool, image_size: int, patch_size: int, *,
                 scene: SceneHandle, windows: Sequence[Window], label_map: Any, spec: InputSpec,
                 sampler: TileSampler | None = None, **options: Any):
        super().__init__(source, train, image_size, patch_size, max_image_pixels=0, spec=spec, **options)
        self.scene, self.windows, self.label_map, self.sampler = scene, list(windows), label_map, sampler

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.sampler is not None and not self.sampler.fixed:
            self.windows[index] = self.sampler.draw(item_rng())
        n = len(self.windows)
        for offset in range(n):
            i = (index + offset) % n
            if i in self._bad:
                continue
            try:
                image = self.scene.image(self.windows[i], self.spec)
                labels = self.label_map.read(self.windows[i])
            except ImageReadError as exc:
                self._bad.add(i)
                warn(f"skipped {exc} (replaced by another tile)")
                continue
            return self._item(i, image, labels)
        raise DataError(f"{self.source.name}: no tile of the scene could be read")


class SceneSegmentation:
    """Builds a segmentation task's datasets from a scene (``task.cfg``)."""

    def __init__(self, task: Any):
        self.task, self.cfg = task, task.cfg

    def label_map(self, scene: Scene, labels: str, known: Sequence[str] = ()) -> tuple[Any, list[str], LabelIndex | None]:
        """``(label map, class names, the polygons' index or None)`` of ``labels`` on ``scene``:
        vector labels (classes ``background`` + their sorted names, or ``--class-names`` / ``known``
        with the background first) or a label raster (``--num-classes`` / ``--class-names`` / ``known``,
        else its largest value + 1)."""
        d = self.cfg.data
        names = list(known or d.class_names)
        if is_label_raster(labels):
            with open_scene(labels) as raster:
                _check_aligned(raster, scene)
                if not names:
                    values = _raster_values(raster, d.ignore_index)
                    k = d.num_classes or (max(values) + 1 if values else 1)
                    names = [BACKGROUND] + [f"class_{i}" for i in range(1, k)]
            info(f"{labels}: a label raster aligned with the scene, {len(names)} classes")
            return RasterLabelMap(SceneHandle(labels), len(names), d.ignore_index), names, None
        found = read_vector_labels(labels, scene, d.class_field, classes=names)
        info(found.summary())
        if not names:
            names = [BACKGROUND] + sorted(set(found.classes) - {BACKGROUND})
        lookup = {n: i for i, n in enumerate(names)}
        index = LabelIndex(found.geometries, [lookup[c] for c in found.classes], scene.height, scene.width)
        return VectorLabelMap(index, len(names), d.ignore_index), names, index

    def dataset(self, names: list[str], train: bool, patch_size: int, *, scene: SceneHandle, windows: Sequence[Window],
                label_map: Any, spec: InputSpec, sampler: TileSampler | None = None) -> SceneSegmentationDataset:
        d = self.cfg.data
        what = "training" if train else "evaluation"
        source = SegmentationSource(f"{scene.path} ({what} tiles)", [(scene.path, None)] * len(windows), names,
                                    d.ignore_index)
        return SceneSegmentationDataset(
            source, train, self.cfg.backbone.image_size, patch_size, scene=scene, windows=windows, label_map=label_map,
            spec=spec, sampler=sampler, augment=d.augment,
            keep_full_resolution=not train and self.cfg.model.inference == "slide",
            scale_range=tuple(d.scale_range))

    def build(self, patch_size: int) -> TaskData:
        """Training (and validation) datasets from ``--data`` (a scene) and ``--labels``."""
        cfg, d = self.cfg, self.cfg.data
        require_labels(d)
        with open_scene(d.data, cfg.bands.layout) as scene:
            info(scene.describe())
            label_map, names, index = self.label_map(scene, d.labels)
            if len(names) < 2:
                raise DataError(f"{d.labels}: no class besides the background in {scene.path.name}; nothing to "
                                "train on")
            plan = plan_for(cfg, scene)
            report_plan(plan, d.val_fraction)
            sampler = TileSampler(plan, label_map.has_objects, d.tile_sampling, d.empty_rate, d.tiles_per_epoch,
                                  cfg.train.seed)
            info(sampler.describe())
            spec = scene_spec(scene, plan.train_grid(), cfg.bands)
            about = scene_info(scene, d.labels, plan, sampler, len(plan.val_grid()))
        if index is not None:
            train, val = index.counts(plan.train_blocks, len(names)), index.counts(plan.val_blocks, len(names))
            info("polygons per class, in the training | validation blocks: " + ", ".join(
                f"{n} {t} | {v}" for n, t, v in zip(names, train, val) if t or v))
        handle = SceneHandle(d.data, cfg.bands.layout)
        train_ds = self.dataset(names, True, patch_size, scene=handle, windows=sampler.windows(), label_map=label_map,
                                spec=spec, sampler=sampler)
        val_windows = plan.val_grid()
        val_ds = self.dataset(names, False, patch_size, scene=handle, windows=val_windows, label_map=label_map,
                              spec=spec) if val_windows else None
        meta = {"task": self.task.name, "class_names": names, "num_classes": len(names),
                "ignore_index": d.ignore_index, "categories": None,
                "data_fingerprint": files_fingerprint([d.data, d.labels]), "input": spec.to_meta(),
                "scene": about.to_meta()}
        return TaskData(train_ds, val_ds, meta)

    def evaluation_dataset(self, run: Any, data: str, labels: str, split: str, patch_size: int) -> SceneSegmentationDataset:
        """The tiles of ``split`` (``val``: the run's validation blocks; ``train``; ``test``: the whole
        scene) of the scene ``data`` with ``labels`` (the run's own for its training scene)."""
        labels = eval_labels(self.cfg, data, labels)
        spec = InputSpec.from_meta(run.meta)
        names = list(run.bundle.class_names)
        with open_input_scene(data, spec) as scene:
            info(scene.describe())
            label_map, _, _ = self.label_map(scene, labels, known=names)
            windows = eval_windows(plan_for(self.cfg, scene), split, scene)
        info(f"{split}: {len(windows)} tiles of {windows[0].width} px")
        return self.dataset(names, False, patch_size, scene=SceneHandle(data, spec.layout), windows=windows,
                            label_map=label_map, spec=spec)
