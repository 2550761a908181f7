"""Semantic segmentation without torch: an exported segmenter's input, label maps, records, files
and page view.

The graph (``export.py``) has a fixed input side ``S`` and returns ``logits`` at the decoder's
stride. A ``slide`` run covers the full-resolution image with ``S x S`` windows exactly as PyTorch
does; a ``whole`` run feeds the image at its evaluation size (short side ``S``, sides rounded to the
patch size), which is ``S x S`` for a square image and then equal to PyTorch's; other shapes are
covered by overlapping ``S x S`` windows (PyTorch runs them whole, which a fixed-size graph cannot),
said once. Logits are resized to the image, arg-maxed, and a record lists each class's share of
the pixels; ``masks`` writes the label maps as palette PNGs, ``draw`` colour overlays with a legend,
both in the run's colour table (``postprocess.mask_colors``) when it was trained on colour masks.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from dinotune.config.segment import SegmentPredictOptions
from dinotune.config.tiling import TilePredictOptions
from dinotune.data.input_spec import InputSpec
from dinotune.errors import ConfigError
from dinotune.runtime.postprocess import dense_logits
from dinotune.runtime.preprocess import check_work, normalize, pad_to_multiple, resize
from dinotune.runtime.task import Prediction, RuntimeTask
from dinotune.runtime.windows import default_stride
from dinotune.utils import info, warn


def _round_to(x: float, patch: int) -> int:
    return max(patch, int(round(x / patch)) * patch)


def eval_size(height: int, width: int, image_size: int, patch_size: int) -> tuple[int, int]:
    """The evaluation size of a ``height x width`` image: short side ``image_size``, both sides
    rounded to multiples of ``patch_size`` (``tasks/segment/data.py`` uses this one too)."""
    scale = image_size / min(height, width)
    return _round_to(height * scale, patch_size), _round_to(width * scale, patch_size)


def segment_input(image: np.ndarray, size: Sequence[int], patch_size: int, spec: InputSpec
                  ) -> tuple[np.ndarray, tuple[int, int]]:
    """``predict_mask``'s input: resized to ``size`` ``(h, w)``, normalised, zero-padded (after
    normalisation, as ``segmentation_collate``) to multiples of ``patch_size``. Returns the
    ``C x H' x W'`` float32 array and the unpadded ``(h, w)``."""
    x = normalize(resize(image, int(size[0]), int(size[1])), spec)
    return pad_to_multiple(x, patch_size), (x.shape[1], x.shape[2])


def label_map(logits: np.ndarray) -> np.ndarray:
    """``K x H x W`` logits -> ``H x W`` arg-max labels (uint8 up to 255 classes)."""
    return logits.argmax(0).astype(np.uint8 if logits.shape[0] <= 255 else np.int64)


def class_shares(mask: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """``{class name: fraction of the pixels}`` for the classes present, rounded to 5 decimals."""
    counts = np.bincount(np.asarray(mask).ravel(), minlength=len(names))
    return {names[c]: round(float(v) / mask.size, 5) for c, v in enumerate(counts) if v}


class SegmentRuntime(RuntimeTask):
    """Label maps per image (see the module docstring). ``info.postprocess`` holds ``inference``
    (whole / slide), ``slide_stride``, ``output_stride``, ``ignore_index`` and, for a run trained on
    colour masks, ``mask_colors`` (``[r, g, b]`` per class)."""

    name = "segment"
    # the label-map options; tiled prediction (and its GeoTIFF) is the PyTorch path's
    extra_options = (frozenset(f.name for f in dataclasses.fields(SegmentPredictOptions))
                     - {f.name for f in dataclasses.fields(TilePredictOptions)} - {"out"})
    written_formats = ("tif",)
    colour_offset = 0  # label 0 is a class (background): drawn in the palette's first colour
    graph_outputs = {"logits": 4}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._told_windows = False

    def check_postprocess(self, postprocess: dict[str, Any]) -> str | None:
        mode, stride = postprocess.get("inference", "whole"), postprocess.get("slide_stride", 0) or 0
        ignore = postprocess.get("ignore_index", 255)
        if mode not in ("whole", "slide"):
            return f"postprocess.inference is {mode!r}; whole or slide is expected"
        if not (isinstance(stride, int) and not isinstance(stride, bool) and 0 <= stride
                and stride % self.info.patch_size == 0 and stride <= self.info.image_size):
            return (f"postprocess.slide_stride is {stride!r}; 0 or a multiple of the patch size "
                    f"{self.info.patch_size} up to {self.info.image_size} is expected")
        if not (isinstance(ignore, int) and not isinstance(ignore, bool) and 0 <= ignore <= 255):
            return f"postprocess.ignore_index is {ignore!r}; a label from 0 to 255 is expected"
        colours = postprocess.get("mask_colors")
        if colours is not None and not (
                isinstance(colours, list) and len(colours) == len(self.class_names)
                and all(isinstance(c, list) and len(c) == 3
                        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in c)
                        for c in colours)):
            return (f"postprocess.mask_colors is {str(colours)[:60]}; one [r, g, b] (0..255) per class "
                    f"({len(self.class_names)}) is expected")
        return None

    def predict_files(self, paths: list[Path], settings: dict[str, Any],
                      read: Callable[[Path], np.ndarray]) -> list[dict[str, Any]]:
        if settings.get("draw") and self.spec.arrays:
            raise ConfigError("--draw with the ONNX backend draws pictures only; band arrays are drawn by the torch "
                              "path (dinotune predict RUN --draw DIR)")
        records = [self._predict_file(p, settings, read) for p in paths]
        if settings.get("masks"):
            info(f"wrote {len(records)} label map(s) (palette PNGs, values = class indices) to {settings['masks']}")
        if settings.get("draw"):
            info(f"wrote {len(records)} overlay(s) with a legend to {settings['draw']}")
        return records

    def _predict_file(self, path: Path, settings: dict[str, Any], read: Callable[[Path], np.ndarray]) -> dict[str, Any]:
        array = read(path)
        (record, extras), = self.predict_arrays([str(path)], [array], settings)
        mask = extras["mask"]
        if settings.get("masks") or settings.get("draw"):
            from dinotune.viz.segmentation import overlay, palette, save_mask_png, with_legend

            ignore = self.info.postprocess.get("ignore_index", 255)
            pal = palette(len(self.class_names), ignore, self.info.postprocess.get("mask_colors"))
            if settings.get("masks"):
                record["mask"] = str(save_mask_png(mask, Path(settings["masks"]) / f"{path.stem}.png", pal))
            if settings.get("draw"):
                from PIL import Image

                from dinotune.viz.draw import save_image

                drawn = with_legend(overlay(Image.fromarray(array, mode="RGB"), mask, pal), mask, pal, self.class_names,
                                    ignore)
                save_image(drawn, Path(settings["draw"]) / f"{path.stem}.jpg")
        return record

    def predict_arrays(self, names: list[str], arrays: list[np.ndarray], settings: dict[str, Any]) -> list[Prediction]:
        out = []
        for name, array in zip(names, arrays):
            mask = self.label_map(array, int(settings["window_batch"]), name)
            out.append(({"image": name, "mask": None, "classes": class_shares(mask, self.class_names)}, {"mask": mask}))
        return out

    def label_map(self, array: np.ndarray, window_batch: int, name: str) -> np.ndarray:
        """``H x W`` labels of one ``H x W x C`` image at its own resolution."""
        size, p, post = self.info.image_size, self.info.patch_size, self.info.postprocess
        h, w = array.shape[:2]
        mode = post.get("inference", "whole")
        target = (h, w) if mode == "slide" else eval_size(h, w, size, p)
        step = ("" if mode == "slide" else f"resized to the short side {size} and ") + f"padded to multiples of {p}"
        check_work(name, array, (-(-target[0] // p) * p, -(-target[1] // p) * p), self.info.max_image_pixels, step)
        x, valid = segment_input(array, target, p, self.spec)
        if mode == "whole" and x.shape[-2:] != (size, size):
            mode = "slide"  # the graph's input is fixed: cover the image with windows of it
            if not self._told_windows:
                warn(f"{name}: {target[0]} x {target[1]} at evaluation size, not the exported {size} x {size}: "
                     f"predicted in overlapping {size} x {size} windows (PyTorch runs such an image whole, so "
                     "label maps can differ near window borders)")
                self._told_windows = True
        stride = int(post.get("slide_stride") or 0) or default_stride(size, p)
        logits = dense_logits(lambda batch: self.graph(images=batch)["logits"], x, (h, w), valid, mode, size, stride,
                              window_batch)
        return label_map(logits)

    @classmethod
    def csv_rows(cls, results: list[dict[str, Any]]) -> list[list[Any]]:
        """One row per image and class, its share of the pixels (JSON: one record per image)."""
        return [["image", "mask", "class", "fraction"]] + [[r["image"], r["mask"] or "", name, frac]
                                                         for r in results for name, frac in r["classes"].items()]

    @classmethod
    def view(cls, record: dict[str, Any], extras: dict[str, Any]) -> dict[str, Any]:
        shares = sorted(record["classes"].items(), key=lambda item: -item[1])
        summary = f"mostly {shares[0][0]} ({100 * shares[0][1]:.1f} % of the pixels)" if shares else ""
        return {"bars": [{"name": n, "score": s} for n, s in shares], "summary": summary}

    @classmethod
    def artifact_options(cls, folder: Path) -> dict[str, Any]:
        return {"masks": str(Path(folder) / "masks")}

    @classmethod
    def take_artifacts(cls, record: dict[str, Any]) -> Prediction:
        from PIL import Image

        mask = np.asarray(Image.open(record["mask"]))
        return {**record, "mask": None}, {"mask": mask}  # the PNG's folder is about to go
