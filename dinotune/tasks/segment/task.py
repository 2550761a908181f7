"""Semantic segmentation as a Task: VOC / ADE20K / folders / COCO masks, linear or FPN decoder,
cross-entropy with an ignore index, confusion-matrix mIoU over the whole validation set."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dinotune.backbone.model import DinoBackbone
from dinotune.config import SegmentConfig, SegmentInferenceConfig
from dinotune.config.segment import SegmentPredictOptions
from dinotune.data.bands import InputSpec, check_inputs, read_input, resolve_input_spec, stretch_to_rgb
from dinotune.data.images import readable_images
from dinotune.data.loader import make_loader
from dinotune.data.splits import subset_indices
from dinotune.engine import distributed
from dinotune.engine.device import autocast, to_device
from dinotune.engine.logging import progress
from dinotune.errors import ConfigError, DataError
from dinotune.models.bundle import ModelBundle
from dinotune.models.graph import ExportGraph
from dinotune.tasks.base import Task, TaskData, TrainedRun, files_fingerprint
from dinotune.tasks.segment.colours import ColourTable, read_colour_table
from dinotune.tasks.segment.criterion import SegmentationLoss
from dinotune.tasks.segment.data import (
    SegmentationDataset,
    SegmentationSource,
    describe,
    eval_size,
    find_segmentation_data,
    load_mask,
    scan_source,
    segmentation_collate,
)
from dinotune.tasks.segment.decoders import build_segmenter
from dinotune.tasks.segment.export import build_graph
from dinotune.tasks.segment.inference import crop_and_resize, default_stride, predict_logits
from dinotune.tasks.segment.metrics import SegmentationMetrics, format_iou_table
from dinotune.tasks.segment.runtime import class_shares
from dinotune.tasks.scene_data import is_scene_evaluation, is_scene_training
from dinotune.tasks.tiling import Tiling, say, scene_paths, training_tile
from dinotune.utils import info, warn, write_json


class SegmentTask(Task):
    name = "segment"
    monitor_mode = "max"
    pixel_aligned_labels = True
    supports_subset = True
    supports_labels = True  # eval --labels: a scene's

    cfg: SegmentConfig

    @property
    def monitor(self) -> str:
        return "mIoU"

    # ---------------------------------------------------------------------------------- data
    def _find(self, data: str, split: str, images: str = "", categories=None,
              known_classes: Sequence[str] | None = None, colours: ColourTable | None = None) -> SegmentationSource:
        """One split, its classes from ``--num-classes`` / ``--class-names`` or the data, or
        ``known_classes`` (the training split's, a checkpoint's): a validation split whose masks
        happen to lack the top labels must still index the same classes as training. ``colours``:
        the colour table of colour-coded masks (``--mask-colors``, or the run's)."""
        d = self.cfg.data
        return find_segmentation_data(data, split, images, num_classes=d.num_classes, class_names=d.class_names,
                                      ignore_index=d.ignore_index, categories=categories,
                                      known_classes=known_classes, colours=colours)

    @staticmethod
    def _run_colours(run: TrainedRun) -> ColourTable | None:
        """The colour table a run was trained with (its ``meta.json``), None for index masks."""
        colours = run.meta.get("mask_colors")
        return None if colours is None else ColourTable.from_meta(run.bundle.class_names, colours)

    @staticmethod
    def _split(split: str) -> str:
        """The layouts' name of an evaluation split (train, val or test; anything else reads train)."""
        return split if split in ("train", "val", "test") else "train"

    def _dataset(self, source: SegmentationSource, train: bool, patch_size: int, augment: bool = True,
                 pre_transform: Callable | None = None, spec: InputSpec | None = None) -> SegmentationDataset:
        if pre_transform is not None and spec is not None and spec.arrays:
            raise ConfigError(f"image corruptions are defined on RGB pictures, not on band arrays ({spec.in_channels} bands)")
        return SegmentationDataset(source, train=train, image_size=self.cfg.backbone.image_size,
                                   patch_size=patch_size, augment=augment,
                                   keep_full_resolution=not train and self.cfg.model.inference == "slide",
                                   pre_transform=pre_transform, scale_range=tuple(self.cfg.data.scale_range),
                                   max_image_pixels=self.cfg.data.max_image_pixels, spec=spec)

    def build_data(self, run_dir: Path | None, patch_size: int) -> TaskData:
        d = self.cfg.data
        if is_scene_training(d):  # one raster and its labels, cut into tiles (scene_data.py)
            from dinotune.tasks.segment.scene_data import SceneSegmentation

            return SceneSegmentation(self).build(patch_size)
        colours = read_colour_table(d.mask_colors) if d.mask_colors else None
        train = self._subset(self._find(d.data, "train", d.train_images, colours=colours), d.subset, run_dir,
                             "subset.json")
        if d.overfit:
            train = train.subset(list(range(min(d.overfit, len(train)))))
            val = train
            info(f"overfit mode: training and evaluating on the same {len(train)} images, no augmentation")
        else:
            try:
                val = self._find(d.val_data or d.data, "val", d.val_images, categories=train.categories,
                                 known_classes=train.class_names, colours=colours)
            except DataError as exc:
                if d.val_data:
                    raise
                warn(f"no validation data ({exc}); training without evaluation")
                val = None
            if val is not None and d.val_subset:
                val = self._subset(val, d.val_subset, run_dir, "val_subset.json")
            if val is not None and not d.val_data and [p for p, _ in val.pairs] == [p for p, _ in train.pairs]:
                warn(f"{train.name} has no separate validation split: validation uses the training images; "
                     "pass --val-data for an honest number")
        if val is not None and val.class_names != train.class_names:
            raise DataError(f"{val.name}: classes {val.class_names[:10]} differ from the training data's "
                            f"{train.class_names[:10]}")
        train = scan_source(train, d.check_images, max_pixels=d.max_image_pixels)
        train.report.print("files")
        info(describe(train))
        if val is not None and val is not train:
            val = scan_source(val, d.check_images, max_pixels=d.max_image_pixels)
            val.report.print("files")
            info(describe(val))
        if not len(train):
            raise DataError(f"{train.name}: no usable training images")
        b = self.cfg.bands
        spec = resolve_input_spec([p for p, _ in train.pairs], in_channels=b.in_channels, rgb_bands=b.rgb_bands,
                                  layout=b.layout, stats=b.stats, mean=b.mean, std=b.std,
                                  max_pixels=d.max_image_pixels)
        if val is not None and val is not train:
            check_inputs([p for p, _ in val.pairs], spec, "validation")
        train_ds = self._dataset(train, True, patch_size, augment=d.augment and not d.overfit, spec=spec)
        val_ds = self._dataset(val, False, patch_size, spec=spec) if val is not None else None
        files = [p for pair in train.pairs for p in pair if p is not None] + [train.name]
        extra = [colours.json_text()] if colours is not None else []  # a changed table changes the labels
        meta = {"task": self.name, "class_names": train.class_names, "num_classes": len(train.class_names),
                "ignore_index": d.ignore_index, "categories": train.categories,
                "data_fingerprint": files_fingerprint(files, extra), "input": spec.to_meta()}
        if colours is not None:  # eval / predict / export read and draw masks in these colours
            meta["mask_colors"] = colours.to_meta()
        return TaskData(train_ds, val_ds, meta)

    def _subset(self, source: SegmentationSource, n: int, run_dir: Path | None, name: str) -> SegmentationSource:
        """A reproducible random subset of ``n`` images (seeded by ``--subset-seed``), recorded by
        file name in the run folder."""
        if not n or n >= len(source):
            return source
        source = source.subset(subset_indices(len(source), n, self.cfg.data.subset_seed))
        if run_dir is not None:
            write_json(Path(run_dir) / name, {"images": [str(p) for p, _ in source.pairs], "n": n,
                                               "seed": self.cfg.data.subset_seed, "source": source.name})
        return source

    def _eval_loader(self, dataset: SegmentationDataset, batch_size: int, pin: bool = False) -> DataLoader:
        # sliding windows run one full-resolution image at a time
        bs = 1 if self.cfg.model.inference == "slide" else batch_size
        return make_loader(dataset, bs, shuffle=False, workers=self.cfg.train.workers, pin_memory=pin,
                           collate_fn=partial(segmentation_collate, patch_size=dataset.patch_size, train=False))

    def loaders(self, data: TaskData) -> tuple[DataLoader, DataLoader | None]:
        t = self.cfg.train
        pin = torch.cuda.is_available()
        collate = partial(segmentation_collate, patch_size=data.train.patch_size, train=True,
                          ignore_index=self.cfg.data.ignore_index)
        train = make_loader(data.train, t.batch_size, shuffle=True, workers=t.workers, seed=t.seed,
                            collate_fn=collate, drop_last=True, pin_memory=pin)
        val = self._eval_loader(data.val, t.batch_size, pin) if data.val is not None else None
        return train, val

    # --------------------------------------------------------------------------------- model
    def build_model(self, meta: dict[str, Any], backbone: DinoBackbone) -> ModelBundle:
        k = meta["num_classes"]
        weights = self.cfg.loss.class_weights
        if weights and len(weights) != k:
            raise DataError(f"--class-weights has {len(weights)} values but the data has {k} classes")
        return ModelBundle(build_segmenter(backbone, k, self.cfg.model),
                           SegmentationLoss(self.cfg.data.ignore_index, weights), None,
                           list(meta["class_names"]), meta.get("categories"))

    # ------------------------------------------------------------------------- step and eval
    def training_step(self, bundle: ModelBundle, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        # labelled pixels counted over every process before normalising
        return {"loss": bundle.criterion(model(batch["images"]), batch["masks"],
                                         count_reduce=distributed.average_count)}

    def _image_logits(self, model: torch.nn.Module, images: torch.Tensor, i: int, size: tuple[int, int],
                      out_size: tuple[int, int]) -> torch.Tensor:
        m, s, p = self.cfg.model, self.cfg.backbone.image_size, model.patch_size
        return predict_logits(model, images[i: i + 1], out_size, mode=m.inference, window=s,
                              stride=m.slide_stride or default_stride(s, p), valid_size=size,
                              window_batch=self.cfg.inference.window_batch, patch_size=p)

    def evaluation_pass(self, bundle: ModelBundle, loader: DataLoader, device: torch.device, precision: str,
                        show_progress: bool) -> dict[str, Any]:
        """``{"confusion": K x K counts, "loss_sum": sum of per-image losses, "images": count}``."""
        model, k = bundle.model, len(bundle.class_names)
        metrics = SegmentationMetrics(k, self.cfg.data.ignore_index, bundle.class_names)
        loss_sum, n = 0.0, 0
        whole = self.cfg.model.inference == "whole"
        for batch in progress(loader, show_progress, desc="evaluating"):
            images = to_device(batch["images"], device)
            if whole:  # one forward for the padded batch, then each image cropped and resized
                with autocast(device, precision):
                    batch_logits = model(images).float()
            for i, (mask, size) in enumerate(zip(batch["masks"], batch["sizes"])):
                mask = mask.to(device)
                if whole:
                    logits = crop_and_resize(batch_logits[i: i + 1], images.shape[-2:], tuple(size),
                                             tuple(mask.shape[-2:]))
                else:
                    with autocast(device, precision):
                        logits = self._image_logits(model, images, i, tuple(size), tuple(mask.shape[-2:]))
                logits = logits.float()
                loss_sum += self._eval_loss(bundle, logits, mask, tuple(size))
                n += 1
                metrics.update(logits.argmax(1)[0], mask)
        return {"confusion": metrics.confusion, "loss_sum": loss_sum, "images": n}

    @staticmethod
    def _eval_loss(bundle: ModelBundle, logits: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]) -> float:
        """Validation loss at the network's input resolution (labels nearest-resized): the metrics
        use full-resolution logits, but a K-channel cross-entropy there would double the cost."""
        small = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        labels = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0].long()
        return float(bundle.criterion(small, labels))

    def compute_metrics(self, bundle: ModelBundle, parts: Sequence[dict[str, Any]], dataset: Dataset) -> dict[str, Any]:
        metrics = SegmentationMetrics(len(bundle.class_names), self.cfg.data.ignore_index, bundle.class_names)
        for p in parts:
            metrics.add_confusion(p["confusion"])
        images = sum(p["images"] for p in parts)
        out = {"loss": sum(p["loss_sum"] for p in parts) / max(1, images)}
        out.update(metrics.compute())
        out["images"] = int(images)  # how many images the numbers rest on (a subset, a shard gathered)
        return out

    # ------------------------------------------------------------------------------ inference
    def predict_mask(self, run: TrainedRun, image: Image.Image | torch.Tensor) -> np.ndarray:
        """``H x W`` label map for one PIL image (or ``C x H x W`` band tensor) at its own resolution."""
        from torchvision.transforms import v2

        from dinotune.data.transforms import normalize

        s, model = run.cfg.backbone.image_size, run.bundle.model
        h, w = (image.height, image.width) if isinstance(image, Image.Image) else tuple(image.shape[-2:])
        size = (h, w) if self.cfg.model.inference == "slide" else eval_size(h, w, s, model.patch_size)
        tensor = v2.Compose([v2.ToImage(), v2.Resize(list(size), antialias=True),
                             v2.ToDtype(torch.float32, scale=True), normalize(InputSpec.from_meta(run.meta))])(image)
        # the same zero padding to multiples of the patch size as evaluation batches
        item = {"image": tensor, "mask": torch.zeros(h, w, dtype=torch.int64), "index": 0}
        batch = segmentation_collate([item], patch_size=model.patch_size, train=False)
        with torch.no_grad(), autocast(run.device, run.precision):
            logits = self._image_logits(model, batch["images"].to(run.device), 0, batch["sizes"][0], (h, w))
        k = len(run.bundle.class_names)
        return logits.float().argmax(1)[0].cpu().numpy().astype(np.uint8 if k <= 255 else np.int64)

    def predict(self, run: TrainedRun, images: Any, settings: SegmentInferenceConfig, *,
                masks: str | Path = SegmentPredictOptions.masks,
                draw: str | Path = SegmentPredictOptions.draw, tile: str = SegmentPredictOptions.tile,
                overlap: float = SegmentPredictOptions.overlap,
                out: str | Path = SegmentPredictOptions.out) -> list[dict[str, Any]]:
        """Label maps per image, written as palette PNGs into ``masks`` (pixel values = labels,
        coloured as the run's colour table when it has one) and, with ``draw``, as overlays with a
        legend. Returns ``[{"image", "mask" (path or None), "classes": {name: fraction}}]``.

        ``tile``: each image (GeoTIFF / ``.npy`` scenes of any size) predicted in windows of that many
        pixels (``auto``: the run's size) overlapping by ``overlap``, logits averaged where they
        overlap, written as a one-band label GeoTIFF with the scene's CRS and transform: ``out`` (one
        scene), else ``masks/<stem>.tif``. Its record has ``"tiling"`` too."""
        from dinotune.viz.draw import save_image
        from dinotune.viz.segmentation import overlay, palette, save_mask_png, with_legend

        limit = self.cfg.data.max_image_pixels
        spec = InputSpec.from_meta(run.meta)
        tiling = Tiling.from_options(tile, training_tile(run), overlap)
        if tiling is not None:
            return self._predict_scenes(run, images, settings, tiling, Path(masks) if masks else None,
                                        Path(out) if out else None, draw)
        if out:
            raise ConfigError("--out FILE.tif writes the label GeoTIFF of a tiled prediction: add --tile")
        paths = readable_images(images, "fast", max_pixels=limit, layout=spec.layout)
        check_inputs(paths, spec, "prediction")
        names = run.bundle.class_names
        colours = self._run_colours(run)
        ignore = run.meta.get("ignore_index", self.cfg.data.ignore_index)
        pal = palette(len(names), ignore, colours=colours.rgb if colours else None)
        run.bundle.model.eval()
        results = []
        for p in progress(paths, len(paths) > 1, desc="predicting"):
            image = read_input(p, limit, spec.layout)
            mask = self.predict_mask(run, image)
            classes = class_shares(mask, names)  # the runtime's record
            mask_path = save_mask_png(mask, Path(masks) / f"{p.stem}.png", pal) if masks else None
            if draw:
                drawn = overlay(stretch_to_rgb(image, spec.rgb_bands), mask, pal)
                save_image(with_legend(drawn, mask, pal, names, ignore), Path(draw) / f"{p.stem}.jpg")
            results.append({"image": str(p), "mask": str(mask_path) if mask_path else None, "classes": classes})
        if masks:
            info(f"wrote {len(results)} label map(s) (palette PNGs, values = class indices) to {masks}")
        if draw:
            info(f"wrote {len(results)} overlay(s) with a legend to {draw}")
        return results

    def _predict_scenes(self, run: TrainedRun, images: Any, settings: SegmentInferenceConfig, tiling: Tiling,
                        masks: Path | None, out: Path | None, draw: str | Path) -> list[dict[str, Any]]:
        """``predict --tile``: a label GeoTIFF per scene (``tiled.predict_scene``)."""
        from dinotune.tasks.segment.tiled import predict_scene

        if draw:
            raise ConfigError("--draw with --tile: open the label GeoTIFF (it has a colour table) over the scene in a "
                              "GIS, or predict without --tile")
        paths = scene_paths(images)
        if out is not None and len(paths) > 1:
            raise ConfigError(f"--out {out}: one label GeoTIFF per scene; {len(paths)} inputs were given: use --masks DIR")
        if out is None and masks is None:
            raise ConfigError("--tile on a segmentation run writes a label GeoTIFF per scene: name it with --out "
                              "FILE.tif (one scene) or --masks DIR")
        colours = self._run_colours(run)
        results = []
        for p in paths:
            target = out if out is not None else masks / f"{p.stem}.tif"
            target.parent.mkdir(parents=True, exist_ok=True)
            results.append(predict_scene(self, run, p, settings, tiling, target, colours.rgb if colours else None))
            say(f"wrote {target} (one band, class indices, {tiling.tile} px tiles, overlap {tiling.overlap:g})")
        return results

    def evaluate_data(self, run: TrainedRun, data: str, split: str, settings: SegmentInferenceConfig, *,
                      images: str = "", subset: int = 0, subset_seed: int = 0,
                      pre_transform: Callable | None = None, labels: str = "") -> dict[str, Any]:
        """mIoU and friends of ``run`` on a dataset whose classes must match the checkpoint's
        (``subset``: a reproducible random subset of that many images), or on a scene with
        ``labels`` (vector labels or a label raster; the run's own for its training scene): the
        tiles of its validation blocks (``split`` val), training blocks (train) or all of it (test)."""
        if is_scene_evaluation(data, labels, subset=subset, pre_transform=pre_transform):
            from dinotune.tasks.segment.scene_data import SceneSegmentation

            ds = SceneSegmentation(self).evaluation_dataset(run, data, labels, split, run.bundle.model.patch_size)
            return self.evaluate(run.bundle, self._eval_loader(ds, settings.batch_size), run.device, run.precision,
                                 show_progress=True)
        names = run.bundle.class_names
        source = self._find(data, self._split(split), images, run.bundle.categories, names, self._run_colours(run))
        if subset and subset < len(source):
            source = source.subset(subset_indices(len(source), subset, subset_seed))
        if len(source.class_names) != len(names):
            raise DataError(f"the checkpoint was trained for {len(names)} classes but {source.name} has "
                            f"{len(source.class_names)}")
        source = scan_source(source, self.cfg.data.check_images, max_pixels=self.cfg.data.max_image_pixels)
        source.report.print("files")
        spec = InputSpec.from_meta(run.meta)
        check_inputs([p for p, _ in source.pairs], spec, "evaluation")
        ds = self._dataset(source, False, run.bundle.model.patch_size, pre_transform=pre_transform, spec=spec)
        loader = self._eval_loader(ds, settings.batch_size)
        return self.evaluate(run.bundle, loader, run.device, run.precision, show_progress=True)

    def report(self, out_dir: Path, metrics: dict[str, Any], meta: dict[str, Any]) -> list[Path]:
        from dinotune.viz.plots import plot_bars

        ious = {k: v for k, v in (metrics.get("per_class_IoU") or {}).items() if v is not None}
        if not ious:
            return []
        return [plot_bars(ious, Path(out_dir) / "per_class_iou.png", f"IoU per class (mIoU {metrics['mIoU']:.3f})", "IoU")]

    def sample_charts(self, run: TrainedRun, data: str, split: str, out_dir: Path, samples: int,
                      settings: Any = None) -> list[Path]:
        """Image | ground truth | prediction figures for ``samples`` evaluation images."""
        from dinotune.viz.segmentation import comparison_figure

        try:
            source = self._find(data, self._split(split), "", run.bundle.categories, run.bundle.class_names,
                                self._run_colours(run))
        except DataError as exc:
            warn(f"no sample pictures: {exc}")
            return []
        step = max(1, len(source) // max(1, samples))
        spec = InputSpec.from_meta(run.meta)
        colours = self._run_colours(run)
        files = []
        for index in list(range(0, len(source), step))[:samples]:
            image_path = source.pairs[index][0]
            image = read_input(image_path, self.cfg.data.max_image_pixels, spec.layout)
            gt = load_mask(source, index)
            pred = self.predict_mask(run, image)
            files.append(comparison_figure(stretch_to_rgb(image, spec.rgb_bands), gt, pred, run.bundle.class_names,
                                           Path(out_dir) / "samples" / f"{Path(image_path).stem}.png",
                                           ignore_index=run.meta.get("ignore_index", self.cfg.data.ignore_index),
                                           colours=colours.rgb if colours else None))
        return files

    def summary_table(self, metrics: dict[str, Any]) -> str | None:
        return format_iou_table(metrics) if "per_class_IoU" in metrics else None

    def export_graph(self, run: TrainedRun, model: torch.nn.Module, image_size: int) -> ExportGraph:
        graph = build_graph(model, run.cfg, run.meta.get("ignore_index", run.cfg.data.ignore_index))
        colours = self._run_colours(run)
        if colours is not None:  # the runtime colours label PNGs and overlays as the torch path does
            graph.postprocess["mask_colors"] = colours.to_meta()
        return graph
