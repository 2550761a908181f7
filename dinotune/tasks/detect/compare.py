"""``dinotune compare``: several detectors, the same images, the same metric code, one table.

Every detector turns image paths into detections in original pixels with the dataset's own
category ids; nothing else is detector-specific. Each is then scored by ``detection_metrics``
(the COCO AP suite and the single-object metrics, as in training-time evaluation), so a DETR
run, a single-object run and a YOLO model are judged identically. Runs arrive loaded
(``dinotune.api.compare`` loads them).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

import torch

from dinotune.errors import CheckpointError, ConfigError, DataError, DinotuneError
from dinotune.ops import box_ops
from dinotune.tasks.base import TrainedRun
from dinotune.tasks.detect.coco import DetectionSource
from dinotune.tasks.detect.data import choose_subset, find_detection_data, restrict, scan_source
from dinotune.tasks.detect.evaluation import detection_metrics
from dinotune.utils import info, warn, write_json

SHOWN = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "accuracy", "f1", "mean_iou", "map50"]


@dataclass
class Detections:
    """One image's detections: ``boxes`` ``N x 4`` xyxy original pixels, ``scores`` ``N``,
    ``category_ids`` ``N`` (the dataset's ids)."""

    boxes: torch.Tensor
    scores: torch.Tensor
    category_ids: torch.Tensor


class Detector(Protocol):
    """``name`` heads its table row; ``detect`` gives one ``Detections`` per path. A detector may
    also have ``notes`` (lines the table prints under it: what was dropped, random weights) and
    ``dropped`` (detections left out because their class is not the dataset's)."""

    name: str

    def detect(self, paths: Sequence[Path]) -> list[Detections]: ...


class RunDetector:
    """A loaded dinotune detection run (DETR-style or single-object); ``batch_size`` None: the
    run's own inference batch size."""

    def __init__(self, loaded: TrainedRun, name: str, batch_size: int | None = None):
        if loaded.cfg.task != "detect":
            raise ValueError(f"{name} is a {loaded.cfg.task} run, not a detection run")
        self.loaded = loaded
        m = loaded.cfg.model  # a --baseline run is named by its torchvision detector, not by the head it shares
        self.name = f"dinotune:{name} ({m.head if getattr(m, 'baseline', 'none') == 'none' else m.baseline})"
        self.batch_size = batch_size

    def detect(self, paths: Sequence[Path]) -> list[Detections]:
        # the dataset's category ids, whatever category_ids the run was trained with
        preds = self.loaded.predict(list(paths), batch_size=self.batch_size, category_ids="coco")
        by_path = {p["image"]: p for p in preds}
        out = []
        for path in paths:
            dets = by_path[str(path)]["detections"]
            boxes = torch.tensor([d["bbox"] for d in dets], dtype=torch.float32).reshape(-1, 4)
            out.append(Detections(box_ops.xywh_to_xyxy(boxes), torch.tensor([d["score"] for d in dets]),
                                  torch.tensor([d["category_id"] for d in dets], dtype=torch.int64)))
        return out


class YoloDetector:
    """An ultralytics YOLO model (``.pt`` weights or a model ``.yaml`` with random weights).

    YOLO class names are matched to the dataset's category names (COCO-trained YOLO and COCO use
    the same names), after ``class_map`` (see ``parse_class_map``). Detections of classes the
    dataset lacks are dropped and counted; a model with no class in common is refused, since its
    row would be all zeros for a reason the table cannot show. A model built from a YAML has random
    weights: its name says so."""

    def __init__(self, weights: str, categories: list[dict[str, Any]], image_size: int, device: str = "auto",
                 conf: float = 0.001, class_map: Mapping[str, str] | None = None):
        self.model = open_yolo(weights)
        self.random_weights = Path(weights).suffix.lower() in (".yaml", ".yml")
        self.name = f"yolo:{Path(weights).name}" + (" (random weights)" if self.random_weights else "")
        self.image_size, self.conf = image_size, conf
        self.device = None if device == "auto" else device
        self.class_names = {int(k): str(v) for k, v in self.model.names.items()}
        self.class_to_category = match_classes(self.class_names, categories, class_map or {}, self.name,
                                               self.random_weights)
        self.dropped = 0
        self.dropped_by_class: dict[int, int] = {}
        self.notes: list[str] = []
        if self.random_weights:
            self.notes.append(f"{self.name}: built from {Path(weights).name}, untrained; its row is a floor, "
                              "not a baseline (pass .pt weights for a trained YOLO)")

    def detect(self, paths: Sequence[Path]) -> list[Detections]:
        out = []
        for path in paths:  # one at a time: ultralytics batches lists of mixed sizes itself anyway
            r = self.model.predict(str(path), imgsz=self.image_size, conf=self.conf, device=self.device,
                                   verbose=False, max_det=100)[0]
            cls = r.boxes.cls.cpu().long().tolist()
            out.append(self._keep_known(cls, r.boxes.xyxy.cpu().float(), r.boxes.conf.cpu().float()))
        if self.dropped:
            self.notes.append(drop_note(self.name, self.dropped, sum(len(d.scores) for d in out) + self.dropped,
                                        {self.class_names.get(c, str(c)): n for c, n in self.dropped_by_class.items()}))
        return out

    def _keep_known(self, cls: list[int], boxes: torch.Tensor, scores: torch.Tensor) -> Detections:
        """One image's detections in the dataset's ids; the others counted by class."""
        cats = [self.class_to_category.get(c) for c in cls]
        keep = torch.tensor([c is not None for c in cats], dtype=torch.bool)
        for c, cat in zip(cls, cats):
            if cat is None:
                self.dropped += 1
                self.dropped_by_class[c] = self.dropped_by_class.get(c, 0) + 1
        return Detections(boxes[keep].reshape(-1, 4), scores[keep],
                          torch.tensor([c for c in cats if c is not None], dtype=torch.int64))


YOLO_SUFFIXES = (".pt", ".yaml", ".yml")


def open_yolo(weights: str) -> Any:
    """``ultralytics.YOLO(weights)``, loaded in ultralytics' safe mode (``safe_load``): a weights file
    is a pickle, and ultralytics' default loading unpickles it in full, running whatever code the
    file names. Any failure to load becomes one line naming the file."""
    try:
        from ultralytics import YOLO
    except ImportError:
        raise ImportError("YOLO baselines need ultralytics: pip install 'dinotune[yolo]'") from None
    if Path(weights).suffix.lower() not in YOLO_SUFFIXES:
        raise ConfigError(f"--yolo {weights}: expected ultralytics .pt weights or a model .yaml")
    _undo_pil_patch()
    try:
        with safe_load(weights):
            return YOLO(weights)
    except DinotuneError:
        raise
    except Exception as exc:  # ultralytics raises TypeError, RuntimeError, OSError, ... for a bad file
        reason = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        reason = reason.replace("ERROR ❌️", "").strip().split(". ")[0]  # not ultralytics' advice to run `yolo`
        raise CheckpointError(f"--yolo {weights}: ultralytics cannot load it in its safe mode ({reason}); "
                              "dinotune loads only what that mode accepts (official and ultralytics-trained "
                              "weights, model YAMLs)") from None


@contextlib.contextmanager
def safe_load(weights: str):
    """ultralytics' restricted loading (its ``ULTRALYTICS_SAFE_LOAD`` flag) while a model is opened: a
    ``.pt`` is unpickled with ``torch.load(weights_only=True)`` against ultralytics' allow-list of model
    classes, so a payload in the file is refused before it runs, and a model YAML is built without
    ``eval``. The flag is read when ultralytics is imported, so it is set on its loader for the call.
    An ultralytics (or torch, < 2.6) without that mode may still open what is not a local file (its
    own YAMLs, official weights it downloads); a local file is refused."""
    try:
        from ultralytics.nn import tasks
    except ImportError:
        tasks = None
    if not (hasattr(tasks, "SAFE_LOAD") and getattr(getattr(tasks, "_SafeLoad", None), "SUPPORTED", False)):
        if Path(weights).expanduser().exists():
            raise CheckpointError(f"--yolo {weights}: this ultralytics (or torch) cannot load a file without running "
                                  "code from it; upgrade both (ultralytics with ULTRALYTICS_SAFE_LOAD, torch >= 2.6)")
        yield
        return
    before = tasks.SAFE_LOAD
    tasks.SAFE_LOAD = True
    try:
        yield
    finally:
        tasks.SAFE_LOAD = before


def _few(names: Sequence[str], n: int = 6) -> str:
    shown = ", ".join(repr(x) for x in list(names)[:n])
    return shown + (f", ... ({len(names)} in all)" if len(names) > n else "")


def parse_class_map(spec: str | Path | Mapping[Any, Any] | None) -> dict[str, str]:
    """``--class-map``: model class (index or name) -> dataset category name, given as
    ``"0=person,1=bicycle"``, as a JSON file holding such an object (``{"0": "person"}``), or as a
    mapping. Needed when the model's class names are not the dataset's (a model built from a YAML
    calls its classes '0'..'79'; a model trained with other spellings)."""
    if spec is None or (isinstance(spec, (str, Mapping)) and not spec):
        return {}
    if isinstance(spec, Mapping):
        return {str(k).strip(): str(v).strip() for k, v in spec.items()}
    text = str(spec).strip()
    path = Path(text).expanduser()
    if text.lower().endswith(".json") or path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--class-map {text}: cannot read it as a JSON file ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--class-map {text}: expected a JSON object {{model class: dataset category}}")
        return parse_class_map(data)
    pairs = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"--class-map: {item!r} is not MODEL_CLASS=DATASET_CATEGORY "
                              "(e.g. --class-map 0=person,1=bicycle, or a JSON file)")
        pairs[key.strip()] = value.strip()
    return pairs


def match_classes(model_names: dict[int, str], categories: list[dict[str, Any]], class_map: Mapping[str, str],
                  model: str, random_weights: bool = False) -> dict[int, int | None]:
    """Model class index -> the dataset's category id (None: not in the dataset). ``class_map``
    entries win; the other classes are matched by name, ignoring case. Refuses a map entry naming
    an unknown class or category, and a model with no class in common with the dataset."""
    by_name = {str(c["name"]).lower(): int(c["id"]) for c in categories}
    data_names = [str(c["name"]) for c in categories]
    mapping = {k: by_name.get(v.lower()) for k, v in model_names.items()}
    by_class = {v.lower(): k for k, v in model_names.items()}
    for key, target in class_map.items():
        index = int(key) if key.isdigit() and int(key) in model_names else by_class.get(key.lower())
        if index is None:
            raise ConfigError(f"--class-map {key}={target}: {key!r} is neither a class index nor a class name of "
                              f"{model} (its classes: {_few(list(model_names.values()))})")
        if target.lower() not in by_name:
            raise ConfigError(f"--class-map {key}={target}: {target!r} is not a category of the dataset "
                              f"(its categories: {_few(data_names)})")
        mapping[index] = by_name[target.lower()]
    if not any(v is not None for v in mapping.values()):
        why = " It is built from a model YAML: random weights, and classes named by number." if random_weights else ""
        raise DataError(f"{model}: none of its {len(model_names)} classes ({_few(list(model_names.values()))}) is a "
                        f"category of the dataset ({_few(data_names)}), so every detection would be dropped and its "
                        f"row would be all zeros.{why} Map its classes with --class-map MODEL_CLASS=CATEGORY,... "
                        f"(e.g. --class-map 0={data_names[0]}) or a JSON file")
    return mapping


def drop_note(name: str, dropped: int, total: int, by_class: Mapping[str, int]) -> str:
    """The line saying how many detections a detector lost to classes the dataset lacks, and which."""
    top = sorted(by_class.items(), key=lambda kv: -kv[1])[:5]
    most = ", ".join(f"{c!r} {n}" for c, n in top)
    return (f"{name}: dropped {dropped} of {total} detections whose class is not a category of the dataset "
            f"(by name or --class-map; most: {most}); they count neither as hits nor as false positives. "
            "Map classes with --class-map")


def _undo_pil_patch() -> None:
    """Importing ultralytics replaces ``PIL.Image.open`` with a wrapper that, on the first file PIL
    cannot identify, tries to pip-install a HEIF plugin and raises ModuleNotFoundError offline. That
    would turn dinotune's "report and skip" of a bad image into a crash, so put the original back."""
    try:
        from PIL import Image
        from ultralytics.utils import patches
    except ImportError:
        return
    original = getattr(patches, "_image_open", None)
    if original is not None and Image.open is not original:
        Image.open = original


def score(source: DetectionSource, detections: Sequence[Detections]) -> dict[str, Any]:
    """``detection_metrics`` of ``detections`` (one per source image, in order)."""
    results = []
    for im, det in zip(source.images, detections):
        for box, s, c in zip(box_ops.xyxy_to_xywh(det.boxes).tolist(), det.scores.tolist(), det.category_ids.tolist()):
            results.append({"image_id": im.id, "category_id": int(c), "bbox": [round(v, 2) for v in box],
                            "score": float(s)})
    return detection_metrics(source, results)


def compare(detectors: Sequence[Detector], source: DetectionSource, out_dir: Path) -> dict[str, Any]:
    """Score every detector on ``source``; write ``compare.json``, ``compare.md`` and charts."""
    from dinotune.viz.plots import plot_grouped_bars

    paths = [im.path for im in source.images]
    rows, notes = {}, []
    for det in detectors:
        t0 = time.perf_counter()
        found = det.detect(paths)
        seconds = time.perf_counter() - t0
        metrics = score(source, found)
        metrics["images_per_s"] = len(paths) / seconds if seconds else None
        if getattr(det, "dropped", None) is not None:
            metrics["dropped_detections"] = det.dropped
        rows[det.name] = metrics
        info(f"{det.name}: AP {metrics.get('AP') or 0:.4f}, AP50 {metrics.get('AP50') or 0:.4f}, "
             f"single-object accuracy {metrics.get('accuracy', 0):.4f}")
        for note in getattr(det, "notes", ()):
            warn(note)
            notes.append(note)
    out_dir = Path(out_dir)
    write_json(out_dir / "compare.json", {"data": source.name, "images": len(paths), "detectors": rows,
                                          "notes": notes})
    table = markdown_table(rows, source.name, len(paths), notes)
    (out_dir / "compare.md").write_text(table)
    coco = {n: {k: r.get(k) for k in ("AP", "AP50", "AP75", "AR100")} for n, r in rows.items()}
    single = {n: {k: r.get(k) for k in ("accuracy", "f1", "mean_iou", "map50")} for n, r in rows.items()}
    plot_grouped_bars(coco, out_dir / "compare_coco.png", "COCO metrics (all objects)")
    plot_grouped_bars(single, out_dir / "compare_single_object.png", "single-object metrics (largest object)")
    return {"rows": rows, "table": table}


def markdown_table(rows: dict[str, dict[str, Any]], data: str, n_images: int, notes: Sequence[str] = ()) -> str:
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = [f"# Detector comparison on {data} ({n_images} images)", "",
             "COCO metrics use every ground-truth object (pycocotools); accuracy / F1 / mean IoU / mAP@0.5 "
             "compare each image's top detection with its largest object (single-object metrics).", "",
             "| detector | " + " | ".join(SHOWN) + " | images/s |", "|---" * (len(SHOWN) + 2) + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(r.get(k)) for k in SHOWN) + f" | {cell(r.get('images_per_s'))} |")
    if notes:
        lines += ["", "Notes:", *(f"- {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def run_compare(*, data: str, split: str, runs: Sequence[TrainedRun], run_names: Sequence[str],
                yolo: Sequence[str], out: Path, images: str, subset: int, subset_seed: int, device: str,
                yolo_image_size: int, batch_size: int | None, min_box_size: float, max_pixels: int,
                class_map: str | Path | Mapping[Any, Any] | None = None) -> str:
    """Load the ground truth, wrap the detectors, compare, return the table. ``class_map``: YOLO
    class -> dataset category (``parse_class_map``), for every YOLO model."""
    if not runs and not yolo:
        raise ValueError("nothing to compare: pass --runs and/or --yolo")
    mapping = parse_class_map(class_map)  # refuse a malformed map before any image is read
    if mapping and not yolo:
        raise ConfigError("--class-map maps YOLO classes to the dataset's categories; it needs --yolo")
    detectors: list[Detector] = [RunDetector(r, n, batch_size) for r, n in zip(runs, run_names)]
    categories = runs[0].bundle.categories if runs else None
    source = find_detection_data(data, split, images, categories=categories,
                                 min_box_size=min_box_size)
    source = scan_source(source, "fast", max_pixels)
    if subset:
        source = restrict(source, choose_subset(source, subset, subset_seed))
    for d in detectors[1:]:
        if [c["id"] for c in d.loaded.bundle.categories] != [c["id"] for c in source.categories]:
            warn(f"{d.name} was trained on other categories than {detectors[0].name}; ids are matched as-is")
    detectors += [YoloDetector(w, source.categories, yolo_image_size, device, class_map=mapping) for w in yolo]
    result = compare(detectors, source, Path(out))
    info(f"wrote {Path(out) / 'compare.json'}, compare.md and charts")
    return result["table"]
