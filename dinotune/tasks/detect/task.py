"""Object detection as a Task: COCO / YOLO data, DETR-style or single-object model, set loss,
COCO evaluation, and inference that writes COCO results and drawn images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from dinotune.config import DetectConfig
from dinotune.data.images import load_image, readable_images
from dinotune.data.loader import make_loader
from dinotune.engine.device import autocast, to_device
from dinotune.engine.logging import progress
from dinotune.ops import box_ops
from dinotune.tasks.base import Task, TaskData, build_backbone
from dinotune.tasks.detect.coco import DetectionSource
from dinotune.tasks.detect.coco_eval import coco_evaluate
from dinotune.tasks.detect.criterion import SetCriterion
from dinotune.tasks.detect.data import (
    DataError,
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
from dinotune.tasks.detect.detr import build_detr
from dinotune.tasks.detect.matcher import HungarianMatcher
from dinotune.tasks.detect.postprocess import PostProcess, to_coco_results
from dinotune.tasks.detect.single import SingleObjectDetector, SingleObjectHead, SingleObjectLoss, largest_objects
from dinotune.tasks.detect.single_metrics import single_object_metrics
from dinotune.tasks.detect.transforms import eval_transforms, resize_pad, to_input, train_transforms
from dinotune.utils import info, warn


class DetectTask(Task):
    name = "detect"
    monitor = "AP"
    monitor_mode = "max"

    def __init__(self, cfg: DetectConfig):
        super().__init__(cfg)
        m, lo = cfg.model, cfg.loss
        self.detr = m.head == "detr"
        # single-object heads are judged by the seeds' mAP@0.5 against each image's largest object
        self.monitor = "AP" if self.detr else "map50"
        if self.detr:
            matcher = HungarianMatcher(cost_class=lo.class_weight, cost_bbox=lo.bbox_weight,
                                       cost_giou=lo.giou_weight, focal_alpha=lo.focal_alpha,
                                       focal_gamma=lo.focal_gamma)
            self._matcher = matcher
        self.postprocess = PostProcess(topk=m.topk, score_threshold=m.score_threshold,
                                       canvas_size=cfg.backbone.image_size)
        self.categories: list[dict[str, Any]] = []
        self.loss_fn: nn.Module | None = None

    # ---------------------------------------------------------------------------------- data
    def build_data(self, run_dir: Path | None) -> TaskData:
        d, size = self.cfg.data, self.cfg.backbone.image_size
        train = find_detection_data(d.data, "train", d.train_images, min_box_size=d.min_box_size)
        train = self._subset(train, d.subset, d.subset_seed, d.subset_file, run_dir, "subset.json")
        if d.overfit:
            train = train.with_images(train.images[: d.overfit])
            val = train
            info(f"overfit mode: training and evaluating on the same {len(train)} images, no augmentation")
        else:
            val = self._val_source(train)
            if val is not None and d.val_subset:
                val = self._subset(val, d.val_subset, d.subset_seed, "", run_dir, "val_subset.json")
        train = scan_source(train, d.check_images)
        train.report.print("train")
        info(describe(train))
        if val is not None and val is not train:
            val = scan_source(val, d.check_images)
            val.report.print("val")
            info(describe(val))
        if not len(train):
            raise DataError(f"{train.name}: no usable training images")
        augment = d.augment and not d.overfit
        train_ds = DetectionDataset(train, train_transforms(size) if augment else eval_transforms(), size)
        val_ds = DetectionDataset(val, eval_transforms(), size) if val is not None else None
        if val_ds is not None:
            val_ds.source = val  # the ground truth for COCO evaluation
        meta = {"task": self.name, "categories": train.categories, "class_names": train.class_names,
                "num_classes": len(train.categories), "head": self.cfg.model.head}
        return TaskData(train_ds, val_ds, meta)

    def _val_source(self, train: DetectionSource) -> DetectionSource | None:
        d = self.cfg.data
        try:
            return find_detection_data(d.val_data or d.data, "val", d.val_images, categories=train.categories,
                                       min_box_size=d.min_box_size)
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
        t = self.cfg.train
        pin = torch.cuda.is_available()
        train = make_loader(data.train, t.batch_size, shuffle=True, workers=t.workers, seed=t.seed,
                            collate_fn=detection_collate, pin_memory=pin)
        val = (make_loader(data.val, t.batch_size, shuffle=False, workers=t.workers,
                           collate_fn=detection_collate, pin_memory=pin) if data.val is not None else None)
        return train, val

    # --------------------------------------------------------------------------------- model
    def build_model(self, meta: dict[str, Any], model_override: str | None = None) -> nn.Module:
        backbone = build_backbone(self.cfg, meta, model_override)
        self.categories = meta["categories"]
        m, lo, k = self.cfg.model, self.cfg.loss, meta["num_classes"]
        if self.detr:
            weights = {"loss_ce": lo.class_weight, "loss_bbox": lo.bbox_weight, "loss_giou": lo.giou_weight}
            self.loss_fn = SetCriterion(k, self._matcher, weights, focal_alpha=lo.focal_alpha,
                                        focal_gamma=lo.focal_gamma, aux_loss=lo.aux_loss)
            return build_detr(backbone, k, m.num_queries, m.decoder_layers, m.hidden_dim, m.num_heads,
                              m.ffn_dim, m.sampling_points, m.pyramid_scales, m.decoder_dropout)
        self.loss_fn = SingleObjectLoss(m.head, box_weight=lo.box_loss_weight, focal_gamma=lo.focal_gamma,
                                        focal_alpha=lo.focal_alpha)
        return SingleObjectDetector(backbone, SingleObjectHead(m.head, backbone.embed_dim, k))

    # ------------------------------------------------------------------------- step and eval
    def _losses(self, outputs: dict[str, Any], targets: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.detr:
            losses = self.loss_fn(outputs, targets)
            total = self.loss_fn.total(losses)
            # the epoch log keeps the last layer's components; aux layers only add to the total
            return {"loss": total, **{k: v.detach() for k, v in losses.items() if k.count("_") == 1}}
        return self.loss_fn(outputs, targets)

    def training_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self._losses(model(batch["images"]), batch["targets"])

    def detections(self, outputs: dict[str, Any], scales, orig_sizes) -> list[dict[str, torch.Tensor]]:
        """Per image ``{"scores", "labels", "boxes"}`` (``xyxy`` in original pixels), best first."""
        if self.detr:
            return self.postprocess(outputs, scales, orig_sizes)
        size = self.cfg.backbone.image_size
        probs = outputs["logits"].float().softmax(-1)
        scores, labels = probs.max(-1)
        boxes = box_ops.cxcywh_to_xyxy(outputs["box"].float().clamp(0, 1)) * size
        out = []
        for i in range(len(scores)):
            h, w = [float(v) for v in orig_sizes[i]]
            b = box_ops.clip(boxes[i: i + 1] / float(scales[i]), w, h)
            out.append({"scores": scores[i: i + 1], "labels": labels[i: i + 1], "boxes": b})
        return out

    @torch.no_grad()
    def evaluate(self, model, loader, device, precision, show_progress=False) -> dict[str, Any]:
        was_training = model.training
        model.eval()
        results, loss_sum, n_batches = [], 0.0, 0
        single: dict[str, list] = {k: [] for k in ("pl", "ps", "pb", "gl", "gb")}
        for batch in progress(loader, show_progress, desc="evaluating"):
            batch = to_device(batch, device)
            targets = batch["targets"]
            with autocast(device, precision):
                outputs = model(batch["images"])
            loss_sum += float(self._losses(outputs, targets)["loss"])
            n_batches += 1
            scales = [t["scale"] for t in targets]
            sizes = torch.stack([t["orig_size"] for t in targets])
            dets = self.detections(outputs, scales, sizes)
            ids = [t["image_id"] for t in targets]
            results += to_coco_results([{k: v.cpu() for k, v in d.items()} for d in dets], ids, self.categories)
            if not self.detr:
                self._collect_single(single, dets, targets)
        model.train(was_training)
        gt = loader.dataset.source.coco_gt()
        metrics = {"loss": loss_sum / max(1, n_batches)}
        metrics.update(coco_evaluate(gt, results))
        metrics.pop("summary", None)
        if not self.detr and single["gl"]:
            metrics.update(single_object_metrics(
                torch.cat(single["pl"]), torch.cat(single["ps"]), torch.cat(single["pb"]),
                torch.cat(single["gl"]), torch.cat(single["gb"]), len(self.categories)))
        return metrics

    def _collect_single(self, acc: dict[str, list], dets: list[dict], targets: list[dict]) -> None:
        """The seeds' metric pairs: the image's prediction vs its largest object (original pixels)."""
        labels, boxes, present = largest_objects(targets)
        size = self.cfg.backbone.image_size
        for i, t in enumerate(targets):
            if not present[i]:
                continue
            gt_box = box_ops.cxcywh_to_xyxy(boxes[i: i + 1].float()) * size / float(t["scale"])
            acc["pl"].append(dets[i]["labels"][:1].cpu())
            acc["ps"].append(dets[i]["scores"][:1].cpu())
            acc["pb"].append(dets[i]["boxes"][:1].cpu())
            acc["gl"].append(labels[i: i + 1].cpu())
            acc["gb"].append(gt_box.cpu())

    # ------------------------------------------------------------------------------ inference
    def predict_images(self, loaded, images, top_k: int = 100, batch_size: int = 8,
                       score_threshold: float = 0.0, image_ids: dict[str, int] | None = None,
                       **_: Any) -> list[dict[str, Any]]:
        """Detections per image: ``[{"image", "image_id", "width", "height", "detections": [{"category_id",
        "category", "bbox" (xywh, original pixels), "score"}]}]``. ``image_ids`` maps file names to COCO
        ids (test-dev image info); otherwise numeric file stems are used, else 1..N."""
        paths = readable_images(images, "fast")
        ids = _image_ids(paths, image_ids)
        size = loaded.cfg.backbone.image_size
        finish = to_input()
        self.categories = loaded.meta["categories"]
        out = []
        loaded.model.eval()
        for start in progress(range(0, len(paths), batch_size), len(paths) > batch_size, desc="predicting"):
            chunk = paths[start: start + batch_size]
            canvases, scales, sizes = [], [], []
            for p in chunk:
                pil = load_image(p)
                from torchvision import tv_tensors
                from torchvision.transforms.v2 import functional as F

                canvas, _, factor = resize_pad(tv_tensors.Image(F.pil_to_tensor(pil)), torch.zeros(0, 4), size)
                canvases.append(finish(canvas.as_subclass(torch.Tensor)))
                scales.append(factor)
                sizes.append([pil.height, pil.width])
            with torch.no_grad(), autocast(loaded.device, loaded.precision):
                outputs = loaded.model(torch.stack(canvases).to(loaded.device))
            dets = self.detections(outputs, scales, torch.tensor(sizes))
            for p, d, (h, w) in zip(chunk, dets, sizes):
                keep = d["scores"] >= score_threshold
                boxes = box_ops.xyxy_to_xywh(d["boxes"][keep]).tolist()[:top_k]
                out.append({"image": str(p), "image_id": ids[str(p)], "width": w, "height": h, "detections": [
                    {"category_id": int(self.categories[int(lab)]["id"]), "category": self.categories[int(lab)]["name"],
                     "bbox": [round(v, 2) for v in box], "score": round(float(s), 5)}
                    for lab, s, box in zip(d["labels"][keep].tolist(), d["scores"][keep].tolist(), boxes)]})
        return out

    def format_predictions(self, results: list[dict[str, Any]], fmt: str) -> str:
        """COCO results JSON (a flat list, test-dev style), or CSV one row per detection."""
        import csv
        import io
        import json

        if fmt == "json":
            flat = [{"image_id": r["image_id"], "category_id": d["category_id"], "bbox": d["bbox"],
                     "score": d["score"]} for r in results for d in r["detections"]]
            return json.dumps(flat) + "\n"
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["image", "image_id", "category", "category_id", "score", "x", "y", "width", "height"])
        for r in results:
            for d in r["detections"]:
                w.writerow([r["image"], r["image_id"], d["category"], d["category_id"], d["score"], *d["bbox"]])
        return buf.getvalue()

    def evaluate_data(self, loaded, data: str, split: str = "val", batch_size: int = 8,
                      images: str = "", subset: int = 0, subset_seed: int = 0,
                      pre_transform=None) -> dict[str, Any]:
        """COCO metrics of ``loaded`` on a COCO / YOLO dataset (categories matched by id;
        ``subset``: a reproducible random subset of that many images; ``pre_transform``: PIL -> PIL
        applied to each image before preprocessing, e.g. a corruption)."""
        self.categories = loaded.meta["categories"]
        source = find_detection_data(data, "val" if split == "val" else "train", images,
                                     categories=self.categories, min_box_size=self.cfg.data.min_box_size)
        if subset:
            source = restrict(source, choose_subset(source, subset, subset_seed))
        source = scan_source(source, self.cfg.data.check_images)
        source.report.print(split)
        ds = DetectionDataset(source, eval_transforms(), self.cfg.backbone.image_size, pre_transform=pre_transform)
        ds.source = source
        loader = make_loader(ds, batch_size, shuffle=False, workers=self.cfg.train.workers,
                             collate_fn=detection_collate)
        return self.evaluate(loaded.model, loader, loaded.device, loaded.precision, show_progress=True)

    def sample_charts(self, loaded, data: str, split: str, out_dir: Path, samples: int) -> list[Path]:
        """Confidence histogram over up to 64 images and ``samples`` images with detections drawn."""
        from dinotune.tasks.detect.analysis import prediction_charts

        d = loaded.cfg.data
        try:
            source = find_detection_data(data, "val" if split == "val" else "train",
                                         d.val_images if split == "val" else d.train_images,
                                         categories=loaded.meta["categories"], min_box_size=d.min_box_size)
        except DataError as exc:
            warn(f"no sample pictures: {exc}")
            return []
        paths = [im.path for im in source.images[: max(samples, 64)]]
        preds = self.predict_images(loaded, paths, batch_size=8)
        return prediction_charts(preds, Path(out_dir), loaded.meta["class_names"], samples=samples)

    def report(self, run_dir: Path, metrics: dict[str, Any], meta: dict[str, Any]) -> list[Path]:
        from dinotune.tasks.detect.analysis import metric_charts

        return metric_charts(metrics, run_dir)


def _image_ids(paths: list[Path], mapping: dict[str, int] | None) -> dict[str, int]:
    """COCO image ids for prediction outputs: from ``mapping`` (file name -> id), else numeric file
    stems (COCO's 000000123456.jpg -> 123456), else 1..N in order."""
    if mapping:
        missing = [p.name for p in paths if p.name not in mapping]
        if missing:
            raise DataError(f"image info has no id for {', '.join(missing[:5])}")
        return {str(p): int(mapping[p.name]) for p in paths}
    if all(p.stem.isdigit() for p in paths) and len({int(p.stem) for p in paths}) == len(paths):
        return {str(p): int(p.stem) for p in paths}
    return {str(p): i + 1 for i, p in enumerate(paths)}
