"""Detection without torch: an exported detector's input, records, files and page view.

The input is the run's evaluation canvas (``transforms.resize_pad`` + ``to_input``) in numpy: the
longer side resized to ``S``, zero padding right / bottom to ``S x S``, normalisation. The graph
(``export.py``) takes it with the original sizes and returns the post-processing's top ``k``
detections in original pixels; a record keeps those at or above the score threshold, at most
``top_k``, as COCO ``xywh`` boxes with the dataset's category ids. ``DetectTask.predict`` builds its
records with ``detection_record`` and writes its files through this module too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from dinotune.data.input_spec import InputSpec
from dinotune.errors import ConfigError, DataError
from dinotune.runtime.preprocess import normalize, resize
from dinotune.runtime.task import Prediction, RuntimeTask
from dinotune.tasks.detect.drawing import shown, shown_threshold


def detect_input(image: np.ndarray, size: int, spec: InputSpec) -> tuple[np.ndarray, float]:
    """``resize_pad`` + ``to_input``: the longer side to ``size``, zero padding right / bottom to
    ``size x size`` (before normalisation, as the PyTorch path pads), normalised. Returns the
    ``C x size x size`` float32 canvas and the factor ``size / max(H, W)``."""
    h, w = image.shape[:2]
    factor = size / max(h, w)
    nh, nw = min(size, max(1, round(h * factor))), min(size, max(1, round(w * factor)))
    resized = resize(image, nh, nw)
    canvas = np.zeros((size, size, image.shape[2]), dtype=resized.dtype)
    canvas[:nh, :nw] = resized
    return normalize(canvas, spec), factor


# COCO image ids are 64-bit integers (pycocotools, most evaluation servers)
MAX_IMAGE_ID = 2**63 - 1
# test-dev's image info is ~7 MB for 40 670 images
MAX_INFO_BYTES = 256 * 2**20


def read_image_info(path: str | Path | None) -> dict[str, int] | None:
    """File name -> COCO image id from a COCO image-info JSON (``{"images": [{"file_name", "id"},
    ...]}``, e.g. test-dev's ``image_info_test-dev2017.json``): ``predict --image-info``. None
    without a path. Read as untrusted: JSON only (at most ``MAX_INFO_BYTES``), its shape checked,
    ids whole numbers from 0 to 2^63 - 1; a problem is one line naming the file and the entry."""
    if not path:
        return None
    where = f"--image-info {path}"
    try:
        file = Path(path).expanduser()
        if file.stat().st_size > MAX_INFO_BYTES:
            raise DataError(f"{where}: {file.stat().st_size:,} bytes; COCO image info is read up to "
                            f"{MAX_INFO_BYTES // 2**20} MB")
        info = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataError(f"{where}: cannot be read as JSON ({exc})") from None
    except RecursionError:
        raise DataError(f"{where}: cannot be read as JSON (nested too deep)") from None
    images = info.get("images") if isinstance(info, dict) else None
    if not isinstance(images, list):
        raise DataError(f"{where}: not COCO image info (an \"images\" list of {{\"file_name\", \"id\"}})")
    out: dict[str, int] = {}
    for i, im in enumerate(images):
        name, image_id = (im.get("file_name"), im.get("id")) if isinstance(im, dict) else (None, None)
        if not isinstance(name, str) or not name:
            raise DataError(f"{where}: images[{i}] has no file_name (a string)")
        if isinstance(image_id, bool) or not isinstance(image_id, int) or not 0 <= image_id <= MAX_IMAGE_ID:
            raise DataError(f"{where}: images[{i}] ({name}) has id {image_id!r}; a whole number from 0 to 2^63 - 1 "
                            "is expected")
        out[name] = image_id
    return out




def _numeric_stem(path: Path) -> bool:
    """A file stem that is a COCO image id: ASCII digits only (``'²³'.isdigit()`` is true, but no
    id), at most 18 of them."""
    stem = path.stem
    return 0 < len(stem) <= 18 and stem.isascii() and stem.isdigit()


def image_ids(paths: Sequence[Path], mapping: dict[str, int] | None) -> dict[str, int]:
    """COCO image ids of prediction outputs: from ``mapping`` (file name -> id, e.g. test-dev's
    image info), else numeric file stems (``000000123456.jpg`` -> 123456) when they are all
    distinct, else 1..N in order. Keys are the paths as strings."""
    if mapping:
        missing = [p.name for p in paths if p.name not in mapping]
        if missing:
            raise DataError(f"image info has no id for {', '.join(missing[:5])}")
        return {str(p): int(mapping[p.name]) for p in paths}
    if all(_numeric_stem(p) for p in paths) and len({int(p.stem) for p in paths}) == len(paths):
        return {str(p): int(p.stem) for p in paths}
    return {str(p): i + 1 for i, p in enumerate(paths)}


def detection_record(image: str, image_id: int, size: tuple[int, int], scores: np.ndarray, labels: np.ndarray,
                     boxes: np.ndarray, categories: Sequence[dict[str, Any]], threshold: float, top_k: int,
                     category_ids: str) -> dict[str, Any]:
    """One image's record from its ``k`` detections (``scores`` k, ``labels`` k class indices,
    ``boxes`` ``k x 4`` ``xyxy`` original pixels, best first): those scoring at least
    ``threshold``, at most ``top_k``, boxes as ``xywh`` rounded to 2 decimals, scores to 5;
    ``category_id`` the dataset's id (``coco``) or the class index (``yolo``). ``size``: ``(h, w)``.

    Returns ``{"image", "image_id", "width", "height", "detections": [{"category_id", "category",
    "bbox", "score"}]}``."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    if labels.size and not (0 <= labels.min() and labels.max() < len(categories)):
        raise DataError(f"{image}: the model gave class index {int(labels.max())} for {len(categories)} classes "
                        "(a graph of another model?)")
    keep = scores >= threshold
    xyxy = np.asarray(boxes, dtype=np.float32)[keep]
    xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1).tolist()[:top_k]
    detections = []
    for lab, score, box in zip(labels[keep].tolist(), scores[keep].tolist(), xywh):
        lab = int(lab)
        detections.append({"category_id": lab if category_ids == "yolo" else int(categories[lab]["id"]),
                           "category": categories[lab]["name"], "bbox": [round(v, 2) for v in box],
                           "score": round(float(score), 5)})
    h, w = size
    return {"image": image, "image_id": image_id, "width": int(w), "height": int(h), "detections": detections}


class DetectRuntime(RuntimeTask):
    """Boxes per image (see the module docstring). ``info.postprocess`` holds the graph's ``top_k``
    (its ``k``) and ``min_score`` (the run's own threshold, applied before any option's)."""

    name = "detect"
    graph_inputs = {"images": 4, "orig_sizes": 2}
    graph_outputs = {"scores": 2, "labels": 2, "boxes": 3}
    extra_options = frozenset({"image_info", "draw"})
    formats = ("json", "csv", "coco", "geojson")

    def check_postprocess(self, postprocess: dict[str, Any]) -> str | None:
        top_k, min_score = postprocess.get("top_k", 1), postprocess.get("min_score", 0.0)
        if not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 1):
            return f"postprocess.top_k is {top_k!r}; the graph's detections per image (an integer >= 1) are expected"
        if not (isinstance(min_score, (int, float)) and not isinstance(min_score, bool) and 0 <= min_score <= 1):
            return f"postprocess.min_score is {min_score!r}; a score in [0, 1] is expected"
        return None

    def check_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        # the PyTorch path is capped alike: its post-processing keeps the run's own top-k
        settings["top_k"] = min(int(settings["top_k"]), int(self.info.postprocess.get("top_k", 1)))
        return settings

    def predict_files(self, paths: list[Path], settings: dict[str, Any],
                      read: Callable[[Path], np.ndarray]) -> list[dict[str, Any]]:
        if settings.get("draw") and self.spec.arrays:  # checked before any image is predicted
            raise ConfigError("--draw with the ONNX backend draws pictures only; band arrays are drawn by the torch "
                              "path (dinotune predict RUN --draw DIR)")
        ids = image_ids(paths, read_image_info(settings.get("image_info")))
        records = super().predict_files(paths, {**settings, "ids": ids}, read)
        if settings.get("draw"):
            from PIL import Image

            from dinotune.tasks.detect.drawing import draw_predictions

            draw_predictions(records, lambda path: Image.fromarray(read(path), mode="RGB"), Path(settings["draw"]),
                             self.class_names, settings)
        return records

    def predict_arrays(self, names: list[str], arrays: list[np.ndarray], settings: dict[str, Any]) -> list[Prediction]:
        ids = settings.get("ids") or image_ids([Path(n) for n in names], None)
        canvases = [detect_input(a, self.info.image_size, self.spec)[0] for a in arrays]
        sizes = np.asarray([a.shape[:2] for a in arrays], dtype=np.float32)
        out = self.graph(images=np.stack(canvases), orig_sizes=sizes)
        # detections under the run's own threshold are gone before any predict option applies
        threshold = max(float(settings["score_threshold"]), float(self.info.postprocess.get("min_score", 0.0)))
        categories = self.info.categories or [{"id": i + 1, "name": n} for i, n in enumerate(self.class_names)]
        return [(detection_record(name, ids[name], a.shape[:2], out["scores"][i], out["labels"][i], out["boxes"][i],
                                  categories, threshold, int(settings["top_k"]), settings["category_ids"]), {})
                for i, (name, a) in enumerate(zip(names, arrays))]

    @classmethod
    def format_predictions(cls, results: list[dict[str, Any]], fmt: str,
                           settings: Mapping[str, Any] | None = None) -> str:
        """``coco`` (and ``json`` with ``--image-info``, which says the file is for evaluation): COCO
        results, every top-k detection, as COCO AP requires. ``json``, ``csv`` and ``geojson`` are read
        by a person: the detections scoring at least ``draw_threshold`` (``drawing.shown_threshold``);
        ``geojson`` maps a tiled scene's objects onto the ground (``settings["coords"]``)."""
        s = settings or {}
        if fmt == "coco" or (fmt == "json" and s.get("image_info")):
            return cls.coco_text(results)
        if fmt in cls.formats:
            results = shown(results, shown_threshold(s)[0])
        if fmt == "geojson":
            from dinotune.tasks.detect.geojson import geojson_text

            return geojson_text(results, s.get("coords") or "lonlat")
        return super().format_predictions(results, fmt, s)

    @staticmethod
    def coco_text(results: list[dict[str, Any]]) -> str:
        """COCO results: a flat list, test-dev style; each result also carries ``file_name``, the image
        as predicted (image ids of a plain folder are 1..N), which pycocotools' ``loadRes`` ignores."""
        flat = [{"image_id": r["image_id"], "file_name": r["image"], "category_id": d["category_id"],
                 "bbox": d["bbox"], "score": d["score"]} for r in results for d in r["detections"]]
        return json.dumps(flat) + "\n"

    @classmethod
    def csv_rows(cls, results: list[dict[str, Any]]) -> list[list[Any]]:
        """One row per detection."""
        return [["image", "image_id", "category", "category_id", "score", "x", "y", "width", "height"]] + [
            [r["image"], r["image_id"], d["category"], d["category_id"], d["score"], *d["bbox"]]
            for r in results for d in r["detections"]]

    @classmethod
    def view(cls, record: dict[str, Any], extras: dict[str, Any]) -> dict[str, Any]:
        return {"boxes": [{"name": d["category"], "score": d["score"], "bbox": d["bbox"]}
                          for d in record["detections"]]}

    @classmethod
    def view_settings(cls, settings: dict[str, Any]) -> dict[str, Any]:
        return {"threshold": float(settings.get("draw_threshold", 0.0))}
