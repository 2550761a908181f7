"""Semantic segmentation as a Task: VOC / ADE20K / folders / COCO masks, linear or FPN decoder,
cross-entropy with an ignore index, confusion-matrix mIoU over the whole validation set."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from dinotune.config import SegmentConfig
from dinotune.data.images import load_image, readable_images
from dinotune.data.loader import make_loader
from dinotune.engine.device import autocast, to_device
from dinotune.engine.logging import progress
from dinotune.tasks.base import Task, TaskData, build_backbone
from dinotune.tasks.segment.data import (
    DataError,
    SegmentationDataset,
    describe,
    eval_size,
    find_segmentation_data,
    load_mask,
    scan_source,
    segmentation_collate,
)
from dinotune.tasks.segment.decoders import build_segmenter
from dinotune.tasks.segment.inference import crop_and_resize, predict_logits
from dinotune.tasks.segment.metrics import SegmentationMetrics
from dinotune.utils import info, warn


class SegmentTask(Task):
    name = "segment"
    monitor = "mIoU"
    monitor_mode = "max"

    def __init__(self, cfg: SegmentConfig):
        super().__init__(cfg)
        self.class_names: list[str] = []
        self.categories: list[dict[str, Any]] | None = None
        self.loss_fn: nn.Module | None = None

    # ---------------------------------------------------------------------------------- data
    def _find(self, data: str, split: str, images: str = "", categories=None):
        d = self.cfg.data
        return find_segmentation_data(data, split, images, num_classes=d.num_classes, class_names=d.class_names,
                                      ignore_index=d.ignore_index, categories=categories)

    def build_data(self, run_dir: Path | None) -> TaskData:
        d, size = self.cfg.data, self.cfg.backbone.image_size
        train = self._subset(self._find(d.data, "train", d.train_images), d.subset, run_dir, "subset.json")
        if d.overfit:
            train = train.subset(list(range(min(d.overfit, len(train)))))
            val = train
            info(f"overfit mode: training and evaluating on the same {len(train)} images, no augmentation")
        else:
            try:
                val = self._find(d.val_data or d.data, "val", d.val_images, categories=train.categories)
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
        train = scan_source(train, d.check_images)
        train.report.print("files")
        info(describe(train))
        if val is not None and val is not train:
            val = scan_source(val, d.check_images)
            val.report.print("files")
            info(describe(val))
        if not len(train):
            raise DataError(f"{train.name}: no usable training images")
        slide = self.cfg.model.inference == "slide"
        train_ds = SegmentationDataset(train, train=True, image_size=size, augment=d.augment and not d.overfit)
        val_ds = (SegmentationDataset(val, train=False, image_size=size, keep_full_resolution=slide)
                  if val is not None else None)
        meta = {"task": self.name, "class_names": train.class_names, "num_classes": len(train.class_names),
                "ignore_index": d.ignore_index, "categories": train.categories}
        return TaskData(train_ds, val_ds, meta)

    def _subset(self, source, n: int, run_dir: Path | None, name: str):
        """A reproducible random subset of ``n`` images (seeded by ``--subset-seed``), recorded by
        file name in the run folder."""
        if not n or n >= len(source):
            return source
        gen = torch.Generator().manual_seed(self.cfg.data.subset_seed)
        picked = sorted(torch.randperm(len(source), generator=gen)[:n].tolist())
        source = source.subset(picked)
        if run_dir is not None:
            from dinotune.utils import write_json

            write_json(Path(run_dir) / name, {"images": [str(p) for p, _ in source.pairs], "n": n,
                                               "seed": self.cfg.data.subset_seed, "source": source.name})
        return source

    def loaders(self, data: TaskData) -> tuple[DataLoader, DataLoader | None]:
        t = self.cfg.train
        pin = torch.cuda.is_available()
        train = make_loader(data.train, t.batch_size, shuffle=True, workers=t.workers, seed=t.seed,
                            collate_fn=partial(segmentation_collate, train=True, ignore_index=self.cfg.data.ignore_index),
                            drop_last=True, pin_memory=pin)
        val = None
        if data.val is not None:
            # sliding windows run one full-resolution image at a time
            bs = 1 if self.cfg.model.inference == "slide" else t.batch_size
            val = make_loader(data.val, bs, shuffle=False, workers=t.workers,
                              collate_fn=partial(segmentation_collate, train=False), pin_memory=pin)
        return train, val

    # --------------------------------------------------------------------------------- model
    def build_model(self, meta: dict[str, Any], model_override: str | None = None) -> nn.Module:
        backbone = build_backbone(self.cfg, meta, model_override)
        self.class_names, self.categories = meta["class_names"], meta.get("categories")
        k = meta["num_classes"]
        weights = self.cfg.loss.class_weights
        if weights and len(weights) != k:
            raise DataError(f"--class-weights has {len(weights)} values but the data has {k} classes")
        self.loss_fn = nn.CrossEntropyLoss(ignore_index=self.cfg.data.ignore_index,
                                           weight=torch.tensor(weights, dtype=torch.float32) if weights else None)
        m = self.cfg.model
        return build_segmenter(backbone, k, m.decoder, m.linear_layers, m.fpn_layers, m.fpn_dim)

    def _loss(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of ``B x K x h x w`` logits upsampled to the ``B x H x W`` labels."""
        up = F.interpolate(logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
        self.loss_fn.to(up.device)
        return self.loss_fn(up, masks)

    # ------------------------------------------------------------------------- step and eval
    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"loss": self._loss(model(batch["images"]), batch["masks"])}

    def _image_logits(self, model, images: torch.Tensor, i: int, size: tuple[int, int],
                      out_size: tuple[int, int]) -> torch.Tensor:
        m, s = self.cfg.model, self.cfg.backbone.image_size
        return predict_logits(model, images[i: i + 1], out_size, mode=m.inference, window=s,
                              stride=m.slide_stride or (s * 2 // 3) // 14 * 14, valid_size=size)

    @torch.no_grad()
    def evaluate(self, model, loader, device, precision, show_progress=False) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        metrics = SegmentationMetrics(len(self.class_names), self.cfg.data.ignore_index, self.class_names)
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
                loss_sum += self._eval_loss(logits, mask, tuple(size))
                n += 1
                metrics.update(logits.argmax(1)[0], mask)
        model.train(was_training)
        out = {"loss": loss_sum / max(1, n)}
        out.update(metrics.compute())
        return out

    def _eval_loss(self, logits: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]) -> float:
        """Validation loss at the network's input resolution (labels nearest-resized): the metrics
        use full-resolution logits, but a K-channel cross-entropy there would double the cost."""
        small = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        labels = F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0].long()
        return float(self.loss_fn.to(logits.device)(small, labels))

    # ------------------------------------------------------------------------------ inference
    def predict_mask(self, loaded, image) -> np.ndarray:
        """``H x W`` label map for one PIL image at its own resolution."""
        from torchvision.transforms import v2

        from dinotune.data.transforms import normalize

        s, m = loaded.cfg.backbone.image_size, loaded.cfg.model
        h, w = image.height, image.width
        size = (h, w) if m.inference == "slide" else eval_size(h, w, s)
        tensor = v2.Compose([v2.ToImage(), v2.Resize(list(size), antialias=True),
                             v2.ToDtype(torch.float32, scale=True), normalize()])(image)
        # the same zero padding to multiples of 14 as evaluation batches
        item = {"image": tensor, "mask": torch.zeros(h, w, dtype=torch.int64), "index": 0}
        batch = segmentation_collate([item], train=False)
        with torch.no_grad(), autocast(loaded.device, loaded.precision):
            logits = self._image_logits(loaded.model, batch["images"].to(loaded.device), 0, batch["sizes"][0], (h, w))
        return logits.float().argmax(1)[0].cpu().numpy().astype(np.uint8 if len(self.class_names) <= 255 else np.int64)

    def predict_images(self, loaded, images, batch_size: int = 1, out_dir: str | Path | None = None,
                       draw: str | Path | None = None, **_: Any) -> list[dict[str, Any]]:
        """Label maps per image, written as palette PNGs into ``out_dir`` (pixel values = labels) and,
        with ``draw``, as overlays. Returns ``[{"image", "mask" (path or None), "classes": {name: fraction}}]``."""
        from dinotune.viz.segmentation import overlay, palette, save_mask_png
        from dinotune.viz.draw import save_image

        paths = readable_images(images, "fast")
        self.class_names = loaded.meta["class_names"]
        pal = palette(len(self.class_names), loaded.meta.get("ignore_index", 255))
        loaded.model.eval()
        results = []
        for p in progress(paths, len(paths) > 1, desc="predicting"):
            image = load_image(p)
            mask = self.predict_mask(loaded, image)
            counts = np.bincount(mask.ravel(), minlength=len(self.class_names))
            classes = {self.class_names[c]: round(float(v) / mask.size, 5) for c, v in enumerate(counts) if v}
            mask_path = save_mask_png(mask, Path(out_dir) / f"{p.stem}.png", pal) if out_dir else None
            if draw:
                save_image(overlay(image, mask, pal), Path(draw) / f"{p.stem}.jpg")
            results.append({"image": str(p), "mask": str(mask_path) if mask_path else None, "classes": classes})
        return results

    def format_predictions(self, results: list[dict[str, Any]], fmt: str) -> str:
        """JSON list, or CSV with one row per image and class (pixel fraction)."""
        import csv
        import io
        import json

        if fmt == "json":
            return json.dumps(results, indent=2) + "\n"
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["image", "mask", "class", "fraction"])
        for r in results:
            for name, frac in r["classes"].items():
                w.writerow([r["image"], r["mask"] or "", name, frac])
        return buf.getvalue()

    def evaluate_data(self, loaded, data: str, split: str = "val", batch_size: int = 4, images: str = "",
                      pre_transform=None, subset: int = 0, subset_seed: int = 0) -> dict[str, Any]:
        """mIoU and friends of ``loaded`` on a dataset whose classes must match the checkpoint's
        (``subset``: a reproducible random subset of that many images)."""
        self.class_names = loaded.meta["class_names"]
        source = self._find(data, "val" if split == "val" else "train", images, loaded.meta.get("categories"))
        if subset and subset < len(source):
            gen = torch.Generator().manual_seed(subset_seed)
            source = source.subset(sorted(torch.randperm(len(source), generator=gen)[:subset].tolist()))
        if len(source.class_names) != len(self.class_names):
            raise DataError(f"the checkpoint was trained for {len(self.class_names)} classes but {source.name} has "
                            f"{len(source.class_names)}")
        source = scan_source(source, self.cfg.data.check_images)
        source.report.print("files")
        slide = loaded.cfg.model.inference == "slide"
        ds = SegmentationDataset(source, train=False, image_size=loaded.cfg.backbone.image_size,
                                 keep_full_resolution=slide, pre_transform=pre_transform)
        loader = make_loader(ds, 1 if slide else batch_size, shuffle=False, workers=self.cfg.train.workers,
                             collate_fn=partial(segmentation_collate, train=False))
        return self.evaluate(loaded.model, loader, loaded.device, loaded.precision, show_progress=True)

    def report(self, run_dir: Path, metrics: dict[str, Any], meta: dict[str, Any]) -> list[Path]:
        from dinotune.viz.plots import plot_bars

        ious = {k: v for k, v in (metrics.get("per_class_IoU") or {}).items() if v is not None}
        if not ious:
            return []
        return [plot_bars(ious, Path(run_dir) / "per_class_iou.png", f"IoU per class (mIoU {metrics['mIoU']:.3f})", "IoU")]

    def sample_charts(self, loaded, data: str, split: str, out_dir: Path, samples: int) -> list[Path]:
        """Image | ground truth | prediction figures for ``samples`` evaluation images."""
        from dinotune.viz.segmentation import comparison_figure

        try:
            source = self._find(data, "val" if split == "val" else "train", "", loaded.meta.get("categories"))
        except DataError as exc:
            warn(f"no sample pictures: {exc}")
            return []
        self.class_names = loaded.meta["class_names"]
        step = max(1, len(source) // max(1, samples))
        files = []
        for index in list(range(0, len(source), step))[:samples]:
            image_path = source.pairs[index][0]
            image = load_image(image_path)
            gt = load_mask(source, index)
            pred = self.predict_mask(loaded, image)
            files.append(comparison_figure(image, gt, pred, self.class_names,
                                           Path(out_dir) / "samples" / f"{Path(image_path).stem}.png",
                                           ignore_index=loaded.meta.get("ignore_index", 255)))
        return files
