"""The checks of ``dinotune_export.json`` and of the graph beside it: an export folder is a file the
user may have received from anyone, so every value is checked for its type and range before it is
used, and the graph's declared inputs and outputs must be what the description and the task say.

A description that fails is refused in one line naming the file, the key and the value; nothing is
guessed (a class list shorter than the logits, ``"class_names": "ab"``, a zero standard deviation, a
pixel limit of 0 that would switch the decompression-bomb guard off, another task's graph swapped
in: each refused, never a silent wrong answer).
"""

from __future__ import annotations

import math
from typing import Any, Sequence, get_args

from dinotune.data.arrays import BandLayout
from dinotune.errors import ConfigError

# A description larger than this is not one dinotune wrote (they are a few KB, class names included).
MAX_DESCRIPTION_BYTES = 16 * 1024 * 1024
# Sides and band counts far beyond any model dinotune exports (the graph's side is fixed in it).
MAX_IMAGE_SIZE = 8192
MAX_BANDS = 1024
FORMATS = ("onnx", "torchscript")
DTYPES = ("float32", "float16")


class DescriptionError(ConfigError):
    """A ``dinotune_export.json`` (or its graph) that does not describe a usable export."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Checker:
    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, value: Any, want: str) -> DescriptionError:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return DescriptionError(f"{self.where}: {key} is {shown}; {want}")

    def int_in(self, raw: dict[str, Any], key: str, low: int, high: int) -> int:
        value = raw.get(key)
        if not _is_int(value) or not low <= value <= high:
            raise self.fail(key, value, f"an integer from {low} to {high} is expected")
        return value

    def names(self, raw: dict[str, Any], key: str, allow_empty: bool = False) -> list[str]:
        value = raw.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or (not value and not allow_empty):
            raise self.fail(key, value, "a list of names (strings) is expected")
        return value

    def choice(self, raw: dict[str, Any], key: str, choices: Sequence[str]) -> str:
        value = raw.get(key)
        if value not in choices:
            raise self.fail(key, value, f"one of {', '.join(choices)} is expected")
        return value

    def mapping(self, raw: dict[str, Any], key: str) -> dict[str, Any]:
        value = raw.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, value, "an object is expected")
        return value


def check_description(raw: Any, where: str) -> dict[str, Any]:
    """The fields of a parsed ``dinotune_export.json`` (``where`` names it), each checked; raises
    DescriptionError naming the first key that is wrong."""
    c = _Checker(where)
    if not isinstance(raw, dict):
        raise DescriptionError(f"{where}: not a dinotune export description (a JSON object is expected)")
    missing = [k for k in ("task", "class_names", "image_size", "patch_size", "inputs", "outputs") if k not in raw]
    if missing:
        raise DescriptionError(f"{where}: not a dinotune export description (missing {', '.join(missing)})")
    names = c.names(raw, "class_names", allow_empty=True)  # a backbone export (pretraining) has none
    patch = c.int_in(raw, "patch_size", 1, 256)
    size = c.int_in(raw, "image_size", patch, MAX_IMAGE_SIZE)
    if size % patch:
        raise c.fail("image_size", size, f"a multiple of the patch size {patch} is expected")
    out = {"class_names": names, "patch_size": patch, "image_size": size, "task": raw["task"],
           "inputs": c.names(raw, "inputs"), "outputs": c.names(raw, "outputs"),
           "input": check_input(c.mapping(raw, "input"), c),
           "postprocess": c.mapping(raw, "postprocess"),
           "format": c.choice({"format": raw.get("format", "onnx")}, "format", FORMATS),
           "dtype": c.choice({"dtype": raw.get("dtype", "float32")}, "dtype", DTYPES),
           "model_file": _model_file(raw.get("model_file", "model.onnx"), c),
           # 0 (no limit) would switch the decompression-bomb guard off for whoever runs the export
           "max_image_pixels": c.int_in({"max_image_pixels": raw.get("max_image_pixels", 1)}, "max_image_pixels",
                                        1, 2**40)}
    categories = raw.get("categories")
    if categories is not None:
        if (not isinstance(categories, list) or len(categories) != len(names)
                or not all(isinstance(cat, dict) and _is_int(cat.get("id")) and isinstance(cat.get("name"), str)
                           for cat in categories)):
            raise c.fail("categories", categories, f"a list of {len(names)} {{\"id\": int, \"name\": str}} (one per "
                         "class) is expected")
        out["categories"] = categories
    for key in ("source", "verification"):
        out[key] = c.mapping(raw, key)
    for key in ("opset",):
        if raw.get(key) is not None:
            out[key] = c.int_in(raw, key, 1, 1000)
    for key in ("exporter", "dinotune_version"):
        if isinstance(raw.get(key), str):
            out[key] = raw[key]
    return out


def check_input(raw: dict[str, Any], c: _Checker) -> dict[str, Any]:
    """The ``input`` object (an ``InputSpec``'s fields): bands, RGB bands, per-band statistics."""
    bands = c.int_in({"input.in_channels": raw.get("in_channels", 3)}, "input.in_channels", 1, MAX_BANDS)
    out: dict[str, Any] = {"in_channels": bands}
    rgb = raw.get("rgb_bands", [0, 1, 2])
    if not isinstance(rgb, list) or len(rgb) != 3 or not all(_is_int(b) and 0 <= b < bands for b in rgb):
        raise c.fail("input.rgb_bands", rgb, f"three band indices below {bands} are expected")
    out["rgb_bands"] = rgb
    for key, positive in (("mean", False), ("std", True)):
        value = raw.get(key, [0.485, 0.456, 0.406] if key == "mean" else [0.229, 0.224, 0.225])
        if (not isinstance(value, list) or len(value) != bands or not all(_is_number(v) for v in value)
                or (positive and not all(v > 0 for v in value))):
            want = f"{bands} finite numbers (one per band)" + (", each above 0" if positive else "")
            raise c.fail(f"input.{key}", value, f"{want} are expected")
        out[key] = [float(v) for v in value]
    arrays = raw.get("arrays", False)
    if not isinstance(arrays, bool):
        raise c.fail("input.arrays", arrays, "true or false is expected")
    out["arrays"] = arrays
    out["layout"] = c.choice({"input.layout": raw.get("layout", "auto")}, "input.layout", get_args(BandLayout))
    if not arrays and bands != 3:
        raise c.fail("input.in_channels", bands, "3 is expected for a model of pictures (arrays: false)")
    return out


def _model_file(value: Any, c: _Checker) -> str:
    """The graph's file name: a plain name inside the export folder, never a path out of it."""
    if not isinstance(value, str) or not value or "/" in value or "\\" in value or value in (".", ".."):
        raise c.fail("model_file", value, "a file name inside the export folder is expected")
    return value


def check_graph(where: str, declared_inputs: list[str], declared_outputs: list[str],
                graph_inputs: dict[str, list[Any]], graph_outputs: dict[str, list[Any]],
                signature: tuple[dict[str, int], dict[str, int]], channels: int, size: int,
                classes: int) -> None:
    """The graph's own inputs / outputs (name -> shape, symbolic dimensions as strings) against the
    description's names and the task runtime's ``signature`` (name -> rank, for inputs and outputs):
    another export's graph swapped in, or a description of another task, is refused by name. Where
    the graph fixes them, the images' channels and side and the class dimension must agree too."""
    if list(graph_inputs) != list(declared_inputs) or list(graph_outputs) != list(declared_outputs):
        raise DescriptionError(
            f"{where}: the graph takes {', '.join(graph_inputs)} and gives {', '.join(graph_outputs)}, but the "
            f"description says {', '.join(declared_inputs)} -> {', '.join(declared_outputs)} (a graph of another "
            "export?); export the run again")
    want_in, want_out = signature
    for kind, got, want in (("input", graph_inputs, want_in), ("output", graph_outputs, want_out)):
        if set(got) != set(want) or any(len(got[n]) != rank for n, rank in want.items()):
            shapes = ", ".join(f"{n} {got[n]}" for n in got)
            expected = ", ".join(f"{n} of rank {r}" for n, r in want.items())
            raise DescriptionError(f"{where}: the graph's {kind}s are {shapes}; this task's graph has {expected} "
                                   "(a graph or description of another task?)")
    images = graph_inputs.get("images")
    if images is not None:
        for axis, expected, what in ((1, channels, "input.in_channels"), (2, size, "image_size"),
                                     (3, size, "image_size")):
            if _is_int(images[axis]) and images[axis] != expected:
                raise DescriptionError(f"{where}: {what} is {expected} but the graph's images are {images}")
    for name, shape in graph_outputs.items():
        # the class dimension of logits (classification B x K, segmentation B x K x h x w)
        if name == "logits" and len(shape) >= 2 and _is_int(shape[1]) and shape[1] != classes:
            raise DescriptionError(f"{where}: {classes} class names but the graph gives {shape[1]} logits per "
                                   "image; export the run again")
