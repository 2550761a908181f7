"""Why tile at all: COCO AP of one scene predicted in tiles against the same scene resized whole onto
the model's canvas, scored on the same ground truth (the objects of the validation blocks). Small
objects vanish when a 10 000-pixel scene becomes 518 pixels; this number says how much that costs on
the user's own scene.

Both predictions come from the run's model and post-processing; the scene is one COCO image, so
``maxDets`` is raised to the objects it holds (COCO's 100 would cap a scene of cars).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from dinotune.data.input_spec import InputSpec
from dinotune.engine.device import autocast
from dinotune.geo.scene import Window
from dinotune.tasks.base import TrainedRun
from dinotune.tasks.detect.coco_eval import coco_evaluate
from dinotune.tasks.detect.transforms import resize_pad, to_input
from dinotune.tasks.tiling import Tiling, as_tile_image, open_input_scene

if TYPE_CHECKING:
    from dinotune.tasks.detect.task import DetectTask

KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")


def resized_detections(run: TrainedRun, path: Any, max_pixels: int = 0) -> dict[str, np.ndarray]:
    """The scene predicted as one image resized onto the run's canvas (read as an overview, so
    memory follows the canvas): ``{"boxes": k x 4 xyxy scene pixels, "scores", "labels"}``."""
    spec = InputSpec.from_meta(run.meta)
    size = run.cfg.backbone.image_size
    with open_input_scene(path, spec, max_pixels) as scene:
        overview, factor = scene.read_overview(size)
    canvas, _, scale = resize_pad(as_tile_image(overview, spec), torch.zeros(0, 4), size)
    with torch.no_grad(), autocast(run.device, run.precision):
        outputs = run.bundle.model(to_input(spec)(canvas.as_subclass(torch.Tensor))[None].to(run.device))
    [det] = run.bundle.postprocess(outputs, [scale], torch.tensor([list(overview.shape[-2:])]))
    return {"boxes": det["boxes"].float().cpu().numpy().reshape(-1, 4) / factor,
            "scores": det["scores"].float().cpu().numpy(), "labels": det["labels"].cpu().numpy()}


def _inside(boxes: np.ndarray, region: Sequence[Window]) -> np.ndarray:
    """Which ``xyxy`` boxes have their centre inside one of the ``region`` windows."""
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    keep = np.zeros(len(boxes), bool)
    for w in region:
        keep |= (cx >= w.col) & (cx < w.col + w.width) & (cy >= w.row) & (cy < w.row + w.height)
    return keep


def scene_ap(truth_boxes: np.ndarray, truth_labels: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
             labels: np.ndarray, region: Sequence[Window], size: tuple[int, int], num_classes: int
             ) -> dict[str, Any]:
    """COCO box metrics (``KEYS``) of detections against ground truth, both ``xyxy`` scene pixels with
    class indices, counting only what has its centre in ``region``."""
    t, p = _inside(truth_boxes, region), _inside(boxes, region)
    xywh = lambda b: [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]  # noqa: E731
    gt = {"images": [{"id": 1, "height": size[0], "width": size[1]}],
          "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)],
          "annotations": [{"image_id": 1, "category_id": int(c) + 1, "bbox": xywh(b)}
                          for b, c in zip(truth_boxes[t], truth_labels[t])]}
    results = [{"image_id": 1, "category_id": int(c) + 1, "bbox": xywh(b), "score": float(s)}
               for b, s, c in zip(boxes[p], scores[p], labels[p])]
    metrics = coco_evaluate(gt, results, per_class=False, max_dets=max(100, len(results), int(t.sum())))
    out = {k: metrics[k] for k in KEYS}
    out.update(objects=int(t.sum()), detections=int(p.sum()))
    return out


def scene_comparison(task: "DetectTask", run: TrainedRun, data: str, labels: str, split: str, settings: Any
                     ) -> dict[str, Any]:
    """``tiled_versus_resized`` on the blocks of ``split`` of the scene ``data`` (``val``: the run's
    validation blocks, ``train``, ``test``: all of it), tiles of the run's training size overlapping
    by the ``predict --overlap`` default, ground truth the boxes of ``labels`` (the run's own for its
    training scene)."""
    from dinotune.config.tiling import TilePredictOptions
    from dinotune.geo.vectors import read_vector_labels
    from dinotune.tasks.scene_data import eval_labels, plan_for, scene_tile

    cfg, names = task.cfg, list(run.bundle.class_names)
    labels = eval_labels(cfg, data, labels)
    with open_input_scene(data, InputSpec.from_meta(run.meta)) as scene:
        found = read_vector_labels(labels, scene, cfg.data.class_field, classes=names)
        plan = plan_for(cfg, scene)
        region = {"val": plan.val_blocks, "train": plan.train_blocks}.get(split, [Window(0, 0, scene.height,
                                                                                           scene.width)])
    boxes = np.array([g.bounds for g in found.geometries], float).reshape(-1, 4)
    classes = np.array([names.index(c) for c in found.classes], int)
    tiling = Tiling(scene_tile(cfg), TilePredictOptions.overlap)
    return tiled_versus_resized(task, run, Path(data), boxes, classes, region, settings, tiling)


def tiled_versus_resized(task: "DetectTask", run: TrainedRun, path: Any, truth_boxes: np.ndarray,
                         truth_labels: np.ndarray, region: Sequence[Window], settings: Any, tiling: Tiling
                         ) -> dict[str, Any]:
    """``{"tiled": metrics, "resized": metrics, "tiling": {...}}`` of one scene over ``region`` (see
    ``scene_ap``); the tiled prediction keeps every merged detection (``top_k`` lifted to them)."""
    import dataclasses

    from dinotune.tasks.detect.tiled import predict_scene

    many = dataclasses.replace(settings, top_k=1_000_000, score_threshold=0.0)
    record = predict_scene(task, run, path, 1, many, tiling, region)
    names = {c["name"]: i for i, c in enumerate(run.bundle.categories)}
    dets = record["detections"]
    tiled = {"boxes": np.array([[d["bbox"][0], d["bbox"][1], d["bbox"][0] + d["bbox"][2], d["bbox"][1] + d["bbox"][3]]
                                for d in dets], np.float64).reshape(-1, 4),
             "scores": np.array([d["score"] for d in dets]), "labels": np.array([names[d["category"]] for d in dets])}
    resized = resized_detections(run, path, task.cfg.data.max_image_pixels)
    size = (record["height"], record["width"])
    k = len(run.bundle.categories)
    truth_boxes, truth_labels = np.asarray(truth_boxes, float).reshape(-1, 4), np.asarray(truth_labels)
    return {"tiled": scene_ap(truth_boxes, truth_labels, tiled["boxes"], tiled["scores"], tiled["labels"], region,
                              size, k),
            "resized": scene_ap(truth_boxes, truth_labels, resized["boxes"], resized["scores"], resized["labels"],
                                region, size, k),
            "tiling": record["tiling"]}


def comparison_table(scene: dict[str, Any] | None) -> str | None:
    """``scene_comparison``'s numbers as a few lines for the terminal (None without them)."""
    if not scene:
        return None
    t = scene["tiling"]
    lines = [f"the scene's objects in the evaluated blocks, tiled ({t['tile']} px, overlap {t['overlap']:g}, "
             f"{t['merge']}) vs resized whole:", f"{'':10}" + "".join(f"{k:>8}" for k in KEYS)]
    for name in ("tiled", "resized"):
        row = scene[name]
        lines.append(f"{name:10}" + "".join(f"{row[k]:8.3f}" if row[k] is not None else f"{'-':>8}" for k in KEYS))
    lines.append(f"{scene['tiled']['objects']} objects; {scene['tiled']['detections']} detections tiled, "
                 f"{scene['resized']['detections']} resized")
    return "\n".join(lines)
