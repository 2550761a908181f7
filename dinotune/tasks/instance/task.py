"""``InstanceTask``: detection's task with a mask per object.

Everything detection does (data finding and checks, subsets, loaders, the training step, the
evaluation loop, prediction, comparison) is inherited; this class replaces what masks change: the
sources and items (``sources.py``, ``data.py``), the model and its loss (``model.py``,
``criterion.py``, or Mask R-CNN in ``maskrcnn.py``), COCO results with RLE masks, box + mask
metrics (``evaluation.py``), records with masks (``runtime.py``), drawings, charts and the export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from dinotune.backbone.model import DinoBackbone
from dinotune.config.instance import InstanceConfig
from dinotune.engine.monitor import MonitorChoice
from dinotune.models.bundle import ModelBundle
from dinotune.models.graph import ExportGraph
from dinotune.tasks.base import TrainedRun
from dinotune.tasks.detect.coco_eval import STAT_NAMES
from dinotune.tasks.detect.task import DetectTask
from dinotune.tasks.instance import masks as mask_ops
from dinotune.tasks.instance.masks import logit
from dinotune.tasks.instance.criterion import MaskHungarianMatcher, MaskSetCriterion
from dinotune.tasks.instance.data import InstanceDataset
from dinotune.tasks.instance.export import build_graph
from dinotune.tasks.instance.model import build_mask_detr
from dinotune.tasks.instance.postprocess import MaskPostProcess
from dinotune.tasks.instance.runtime import instance_record
from dinotune.tasks.instance.sources import find_instance_data


class InstanceTask(DetectTask):
    name = "instance"  # what detection's class attributes say (max is better, pixel-aligned, subsets) holds

    cfg: InstanceConfig

    find_data = staticmethod(find_instance_data)
    dataset_class = InstanceDataset

    def scene_data(self) -> Any:
        """Detection's scene datasets with a mask per object (``scene_data.SceneInstance``)."""
        from dinotune.tasks.instance.scene_data import SceneInstance

        return SceneInstance(self)

    @property
    def monitor(self) -> str:
        return "segm/AP"

    def monitor_for(self, meta: dict[str, Any], val: Dataset | None) -> MonitorChoice:
        """COCO mask AP whatever the data; ``--monitor`` may name the loss, any box AP / AR number or
        any mask one (``segm/AP50``, ...)."""
        keys = ("loss", *STAT_NAMES, *(f"segm/{k}" for k in STAT_NAMES))
        return MonitorChoice(self.monitor, self.monitor_mode, "COCO mask AP over every object", keys)

    # --------------------------------------------------------------------------------- model
    def build_model(self, meta: dict[str, Any], backbone: DinoBackbone) -> ModelBundle:
        names, categories, k = list(meta["class_names"]), list(meta["categories"]), meta["num_classes"]
        m, lo, inf = self.cfg.model, self.cfg.loss, self.cfg.inference
        if m.head == "maskrcnn":
            from dinotune.tasks.instance.maskrcnn import build_maskrcnn_bundle

            return build_maskrcnn_bundle(backbone, k, self.cfg, names, categories)
        matcher = MaskHungarianMatcher(lo.class_weight, lo.bbox_weight, lo.giou_weight, lo.focal_alpha, lo.focal_gamma,
                                       lo.mask_weight, lo.dice_weight, lo.mask_points)
        weights = {"loss_ce": lo.class_weight, "loss_bbox": lo.bbox_weight, "loss_giou": lo.giou_weight,
                   "loss_mask": lo.mask_weight, "loss_dice": lo.dice_weight}
        criterion = MaskSetCriterion(k, matcher, weights, lo.focal_alpha, lo.focal_gamma, lo.aux_loss,
                                     lo.mask_points, lo.oversample_ratio, lo.importance_ratio)
        post = MaskPostProcess(topk=inf.top_k, score_threshold=inf.score_threshold,
                               canvas_size=self.cfg.backbone.image_size)
        return ModelBundle(build_mask_detr(backbone, k, m), criterion.training_losses, post, names, categories,
                           find_unused_parameters=not lo.aux_loss)

    # -------------------------------------------------------------------------------- metrics
    def coco_results(self, dets: list[dict[str, torch.Tensor]], targets: list[dict[str, Any]],
                     bundle: ModelBundle) -> list[dict[str, Any]]:
        """COCO results with each detection's mask as RLE in the annotation's pixels."""
        out = super().coco_results([{k: v for k, v in d.items() if k != "masks"} for d in dets], targets, bundle)
        threshold = logit(self.cfg.inference.mask_threshold)
        start = 0
        for det, target in zip(dets, targets):
            h, w = (int(v) for v in target["orig_size"])
            rles, _ = mask_ops.encode_logits(det["masks"].float().numpy(), (h, w), self.cfg.backbone.image_size,
                                             threshold)
            for i, rle in enumerate(rles):
                out[start + i]["segmentation"] = rle
            start += len(rles)
        return out

    def compute_metrics(self, bundle: ModelBundle, parts: Sequence[dict[str, Any]], dataset: Dataset) -> dict[str, Any]:
        from dinotune.tasks.instance.evaluation import instance_metrics

        images = sum(p["images"] for p in parts)
        metrics: dict[str, Any] = {"loss": sum(p["loss_sum"] for p in parts) / max(1, images)}
        metrics.update(instance_metrics(dataset.source, [r for p in parts for r in p["results"]]))
        metrics["images"] = int(images)
        return metrics

    # ------------------------------------------------------------------------------ inference
    def record(self, image: str, image_id: int, size: tuple[int, int], det: dict[str, torch.Tensor],
               categories: list[dict[str, Any]], threshold: float, settings: Any) -> dict[str, Any]:
        return instance_record(image, image_id, size, det["scores"].cpu().numpy(), det["labels"].cpu().numpy(),
                               det["boxes"].float().cpu().numpy(), det["masks"].float().cpu().numpy(), categories,
                               threshold, settings.top_k, settings.category_ids, self.cfg.backbone.image_size,
                               logit(settings.mask_threshold))

    def tile_extras(self, run: TrainedRun, det: dict[str, torch.Tensor], keep: Any, window: Any,
                    valid: tuple[int, int], settings: Any) -> dict[str, Any]:
        """Each kept detection's mask as polygons in scene pixels (``tiled.tile_polygons``)."""
        from dinotune.tasks.instance.tiled import tile_polygons

        tile = (window.height, window.width)
        return {"polygons": tile_polygons(det["masks"].float().cpu().numpy(), keep, tile, self.cfg.backbone.image_size,
                                          logit(settings.mask_threshold), window, valid)}

    def scene_record(self, image: str, image_id: int, size: tuple[int, int], merged: dict[str, Any],
                     categories: list[dict[str, Any]], settings: Any) -> dict[str, Any]:
        """Detection's scene record with each object's ``segmentation`` as COCO polygons in scene pixels."""
        from dinotune.tasks.instance.tiled import add_polygons

        return add_polygons(super().scene_record(image, image_id, size, merged, categories, settings),
                            merged.get("polygons", []))

    @staticmethod
    def draw(out: list[dict[str, Any]], picture: Callable, folder: Path, names: list[str],
             settings: dict[str, Any]) -> None:
        from dinotune.tasks.instance.drawing import draw_predictions

        draw_predictions(out, picture, folder, names, settings)

    @staticmethod
    def truth(source: Any, image: Any) -> tuple:
        """``(xyxy boxes, labels, COCO segmentations, (width, height))`` of one image's objects."""
        objects = source.annotations.get(image.id, ())
        return ([a.bbox for a in objects], [a.label for a in objects],
                [source.segmentations.get(a.id) for a in objects], (image.width, image.height))

    @staticmethod
    def truth_figures(*args: Any) -> list[Path]:
        from dinotune.tasks.instance.drawing import truth_figures

        return truth_figures(*args)

    def report(self, out_dir: Path, metrics: dict[str, Any], meta: dict[str, Any]) -> list[Path]:
        from dinotune.tasks.instance.analysis import metric_charts

        return metric_charts(metrics, out_dir)

    def summary_table(self, metrics: dict[str, Any]) -> str | None:
        from dinotune.tasks.instance.analysis import mask_ap_table

        return mask_ap_table(metrics)

    def export_graph(self, run: TrainedRun, model: torch.nn.Module, image_size: int) -> ExportGraph:
        return build_graph(model, run.bundle.postprocess, run.cfg, len(run.bundle.class_names), image_size)


__all__ = ["InstanceTask"]
