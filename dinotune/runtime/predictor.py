"""``Predictor``: an exported model (``model.onnx`` + ``dinotune_export.json``) that predicts files or
in-memory images with onnxruntime, numpy and Pillow, giving the records ``dinotune predict`` gives
for the run (``predict``), one image's record (``predict_array``, what ``dinotune serve`` calls) and
the JSON / CSV text of ``predict``'s output files (``format_predictions``).

The graph has a fixed input side ``S`` (``image_size`` in the JSON). Classification (center crop
``S``) and detection (the longer side resized to ``S`` and padded to ``S x S``) feed every image at
that size, as the torch path does. Segmentation runs the torch path's windows: a ``slide`` run in
``S x S`` windows over the full-resolution image, exactly as PyTorch; a ``whole`` run feeds the
image resized to its evaluation size (short side ``S``, sides rounded to the patch size), which is
``S x S`` for a square image and then equal to PyTorch's; other shapes are covered by overlapping
``S x S`` windows (PyTorch runs them whole, which the fixed-size graph cannot), said once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from dinotune.errors import ConfigError
from dinotune.runtime import postprocess as post
from dinotune.runtime import preprocess as pre
from dinotune.runtime.inputs import as_model_image, read_image, readable_inputs
from dinotune.runtime.metadata import EXPORT_META, ExportInfo
from dinotune.runtime.records import format_predictions
from dinotune.runtime.session import OnnxSession
from dinotune.utils import warn

# predict options each task takes (the torch path's inference fields and predict options)
OPTIONS = {
    "classify": {"batch_size", "top_k"},
    "detect": {"batch_size", "top_k", "score_threshold", "draw_threshold", "category_ids", "image_ids"},
    "segment": {"batch_size", "window_batch", "masks", "draw"},
}


class Predictor:
    """An exported model ready to predict (see the module docstring).

    Attributes:
        task: ``classify``, ``detect`` or ``segment``.
        class_names: the run's classes, in label order.
        info: the parsed ``dinotune_export.json``.
        input_spec: the model's bands (``InputInfo``: the fields of ``data.bands.InputSpec``).
        max_image_pixels: the pixel limit of decoded images.
    """

    def __init__(self, folder: Path, info: ExportInfo, *, model_file: str | None = None, device: str = "auto",
                 threads: int = 0):
        if info.format != "onnx":
            raise ConfigError(f"{folder}: a {info.format} export; dinotune.runtime runs ONNX exports "
                              "(export with --format onnx)")
        self.folder = Path(folder)
        self.info = info
        self.task = info.task
        self.class_names = list(info.class_names)
        self.input_spec = info.input
        self.max_image_pixels = int(info.max_image_pixels)
        self.model_path = self.folder / (model_file or info.model_file)
        self.session = OnnxSession(self.model_path, device=device, threads=threads)
        self._told_windows = False

    # ----------------------------------------------------------------------------- settings
    def settings(self, **options: Any) -> dict[str, Any]:
        """The export's post-processing settings (the run's inference section) with ``options``
        applied; an option the task does not take, or a value out of range, is refused by name."""
        given = {k: v for k, v in options.items() if v is not None}
        if self.task == "detect" and given.get("draw"):
            raise ConfigError("--draw with the ONNX backend draws segmentation overlays only; detections are drawn by "
                              "the torch path (dinotune predict RUN --draw DIR)")
        unknown = sorted(set(given) - OPTIONS[self.task])
        if unknown:
            raise ConfigError(f"{', '.join(unknown)}: not an option of {self.task} predictions "
                              f"(valid: {', '.join(sorted(OPTIONS[self.task]))})")
        # the export writes the run's batch sizes into postprocess; the 1s only cover a hand-made JSON
        s = {"batch_size": 1, "window_batch": 1, **self.info.postprocess, **given}
        for key in ("batch_size", "top_k", "window_batch"):
            if key in s and int(s[key]) < 1:
                raise ConfigError(f"{key} must be at least 1, got {s[key]}")
        for key in ("score_threshold", "draw_threshold"):
            if key in s and not 0.0 <= float(s[key]) <= 1.0:
                raise ConfigError(f"{key} must be in [0, 1], got {s[key]}")
        if s.get("category_ids", "coco") not in ("coco", "yolo"):
            raise ConfigError(f"category_ids {s['category_ids']!r}: choose coco or yolo")
        if self.task == "detect" and int(s["top_k"]) > int(self.info.postprocess.get("top_k", 1)):
            # the torch path is capped alike: its post-processing keeps the run's own top-k
            s["top_k"] = int(self.info.postprocess.get("top_k", 1))
        return s

    # ---------------------------------------------------------------------------- predicting
    def predict(self, images: str | Path | Iterable[str | Path], **options: Any) -> list[dict[str, Any]]:
        """The records ``dinotune predict`` writes for the readable images of ``images`` (files, or
        folders searched recursively). Options: ``batch_size``, ``top_k`` (classification,
        detection), ``score_threshold``, ``category_ids``, ``image_ids`` (detection), ``masks``
        (segmentation: a folder for the label PNGs), ``draw`` (segmentation: overlays)."""
        s = self.settings(**options)
        mode = "full" if self.task == "classify" else "fast"  # as each task's torch path checks
        paths = readable_inputs(images, self.input_spec, self.max_image_pixels, mode)
        if self.task == "classify":
            return self._classify(paths, s)
        if self.task == "detect":
            return self._detect(paths, s)
        return [self._segment_file(p, s) for p in paths]

    def predict_array(self, image: np.ndarray, name: str) -> dict[str, Any]:
        """The record of one in-memory image (``H x W x 3`` uint8 RGB, or ``H x W x C`` band values)
        named ``name`` (its ``image`` field; a detection's numeric stem is its image id)."""
        return self.predict_array_with_mask(image, name)[0]

    def predict_array_with_mask(self, image: np.ndarray, name: str) -> tuple[dict[str, Any], np.ndarray | None]:
        """The record and, for segmentation, the ``H x W`` label map (None for other tasks)."""
        array = as_model_image(image, self.input_spec, name)
        s = self.settings()
        if self.task == "classify":
            return self._classify_arrays([name], [array], s)[0], None
        if self.task == "detect":
            ids = post.image_ids([Path(name)], None)
            return self._detect_arrays([name], [array], ids, s)[0], None
        mask = self._segment_array(array, s, name)
        record = {"image": name, "mask": None, "classes": post.class_shares(mask, self.class_names)}
        return record, mask

    def format_predictions(self, results: list[dict[str, Any]], fmt: str) -> str:
        """``predict``'s records as the text of a JSON or CSV file (as the torch path writes them)."""
        return format_predictions(self.task, results, fmt)

    def describe(self) -> dict[str, Any]:
        """What the exported model is (for ``dinotune serve``'s health check and for logs)."""
        out = {"backend": "onnx", "model": str(self.model_path), "task": self.task, "image_size": self.info.image_size,
               "dtype": self.info.dtype, "providers": list(self.session.providers), "source": self.info.source}
        if "draw_threshold" in self.info.postprocess:
            out["draw_threshold"] = self.info.postprocess["draw_threshold"]
        return out

    # --------------------------------------------------------------------------------- tasks
    def _batches(self, paths: list[Path], size: int) -> Iterable[list[Path]]:
        for start in range(0, len(paths), size):
            yield paths[start: start + size]

    def _classify(self, paths: list[Path], s: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for chunk in self._batches(paths, int(s["batch_size"])):
            arrays = [read_image(p, self.input_spec, self.max_image_pixels) for p in chunk]
            out += self._classify_arrays([str(p) for p in chunk], arrays, s)
        return out

    def _classify_arrays(self, names: list[str], arrays: list[np.ndarray], s: dict[str, Any]) -> list[dict[str, Any]]:
        size = self.info.image_size
        batch = np.stack([pre.classify_input(a, size, self.input_spec) for a in arrays])
        logits = self.session.run(images=batch)["logits"]
        return [post.classify_record(n, row, self.class_names, int(s["top_k"])) for n, row in zip(names, logits)]

    def _detect(self, paths: list[Path], s: dict[str, Any]) -> list[dict[str, Any]]:
        ids = post.image_ids(paths, s.get("image_ids"))
        out: list[dict[str, Any]] = []
        for chunk in self._batches(paths, int(s["batch_size"])):
            arrays = [read_image(p, self.input_spec, self.max_image_pixels) for p in chunk]
            out += self._detect_arrays([str(p) for p in chunk], arrays, ids, s)
        return out

    def _detect_arrays(self, names: list[str], arrays: list[np.ndarray], ids: dict[str, int],
                       s: dict[str, Any]) -> list[dict[str, Any]]:
        size = self.info.image_size
        canvases = [pre.detect_input(a, size, self.input_spec)[0] for a in arrays]
        sizes = np.asarray([a.shape[:2] for a in arrays], dtype=np.float32)
        out = self.session.run(images=np.stack(canvases), orig_sizes=sizes)
        # detections under the run's own threshold are gone before any predict option applies
        threshold = max(float(s["score_threshold"]), float(self.info.postprocess.get("min_score", 0.0)))
        categories = self.info.categories or [{"id": i + 1, "name": n} for i, n in enumerate(self.class_names)]
        return [post.detection_record(name, ids[name], a.shape[:2], out["scores"][i], out["labels"][i], out["boxes"][i],
                                      categories, threshold, int(s["top_k"]), s.get("category_ids", "coco"))
                for i, (name, a) in enumerate(zip(names, arrays))]

    def _segment_file(self, path: Path, s: dict[str, Any]) -> dict[str, Any]:
        array = read_image(path, self.input_spec, self.max_image_pixels)
        mask = self._segment_array(array, s, str(path))
        mask_path = None
        if s.get("masks") or s.get("draw"):
            from dinotune.viz.segmentation import overlay, palette, save_mask_png

            pal = palette(len(self.class_names), self.info.postprocess.get("ignore_index", 255))
            if s.get("masks"):
                mask_path = save_mask_png(mask, Path(s["masks"]) / f"{path.stem}.png", pal)
            if s.get("draw"):
                self._draw(array, mask, pal, Path(s["draw"]) / f"{path.stem}.jpg", overlay)
        return {"image": str(path), "mask": str(mask_path) if mask_path else None,
                "classes": post.class_shares(mask, self.class_names)}

    def _draw(self, array: np.ndarray, mask: np.ndarray, pal: np.ndarray, path: Path, overlay: Any) -> None:
        from PIL import Image

        from dinotune.viz.draw import save_image

        if self.input_spec.arrays:
            raise ConfigError("--draw with the ONNX backend draws pictures only; band arrays are drawn by the torch "
                              "path (dinotune predict RUN --draw DIR)")
        save_image(overlay(Image.fromarray(array, mode="RGB"), mask, pal), path)

    def _segment_array(self, array: np.ndarray, s: dict[str, Any], name: str) -> np.ndarray:
        """``H x W`` label map of one image at its own resolution (``predict_mask``)."""
        size, p = self.info.image_size, self.info.patch_size
        h, w = array.shape[:2]
        mode = self.info.postprocess.get("inference", "whole")
        target = (h, w) if mode == "slide" else pre.eval_size(h, w, size, p)
        x, valid = pre.segment_input(array, target, p, self.input_spec)
        if mode == "whole" and x.shape[-2:] != (size, size):
            mode = "slide"  # the graph's input is fixed: cover the image with windows of it
            if not self._told_windows:
                warn(f"{name}: {target[0]} x {target[1]} at evaluation size, not the exported {size} x {size}: "
                     f"predicted in overlapping {size} x {size} windows (PyTorch runs such an image whole, so "
                     "label maps can differ near window borders)")
                self._told_windows = True
        stride = int(self.info.postprocess.get("slide_stride") or 0) or post.default_stride(size, p)
        logits = post.segment_logits(lambda batch: self.session.run(images=batch)["logits"], x, (h, w), valid,
                                     mode, size, stride, int(s["window_batch"]))
        return post.label_map(logits)


def load_predictor(path: str | Path, *, device: str = "auto", threads: int = 0) -> Predictor:
    """The ``Predictor`` of an exported model: its folder (``model.onnx`` + ``dinotune_export.json``)
    or the ``.onnx`` file inside it. ``device``: ``auto`` / ``cpu`` / ``cuda``; ``threads``:
    onnxruntime's intra-op threads (0: its default)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such exported model (a folder with {EXPORT_META}, or its .onnx file)")
    folder, model_file = (path.parent, path.name) if path.is_file() else (path, None)
    return Predictor(folder, ExportInfo.read(folder), model_file=model_file, device=device, threads=threads)
