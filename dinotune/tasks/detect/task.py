"""Object detection as a Task: COCO / YOLO data, a detector (``detectors.py``), COCO evaluation, and
inference that writes COCO results and drawn images."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dinotune.backbone.model import DinoBackbone
from dinotune.config import LIGHTWEIGHT_PRESET, DetectConfig, DetectInferenceConfig
from dinotune.config.detect import DetectPredictOptions
from dinotune.data.bands import InputSpec, check_inputs, read_input, resolve_input_spec
from dinotune.data.images import readable_images
from dinotune.data.loader import make_loader
from dinotune.data.sampler import (
    describe_image_balance,
    expected_image_draws,
    image_class_counts,
    rarest_class_weights,
)
from dinotune.engine import distributed
from dinotune.engine.device import autocast, to_device
from dinotune.engine.logging import progress
from dinotune.engine.monitor import MonitorChoice
from dinotune.errors import ConfigError, DataError
from dinotune.models.bundle import ModelBundle
from dinotune.models.graph import ExportGraph
from dinotune.tasks.base import Task, TaskData, TrainedRun, files_fingerprint
from dinotune.tasks.detect import runtime as records
from dinotune.tasks.detect.coco import DetectionSource
from dinotune.tasks.detect.coco_eval import STAT_NAMES
from dinotune.tasks.detect.data import (
    DetectionDataset,
    choose_subset,
    describe,
    detection_collate,
    find_detection_data,
    read_subset_file,
    restrict,
    scan_source,
    write_subset_file,
)
from dinotune.tasks.detect.detectors import build_detector
from dinotune.tasks.detect.evaluation import detection_metrics
from dinotune.tasks.detect.export import build_graph
from dinotune.tasks.detect.postprocess import to_coco_results
from dinotune.tasks.detect.single_metrics import SINGLE_OBJECT_KEYS
from dinotune.tasks.detect.transforms import eval_transforms, resize_pad, to_input, train_transforms
from dinotune.tasks.scene_data import is_scene_evaluation, is_scene_training
from dinotune.tasks.tiling import Tiling, scene_paths, scene_picture, training_tile
from dinotune.utils import info, warn


def _forward(bundle: ModelBundle, model: torch.nn.Module, batch: dict[str, Any]) -> Any:
    """The model's outputs on a batch; a detector that computes its losses inside forward (Faster
    R-CNN, ``needs_targets``) also gets the targets."""
    if getattr(bundle.model, "needs_targets", False):
        return model(batch["images"], batch["targets"])
    return model(batch["images"])


def _image_outputs(outputs: Any, i: int) -> Any:
    """Image ``i``'s slice of batched model outputs (tensors ``B x ...`` inside dicts and lists)."""
    if torch.is_tensor(outputs):
        return outputs[i: i + 1]
    if isinstance(outputs, dict):
        return {k: _image_outputs(v, i) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_image_outputs(v, i) for v in outputs)
    return outputs


class DetectTask(Task):
    name = "detect"
    monitor_mode = "max"
    pixel_aligned_labels = True
    supports_subset = True
    supports_labels = True  # eval --labels: a scene's

    cfg: DetectConfig

    # What a task built on detection replaces (instance segmentation: sources and items with masks)
    find_data = staticmethod(find_detection_data)
    dataset_class: type[DetectionDataset] = DetectionDataset

    @property
    def monitor(self) -> str:
        return build_detector(self.cfg).monitor

    def monitor_for(self, meta: dict[str, Any], val: Dataset | None) -> MonitorChoice:
        """The detector's metric (COCO AP; mAP@0.5 of the one detection for single-object heads),
        whatever the data; ``--monitor`` may name the validation loss, any COCO number and, for a
        single-object head, its single-object metrics."""
        detector = build_detector(self.cfg)
        keys = ("loss", *STAT_NAMES) + (SINGLE_OBJECT_KEYS if detector.single_object else ())
        what = "mAP@0.5 of each image's one detection" if detector.single_object else "COCO AP over every object"
        return MonitorChoice(detector.monitor, self.monitor_mode, f"--head {self.cfg.model.head}: {what}", keys)

    # ---------------------------------------------------------------------------------- data
    def build_data(self, run_dir: Path | None, patch_size: int) -> TaskData:
        d, size = self.cfg.data, self.cfg.backbone.image_size
        if is_scene_training(d):  # one raster and its labels, cut into tiles (scene_data.py)
            data = self.scene_data().build()
            if self.cfg.model.head == "detr":
                for ds in (data.train, data.val):
                    if ds is not None:
                        _warn_if_crowded(ds.source, self.cfg.model.num_queries, self.cfg.model.lightweight)
            return data
        train = self.find_data(d.data, "train", d.train_images, min_box_size=d.min_box_size,
                                    val_fraction=d.val_fraction, seed=self.cfg.train.seed)
        train = self._subset(train, d.subset, d.subset_seed, d.subset_file, run_dir, "subset.json")
        if d.overfit:
            train = train.with_images(train.images[: d.overfit])
            val = train
            info(f"overfit mode: training and evaluating on the same {len(train)} images, no augmentation")
        else:
            val = self._val_source(train)
            if val is not None and d.val_subset:
                val = self._subset(val, d.val_subset, d.subset_seed, "", run_dir, "val_subset.json")
        train = scan_source(train, d.check_images, d.max_image_pixels)
        train.report.print("train")
        info(describe(train))
        if val is not None and val is not train:
            val = scan_source(val, d.check_images, d.max_image_pixels)
            val.report.print("val")
            info(describe(val))
        if not len(train):
            raise DataError(f"{train.name}: no usable training images")
        if self.cfg.model.head == "detr":
            for src in (train, val) if val is not None and val is not train else (train,):
                _warn_if_crowded(src, self.cfg.model.num_queries, self.cfg.model.lightweight)
        b = self.cfg.bands
        spec = resolve_input_spec([im.path for im in train.images], in_channels=b.in_channels, rgb_bands=b.rgb_bands,
                                  layout=b.layout, stats=b.stats, mean=b.mean, std=b.std,
                                  max_pixels=d.max_image_pixels)
        if val is not None and val is not train:
            check_inputs([im.path for im in val.images], spec, "validation")
        augment = d.augment and not d.overfit
        train_ds = self.dataset_class(train, train_transforms(size, spec) if augment else eval_transforms(), size,
                                    max_image_pixels=d.max_image_pixels, spec=spec)
        val_ds = (self.dataset_class(val, eval_transforms(), size, max_image_pixels=d.max_image_pixels, spec=spec)
                  if val is not None else None)
        meta = {"task": self.name, "categories": train.categories, "class_names": train.class_names,
                "num_classes": len(train.categories), "head": self.cfg.model.head,
                "data_fingerprint": files_fingerprint([im.path for im in train.images] + [train.name]),
                "input": spec.to_meta()}
        return TaskData(train_ds, val_ds, meta)

    def scene_data(self) -> Any:
        """What builds this task's datasets from a scene (``scene_data.SceneDetection``; instance
        segmentation's adds masks)."""
        from dinotune.tasks.detect.scene_data import SceneDetection

        return SceneDetection(self)

    def _val_source(self, train: DetectionSource) -> DetectionSource | None:
        d = self.cfg.data
        try:
            return self.find_data(d.val_data or d.data, "val", d.val_images, categories=train.categories,
                                       min_box_size=d.min_box_size, val_fraction=d.val_fraction,
                                       seed=self.cfg.train.seed)
        except DataError as exc:
            if d.val_data:
                raise
            warn(f"no validation data ({exc}); training without evaluation")
            return None

    @staticmethod
    def _subset(source: DetectionSource, n: int, seed: int, subset_file: str, run_dir: Path | None,
                name: str) -> DetectionSource:
        if subset_file:
            ids = read_subset_file(subset_file)
            source = restrict(source, ids, subset_file)
        elif n:
            ids = choose_subset(source, n, seed)
            source = restrict(source, ids)
        else:
            return source
        if run_dir is not None:
            write_subset_file(Path(run_dir) / name, ids, {"n": len(ids), "seed": seed, "source": source.name})
            info(f"subset of {len(ids)} images; ids written to {Path(run_dir) / name}")
        return source

    def loaders(self, data: TaskData) -> tuple[DataLoader, DataLoader | None]:
        """Training and validation loaders; with ``--sampler balanced`` training images are drawn
        by the rarest class they contain (see ``dinotune.data.sampler``)."""
        t = self.cfg.train
        pin = torch.cuda.is_available()
        weights = self._balanced_weights(data) if self.cfg.data.sampler == "balanced" else None
        train = make_loader(data.train, t.batch_size, shuffle=True, workers=t.workers, seed=t.seed,
                            collate_fn=detection_collate, pin_memory=pin, weights=weights)
        val = (make_loader(data.val, t.batch_size, shuffle=False, workers=t.workers,
                           collate_fn=detection_collate, pin_memory=pin) if data.val is not None else None)
        return train, val

    @staticmethod
    def _balanced_weights(data: TaskData) -> torch.Tensor:
        """Rarest-class weights of the training images, from their annotations (no image decoded)."""
        if not isinstance(data.train, DetectionDataset):
            raise ConfigError(f"--sampler balanced reads the classes of every training image from its annotations, "
                              f"which a {type(data.train).__name__} does not list; use --sampler shuffle")
        image_labels = [labels.tolist() for labels in data.train.labels]
        names, n = list(data.meta["class_names"]), len(data.train)
        weights = rarest_class_weights(image_labels, len(names))
        info(describe_image_balance(names, image_class_counts(image_labels, len(names)),
                                    expected_image_draws(weights, image_labels, len(names), n),
                                    sum(1 for labels in image_labels if not labels), n))
        return weights

    # --------------------------------------------------------------------------------- model
    def build_model(self, meta: dict[str, Any], backbone: DinoBackbone) -> ModelBundle:
        return build_detector(self.cfg).build(backbone, meta["num_classes"], self.cfg, list(meta["class_names"]),
                                              list(meta["categories"]))

    # ------------------------------------------------------------------------- step and eval
    def training_step(self, bundle: ModelBundle, model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        # the box count is averaged over processes before normalising (DETR's num_boxes)
        return bundle.criterion(_forward(bundle, model, batch), batch["targets"], count_reduce=distributed.average_count)

    def evaluation_pass(self, bundle: ModelBundle, loader: DataLoader, device: torch.device, precision: str,
                        show_progress: bool) -> dict[str, Any]:
        """``{"results": COCO result dicts, "loss_sum": sum of per-image losses, "images": count}``.

        The loss is the mean over images of each image's own loss, so it does not depend on the
        batch size or on how images are split between processes."""
        results: list[dict[str, Any]] = []
        loss_sum, images = 0.0, 0
        for batch in progress(loader, show_progress, desc="evaluating"):
            batch = to_device(batch, device)
            targets = batch["targets"]
            with autocast(device, precision):
                outputs = _forward(bundle, bundle.model, batch)
            for i, target in enumerate(targets):
                loss_sum += float(bundle.criterion(_image_outputs(outputs, i), [target])["loss"])
            images += len(targets)
            dets = bundle.postprocess(outputs, [t["scale"] for t in targets],
                                      torch.stack([t["orig_size"] for t in targets]))
            results += self.coco_results([{k: v.cpu() for k, v in d.items()} for d in dets], targets, bundle)
        return {"results": results, "loss_sum": loss_sum, "images": images}

    def coco_results(self, dets: list[dict[str, torch.Tensor]], targets: list[dict[str, Any]],
                     bundle: ModelBundle) -> list[dict[str, Any]]:
        """COCO result dicts of a batch's post-processed detections (``to_coco_results``)."""
        return to_coco_results(dets, [t["image_id"] for t in targets], bundle.categories)

    def compute_metrics(self, bundle: ModelBundle, parts: Sequence[dict[str, Any]], dataset: Dataset) -> dict[str, Any]:
        images = sum(p["images"] for p in parts)
        metrics: dict[str, Any] = {"loss": sum(p["loss_sum"] for p in parts) / max(1, images)}
        # single-object metrics only for single-object heads: beside AP they read as the detector's accuracy
        metrics.update(detection_metrics(dataset.source, [r for p in parts for r in p["results"]],
                                         single_object=build_detector(self.cfg).single_object))
        metrics["images"] = int(images)  # how many images these numbers rest on (a subset, skipped files)
        return metrics

    # ------------------------------------------------------------------------------ inference
    def predict(self, run: TrainedRun, images: Any, settings: DetectInferenceConfig, *,
                draw: str | Path = DetectPredictOptions.draw,
                image_info: str | Path = DetectPredictOptions.image_info, tile: str = DetectPredictOptions.tile,
                overlap: float = DetectPredictOptions.overlap, merge: str = DetectPredictOptions.merge,
                coords: str = DetectPredictOptions.coords) -> list[dict[str, Any]]:
        """Detections per image: ``[{"image", "image_id", "width", "height", "detections": [{"category_id",
        "category", "bbox" (xywh, original pixels), "score"}]}]``. ``image_info``: a COCO image-info JSON
        whose ids the images get (test-dev's); otherwise numeric file stems are used, else 1..N. ``category_id``
        follows ``settings.category_ids``: the dataset's ids (``coco``; YOLO data: class index + 1)
        or the 0-based class index (``yolo``). ``draw``: a folder that receives each image with its
        boxes (``settings.draw_threshold``) and the confidence histogram. ``tile``: predict each image
        (GeoTIFF / ``.npy`` scenes of any size) in windows of that many pixels (``auto``: the run's
        size) overlapping by ``overlap``, duplicates across seams resolved by ``merge``; the record
        then has ``"tiling"`` and ``"georef"`` (``tiled.predict_scene``); ``coords`` is the GeoJSON
        output's."""
        if settings.category_ids not in ("coco", "yolo"):
            raise ConfigError(f"--category-ids {settings.category_ids!r}: choose coco or yolo (inference.category_ids)")
        tiling = Tiling.from_options(tile, training_tile(run), overlap, merge, coords)
        if tiling is not None:
            from dinotune.tasks.detect.tiled import predict_scene

            paths = scene_paths(images)
            ids = records.image_ids(paths, records.read_image_info(image_info))
            out = [predict_scene(self, run, p, ids[str(p)], settings, tiling) for p in paths]
            if draw:
                self.draw(out, lambda path: scene_picture(path, InputSpec.from_meta(run.meta)), Path(draw),
                          run.bundle.class_names, dataclasses.asdict(settings))
            return out
        limit = self.cfg.data.max_image_pixels
        spec = InputSpec.from_meta(run.meta)
        paths = readable_images(images, "fast", max_pixels=limit, layout=spec.layout)
        check_inputs(paths, spec, "prediction")
        ids = records.image_ids(paths, records.read_image_info(image_info))
        size = run.cfg.backbone.image_size
        categories = run.bundle.categories
        finish = to_input(spec)
        model, post = run.bundle.model.eval(), run.bundle.postprocess
        # the post-processing's own threshold and top-k were applied first; the call's come on top
        threshold = max(settings.score_threshold, getattr(post, "score_threshold", 0.0))
        out = []
        bs = settings.batch_size
        for start in progress(range(0, len(paths), bs), len(paths) > bs, desc="predicting"):
            chunk = paths[start: start + bs]
            canvases, scales, sizes = [], [], []
            for p in chunk:
                image = _as_image(read_input(p, limit, spec.layout))  # a picture, or a C x H x W band tensor
                canvas, _, factor = resize_pad(image, torch.zeros(0, 4), size)
                canvases.append(finish(canvas.as_subclass(torch.Tensor)))
                scales.append(factor)
                sizes.append(list(image.shape[-2:]))
            with torch.no_grad(), autocast(run.device, run.precision):
                outputs = model(torch.stack(canvases).to(run.device))
            dets = post(outputs, scales, torch.tensor(sizes))
            out += [self.record(str(p), ids[str(p)], (h, w), d, categories, threshold, settings)
                    for p, d, (h, w) in zip(chunk, dets, sizes)]
        if draw:
            from dinotune.data.bands import display_image  # band arrays through their RGB bands

            self.draw(out, lambda path: display_image(path, spec, limit), Path(draw), run.bundle.class_names,
                      dataclasses.asdict(settings))
        return out

    def record(self, image: str, image_id: int, size: tuple[int, int], det: dict[str, torch.Tensor],
               categories: list[dict[str, Any]], threshold: float, settings: DetectInferenceConfig) -> dict[str, Any]:
        """One image's predict record from its post-processed detections (the runtime's record, so
        both backends threshold, cap, round and name alike)."""
        return records.detection_record(image, image_id, size, det["scores"].cpu().numpy(), det["labels"].cpu().numpy(),
                                        det["boxes"].float().cpu().numpy(), categories, threshold, settings.top_k,
                                        settings.category_ids)

    def tile_extras(self, run: TrainedRun, det: dict[str, torch.Tensor], keep: np.ndarray, window: Any,
                    valid: tuple[int, int], settings: Any) -> dict[str, Any]:
        """What a tiled prediction keeps of one tile's post-processed detections ``det`` besides boxes,
        scores and labels (rows ``keep``), in scene pixels: nothing for boxes alone."""
        return {}

    def scene_record(self, image: str, image_id: int, size: tuple[int, int], merged: dict[str, Any],
                     categories: list[dict[str, Any]], settings: Any) -> dict[str, Any]:
        """One scene's record from its merged detections (``merged``: ``boxes`` k x 4 xyxy scene pixels,
        ``scores``, ``labels``, best first, and ``tile_extras``' keys)."""
        return records.detection_record(image, image_id, size, merged["scores"], merged["labels"], merged["boxes"],
                                        categories, 0.0, settings.top_k, settings.category_ids)

    @staticmethod
    def draw(out: list[dict[str, Any]], picture: Callable, folder: Path, names: list[str],
             settings: dict[str, Any]) -> None:
        """``predict --draw``: each image with what was found, into ``folder``."""
        from dinotune.tasks.detect.drawing import draw_predictions

        draw_predictions(out, picture, folder, names, settings)

    def evaluate_data(self, run: TrainedRun, data: str, split: str, settings: DetectInferenceConfig, *,
                      images: str = "", subset: int = 0, subset_seed: int = 0,
                      pre_transform: Callable | None = None, labels: str = "") -> dict[str, Any]:
        """COCO metrics of ``run`` on a COCO / YOLO dataset (categories matched by id;
        ``subset``: a reproducible random subset of that many images; ``pre_transform``: PIL -> PIL
        applied to each image before preprocessing, e.g. a corruption), or on a scene with
        ``labels`` (vector labels; the run's own for its training scene): the tiles of its
        validation blocks (``split`` val), training blocks (train) or all of it (test), plus ``"scene"``:
        box AP of the same blocks predicted in tiles and resized whole (``scene_eval``)."""
        if is_scene_evaluation(data, labels, subset=subset, pre_transform=pre_transform):
            from dinotune.tasks.detect.scene_eval import scene_comparison

            ds = self.scene_data().evaluation_dataset(run, data, labels, split)
            loader = make_loader(ds, settings.batch_size, shuffle=False, workers=self.cfg.train.workers,
                                 collate_fn=detection_collate)
            metrics = self.evaluate(run.bundle, loader, run.device, run.precision, show_progress=True)
            # the reason tiling exists, measured on this scene: its objects tiled vs resized whole
            metrics["scene"] = scene_comparison(self, run, data, labels, split, settings)
            return metrics
        d = self.cfg.data
        source = self.find_data(data, split, images, categories=run.bundle.categories,
                                     min_box_size=d.min_box_size, val_fraction=d.val_fraction, seed=self.cfg.train.seed)
        if subset:
            source = restrict(source, choose_subset(source, subset, subset_seed))
        limit = self.cfg.data.max_image_pixels
        spec = InputSpec.from_meta(run.meta)
        if pre_transform is not None and spec.arrays:
            raise ConfigError(f"image corruptions are defined on RGB pictures, not on band arrays ({spec.in_channels} bands)")
        source = scan_source(source, self.cfg.data.check_images, limit)
        source.report.print(split)
        check_inputs([im.path for im in source.images], spec, "evaluation")
        ds = self.dataset_class(source, eval_transforms(), self.cfg.backbone.image_size, pre_transform=pre_transform,
                              max_image_pixels=limit, spec=spec)
        loader = make_loader(ds, settings.batch_size, shuffle=False, workers=self.cfg.train.workers,
                             collate_fn=detection_collate)
        return self.evaluate(run.bundle, loader, run.device, run.precision, show_progress=True)

    def sample_charts(self, run: TrainedRun, data: str, split: str, out_dir: Path, samples: int,
                      settings: DetectInferenceConfig | None = None) -> list[Path]:
        """The confidence histogram over up to 64 images, and ``samples`` figures of ground truth |
        prediction (``out_dir/samples/<stem>.jpg``, as classification and segmentation samples show
        the truth too). Boxes are drawn from ``settings.draw_threshold`` (default: the run's
        inference section)."""
        from dinotune.tasks.detect.drawing import blank_drawing_note, confidence_histogram, shown_threshold

        d, settings = self.cfg.data, settings or run.cfg.inference
        try:
            images = {"train": d.train_images, "val": d.val_images}.get(split, "")
            source = self.find_data(data, split, images, categories=run.bundle.categories,
                                         min_box_size=d.min_box_size,
                                         val_fraction=d.val_fraction, seed=self.cfg.train.seed)
        except DataError as exc:
            warn(f"no sample pictures: {exc}")
            return []
        picked = source.images[: max(samples, 64)]
        preds = self.predict(run, [im.path for im in picked], settings)
        truth = {str(im.path): self.truth(source, im) for im in picked}
        threshold, _ = shown_threshold(dataclasses.asdict(settings))
        shown = preds[:samples]
        files = [confidence_histogram(preds, Path(out_dir))]
        files += self.truth_figures(shown, truth, Path(out_dir) / "samples", run.bundle.class_names, threshold,
                                    InputSpec.from_meta(run.meta))
        note = blank_drawing_note(shown, threshold, "--draw-threshold", settings.score_threshold)
        if note:
            warn(f"analyze: {note}")
        return files

    @staticmethod
    def truth(source: DetectionSource, image: Any) -> tuple:
        """What ``truth_figures`` draws of one image's ground truth: ``(xyxy boxes, labels,
        (width, height) annotated)``."""
        objects = source.annotations.get(image.id, ())
        return [a.bbox for a in objects], [a.label for a in objects], (image.width, image.height)

    @staticmethod
    def truth_figures(*args: Any) -> list[Path]:
        """Ground truth | prediction figures (``analysis.truth_figures``)."""
        from dinotune.tasks.detect.analysis import truth_figures

        return truth_figures(*args)

    def report(self, out_dir: Path, metrics: dict[str, Any], meta: dict[str, Any]) -> list[Path]:
        from dinotune.tasks.detect.analysis import metric_charts

        return metric_charts(metrics, out_dir)

    def summary_table(self, metrics: dict[str, Any]) -> str | None:
        from dinotune.tasks.detect.analysis import ap_table
        from dinotune.tasks.detect.scene_eval import comparison_table

        tables = [t for t in (ap_table(metrics), comparison_table(metrics.get("scene"))) if t]
        return "\n\n".join(tables) or None

    @classmethod
    def compare(cls, *, data: str, split: str, runs: Sequence[TrainedRun], run_names: Sequence[str],
                yolo: Sequence[str], out: Path, images: str, subset: int, subset_seed: int, device: str,
                batch_size: int | None, yolo_image_size: int | None, class_map: Any, defaults: Any) -> str:
        """Detection runs and YOLO baselines on the same images (``compare.py``)."""
        from dinotune.tasks.detect.compare import run_compare

        return run_compare(data=data, split=split, runs=runs, run_names=run_names, yolo=yolo, out=out, images=images,
                           subset=subset, subset_seed=subset_seed, device=device,
                           yolo_image_size=yolo_image_size or defaults.inference.compare_image_size,
                           batch_size=batch_size, min_box_size=defaults.data.min_box_size,
                           max_pixels=defaults.data.max_image_pixels, class_map=class_map)

    def export_graph(self, run: TrainedRun, model: torch.nn.Module, image_size: int) -> ExportGraph:
        return build_graph(model, run.bundle.postprocess, run.cfg, len(run.bundle.class_names), image_size)


def _as_image(image: Any) -> torch.Tensor:
    """What ``read_input`` returned as a ``C x H x W`` image tensor (a band tensor already is one)."""
    if isinstance(image, torch.Tensor):
        return image
    from torchvision import tv_tensors
    from torchvision.transforms.v2 import functional as F

    return tv_tensors.Image(F.pil_to_tensor(image))


def _warn_if_crowded(source: DetectionSource, num_queries: int, lightweight: bool) -> None:
    """Warn when images hold more objects than the DETR decoder has queries: each query predicts
    one object, so the extra objects are never matched and recall is capped, silently."""
    counts = [len(source.targets(im.id)) for im in source.images]
    over = sum(1 for c in counts if c > num_queries)
    if not over:
        return
    preset = " (set by --lightweight)" if lightweight and num_queries == LIGHTWEIGHT_PRESET["model.num_queries"] else ""
    warn(f"{source.name}: up to {max(counts)} objects in one image, and {over} of {len(counts)} images hold more "
         f"than the detector's {num_queries} object queries{preset}; the extra objects can never be detected. "
         f"Raise --num-queries to at least {max(counts)}")
