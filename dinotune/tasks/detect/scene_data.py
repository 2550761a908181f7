"""Detection from a scene: tiles cut from one raster, their boxes from vector labels clipped to the
tile (``geo.sampling``), as ``DetectionDataset`` items, so transforms, collate, criterion and COCO
evaluation are detection's own.

Each tile is an image record of a ``DetectionSource`` (``tile x tile`` pixels, its objects' boxes in
tile pixels: the bounds of the part inside the tile; an object less visible than ``--min-visible``
dropped). Validation tiles are the grid of the validation blocks, fixed, and their source is the
COCO ground truth. Training tiles are the grid of the training blocks (``--tile-sampling grid``) or,
by default, a fresh random window per item: the item's record then gets the drawn window and its
objects before it is loaded (``SceneDetectionDataset.__getitem__``).

``SceneDetection`` builds both datasets (and the evaluation one); instance segmentation extends it
with masks (``tasks/instance/scene_data.py``).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from dinotune.data.input_spec import InputSpec
from dinotune.errors import DataError
from dinotune.geo.sampling import LabelIndex, TileObject, TileSampler
from dinotune.geo.scene import Window, open_scene
from dinotune.geo.vectors import VectorLabels, read_vector_labels
from dinotune.tasks.base import TaskData, files_fingerprint
from dinotune.tasks.detect.coco import Annotation, DetectionReport, DetectionSource, ImageRecord, clamp_box
from dinotune.tasks.detect.data import DetectionDataset, class_table
from dinotune.tasks.detect.transforms import eval_transforms, train_transforms
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
from dinotune.tasks.tiling import open_input_scene
from dinotune.utils import info


class SceneDetectionDataset(DetectionDataset):
    """Detection items of scene tiles: record ``i`` is the tile ``windows[i]``, read from the scene
    when loaded. With a ``sampler`` that draws (``--tile-sampling random``), every item first gets a
    fresh window and its objects (``place``); the records then start as the grid's, so an item
    whose read fails is replaced by a valid one. Other arguments as for ``DetectionDataset``."""

    def __init__(self, source: DetectionSource, transform: Callable | None, image_size: int, *, scene: SceneHandle,
                 windows: Sequence[Window], index: LabelIndex, min_visible: float, min_box_size: float,
                 spec: InputSpec, sampler: TileSampler | None = None):
        super().__init__(source, transform, image_size, max_image_pixels=0, spec=spec)
        self.scene, self.windows, self.index = scene, list(windows), index
        self.min_visible, self.min_box_size, self.sampler = min_visible, min_box_size, sampler

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.sampler is not None and not self.sampler.fixed:
            window = self.sampler.draw(item_rng())
            self.windows[index] = window
            self.place(index, self.index.clip(window, self.min_visible))
        return super().__getitem__(index)

    def _load(self, i: int) -> Image.Image | torch.Tensor:
        return self.scene.image(self.windows[i], self.spec)

    def place(self, i: int, objects: Sequence[TileObject]) -> None:
        """Record ``i``'s targets become ``objects`` (a drawn window's), as ``SceneDetection.source``
        admits them."""
        window = self.windows[i]
        kept = [(o, box) for o in objects for box in [tile_box(o, window, self.min_box_size)] if box is not None]
        self.boxes[i] = torch.tensor([box for _, box in kept], dtype=torch.float32).reshape(-1, 4)
        self.labels[i] = torch.tensor([o.label for o, _ in kept], dtype=torch.int64)
        self.place_masks(i, [o for o, _ in kept])

    def place_masks(self, i: int, objects: Sequence[TileObject]) -> None:
        """What a subclass keeps per object beside its box (instance segmentation: its mask)."""


def tile_box(obj: TileObject, window: Window, min_box_size: float) -> tuple[float, float, float, float] | None:
    """The box of a tile's object (the bounds of its part inside), None when it is thinner than
    ``min_box_size`` (detection's rule for every reader)."""
    box, _ = clamp_box(*obj.box, window.width, window.height, min_box_size)
    return box


class SceneDetection:
    """Builds the scene datasets of a detection task (``task.cfg``); ``dataset_class`` and
    ``add_masks`` are what instance segmentation replaces."""

    dataset_class: type[SceneDetectionDataset] = SceneDetectionDataset

    def __init__(self, task: Any):
        self.task, self.cfg = task, task.cfg

    # ----------------------------------------------------------------------------------- sources
    def source(self, name: str, path: Path, windows: Sequence[Window], objects: Sequence[Sequence[TileObject]],
               categories: list[dict[str, Any]]) -> DetectionSource:
        """A detection source with one image record per window (ids 1..N) and its objects' boxes
        (``tile_box``; a box thinner than ``--min-box-size`` dropped and counted)."""
        records, annotations, report, kept = [], {}, DetectionReport(), {}
        for k, (w, objs) in enumerate(zip(windows, objects)):
            rec = ImageRecord(k + 1, path, w.width, w.height, f"{path.stem}_r{w.row}_c{w.col}")
            records.append(rec)
            annotations[rec.id] = []
            for o in objs:
                box = tile_box(o, w, self.cfg.data.min_box_size)
                if not report.admit(box, False):
                    continue
                ann_id = len(kept) + 1
                annotations[rec.id].append(Annotation(box, o.label, int(categories[o.label]["id"]), False,
                                                      float(o.geometry.area), ann_id))
                kept[ann_id] = (o, w)
        report.empty_images = sum(1 for anns in annotations.values() if not anns)
        return self.add_masks(DetectionSource(name, records, annotations, categories, report), kept)

    def add_masks(self, source: DetectionSource, kept: dict[int, tuple[TileObject, Window]]) -> DetectionSource:
        """The source with what each kept object (annotation id -> ``(object, its tile)``) carries
        beside its box; detection: nothing."""
        return source

    def dataset(self, source: DetectionSource, train: bool, *, scene: SceneHandle, windows: Sequence[Window],
                index: LabelIndex, spec: InputSpec, sampler: TileSampler | None = None) -> Dataset:
        d, size = self.cfg.data, self.cfg.backbone.image_size
        transform = train_transforms(size, spec) if train and d.augment else eval_transforms()
        return self.dataset_class(source, transform, size, scene=scene, windows=windows, index=index,
                                  min_visible=d.min_visible, min_box_size=d.min_box_size, spec=spec, sampler=sampler)

    # ---------------------------------------------------------------------------------- training
    def build(self) -> TaskData:
        """Training (and validation) datasets from ``--data`` (a scene) and ``--labels``."""
        cfg, d = self.cfg, self.cfg.data
        require_labels(d)
        with open_scene(d.data, cfg.bands.layout) as scene:
            info(scene.describe())
            labels = read_vector_labels(d.labels, scene, d.class_field)
            info(labels.summary())
            names = sorted(set(labels.classes))
            if not names:
                raise DataError(f"{d.labels}: no label polygon lies in {scene.path.name}; nothing to train on")
            index = self.label_index(labels, names, scene.height, scene.width)
            plan = plan_for(cfg, scene)
            report_plan(plan, d.val_fraction)
            sampler = TileSampler(plan, partial(index.any_in, min_visible=d.min_visible), d.tile_sampling,
                                  d.empty_rate, d.tiles_per_epoch, cfg.train.seed)
            info(sampler.describe())
            spec = scene_spec(scene, plan.train_grid(), cfg.bands)
            about = scene_info(scene, d.labels, plan, sampler, len(plan.val_grid()))
        categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
        handle = SceneHandle(d.data, cfg.bands.layout)
        info("objects per class, in the training | validation blocks:\n" + _per_class(names, index, plan))
        train_windows = sampler.windows()
        train_src = self.source(f"{d.data} (training tiles)", handle.path, train_windows,
                                [index.clip(w, d.min_visible) for w in train_windows], categories)
        val_windows = plan.val_grid()
        val_src = self.source(f"{d.data} (validation tiles)", handle.path, val_windows,
                              [index.clip(w, d.min_visible) for w in val_windows], categories)
        train_ds = self.dataset(train_src, True, scene=handle, windows=train_windows, index=index, spec=spec,
                                sampler=sampler)
        val_ds = self.dataset(val_src, False, scene=handle, windows=val_windows, index=index, spec=spec) \
            if val_windows else None
        meta = {"task": self.task.name, "categories": categories, "class_names": names,
                "num_classes": len(names), "head": cfg.model.head,
                "data_fingerprint": files_fingerprint([d.data, d.labels]), "input": spec.to_meta(),
                "scene": about.to_meta()}
        return TaskData(train_ds, val_ds, meta)

    @staticmethod
    def label_index(labels: VectorLabels, names: list[str], height: int, width: int) -> LabelIndex:
        lookup = {n: i for i, n in enumerate(names)}
        return LabelIndex(labels.geometries, [lookup[c] for c in labels.classes], height, width)

    # -------------------------------------------------------------------------------- evaluation
    def evaluation_dataset(self, run: Any, data: str, labels: str, split: str) -> Dataset:
        """The tiles of ``split`` (``val``: the run's validation blocks; ``train``; ``test``: the whole
        scene) of the scene ``data`` with ``labels`` (the run's own when ``data`` is its scene), as a
        detection dataset scored against its tiles' objects."""
        cfg, d = self.cfg, self.cfg.data
        labels = eval_labels(cfg, data, labels)
        spec = InputSpec.from_meta(run.meta)
        categories, names = list(run.bundle.categories), list(run.bundle.class_names)
        with open_input_scene(data, spec) as scene:
            info(scene.describe())
            found = read_vector_labels(labels, scene, d.class_field, classes=names)
            info(found.summary())
            index = self.label_index(found, names, scene.height, scene.width)
            windows = eval_windows(plan_for(cfg, scene), split, scene)
        info(f"{split}: {len(windows)} tiles of {windows[0].width} px")
        source = self.source(f"{data} ({split} tiles)", Path(data), windows,
                             [index.clip(w, d.min_visible) for w in windows], categories)
        return self.dataset(source, False, scene=SceneHandle(data, spec.layout), windows=windows, index=index,
                            spec=spec)


def _per_class(names: list[str], index: LabelIndex, plan: Any) -> str:
    """``class  training | validation`` object counts (by where each object's inside point lies)."""
    train, val = index.counts(plan.train_blocks, len(names)), index.counts(plan.val_blocks, len(names))
    return class_table(names, [f"{t} | {v}" for t, v in zip(train, val)])
