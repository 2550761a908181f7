"""``RuntimeTask``: the half of a task that needs no torch. Each task has one, in its own folder
(``tasks/<name>/runtime.py``), named by the task registry.

It owns what surrounds an exported graph: the numpy preprocessing of a file into the graph's
inputs, the post-processing of the graph's outputs into the records ``dinotune predict`` writes,
the text of its output files (the PyTorch path formats through it too, so both backends write the
same files), and what the server's page draws of a record (``view``). The generic pieces it uses
(resizing, windows, file inputs, the session) live beside this module.

A subclass sets ``name`` (the registry's), ``extra_options`` (predict options besides the fields of
its config's ``inference`` section), ``check`` (how input files are checked), and implements
``predict_arrays``, ``csv_rows`` (or ``format_predictions``) and ``view``.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Literal, Mapping

import numpy as np

from dinotune.data.input_spec import InputSpec
from dinotune.errors import ConfigError
from dinotune.runtime.metadata import ExportInfo

# A record and what the page needs beside it (e.g. ``{"mask": H x W labels}``).
Prediction = tuple[dict[str, Any], dict[str, Any]]
# ``graph(images=..., ...)`` -> the graph's outputs by name (an onnxruntime session's ``run``).
Graph = Callable[..., dict[str, np.ndarray]]


class RuntimeTask:
    """An exported model's task around its graph (see the module docstring).

    Args:
        info: the export's description (classes, sizes, input, post-processing settings).
        graph: runs the exported graph: named numpy inputs -> named numpy outputs.
    """

    name: ClassVar[str]
    # the exported graph's tensors: name -> rank (``ExportGraph``'s names; checked against the graph)
    graph_inputs: ClassVar[dict[str, int]] = {"images": 4}
    graph_outputs: ClassVar[dict[str, int]]
    extra_options: ClassVar[frozenset[str]] = frozenset()
    # the files predict writes (json and csv at least; detection adds coco)
    formats: ClassVar[tuple[str, ...]] = ("json", "csv")
    # formats the task writes itself while predicting (a label GeoTIFF streamed window by window):
    # ``predict --out FILE`` hands the path to the task as its ``out`` option instead of writing text
    written_formats: ClassVar[tuple[str, ...]] = ()
    check: ClassVar[Literal["full", "fast"]] = "fast"
    # the page colours label i with palette entry i + colour_offset: 0 when label 0 is a class
    # drawn as such (segmentation's background), 1 keeps black for nothing
    colour_offset: ClassVar[int] = 1

    def __init__(self, info: ExportInfo, graph: Graph):
        self.info = info
        self.graph = graph

    @property
    def class_names(self) -> list[str]:
        return list(self.info.class_names)

    @property
    def spec(self) -> InputSpec:
        return self.info.input

    # ------------------------------------------------------------------------------ settings
    def check_postprocess(self, postprocess: dict[str, Any]) -> str | None:
        """What is wrong with the task's own keys of the export's ``postprocess`` (beyond the
        inference section, which its config's ranges check), or None."""
        return None

    def check_settings(self, settings: dict[str, Any]) -> dict[str, Any]:
        """Task-specific refusals and adjustments of the resolved settings (the run's inference
        section with the call's options applied, already range-checked)."""
        return settings

    # ---------------------------------------------------------------------------- predicting
    def predict_files(self, paths: list[Path], settings: dict[str, Any],
                      read: Callable[[Path], np.ndarray]) -> list[dict[str, Any]]:
        """The records of ``paths`` (read by ``read`` into ``H x W x C`` arrays), in batches of
        ``settings["batch_size"]``."""
        out: list[dict[str, Any]] = []
        for chunk in batches(paths, settings.get("batch_size", 1)):
            out += [record for record, _ in self.predict_arrays([str(p) for p in chunk],
                                                                [read(p) for p in chunk], settings)]
        return out

    def predict_arrays(self, names: list[str], arrays: list[np.ndarray], settings: dict[str, Any]) -> list[Prediction]:
        """``(record, extras)`` per image: ``arrays`` are ``H x W x C`` (uint8 RGB pictures or
        float32 bands), ``names`` their ``image`` fields."""
        raise NotImplementedError

    # ------------------------------------------------------------- files and the server's page
    @classmethod
    def format_predictions(cls, results: list[dict[str, Any]], fmt: str,
                           settings: Mapping[str, Any] | None = None) -> str:
        """``predict``'s records as the text of a ``fmt`` file: ``json`` (``json_text``), ``csv``
        (``csv_rows``) or another of the task's ``formats``; ``settings``: the resolved predict
        settings (a task may show a person fewer rows than evaluation keeps)."""
        if fmt not in cls.formats:
            raise ConfigError(f"unknown output format {fmt!r}: choose {' or '.join(cls.formats)}")
        if fmt == "json":
            return cls.json_text(results)
        buf = io.StringIO()
        csv.writer(buf).writerows(cls.csv_rows(results))
        return buf.getvalue()

    @classmethod
    def json_text(cls, results: list[dict[str, Any]]) -> str:
        """The JSON file: the records as they are (a task may flatten them, as COCO results are)."""
        return json.dumps(results, indent=2) + "\n"

    @classmethod
    def csv_rows(cls, results: list[dict[str, Any]]) -> list[list[Any]]:
        """The CSV file's rows, the header first."""
        raise NotImplementedError

    @classmethod
    def view(cls, record: dict[str, Any], extras: dict[str, Any]) -> dict[str, Any]:
        """What the page draws of one record, any of: ``bars`` ``[{"name", "score"}]`` (a bar
        chart, best first), ``boxes`` ``[{"name", "score", "bbox"}]`` (``xywh`` in the image's
        pixels, filtered on the page by its threshold; a box may carry ``"mask": {"image": PNG data
        URL opaque on its object, "bbox": xywh where that image lies}``, tinted in the box's colour
        and shown with the box), ``summary`` (one line under the picture);
        a label map in ``extras["mask"]`` is drawn over the picture by the server."""
        raise NotImplementedError

    @classmethod
    def view_settings(cls, settings: dict[str, Any]) -> dict[str, Any]:
        """Settings of the page's controls from the run's inference settings (``threshold``: the
        initial box threshold of a page that draws boxes)."""
        return {}

    @classmethod
    def artifact_options(cls, folder: Path) -> dict[str, Any]:
        """Predict options that make a PyTorch run's ``predict`` also write what ``view`` needs
        (``take_artifacts`` reads it back), into ``folder``."""
        return {}

    @classmethod
    def take_artifacts(cls, record: dict[str, Any]) -> Prediction:
        """The record as ``predict`` returns it without ``artifact_options``, and the extras read
        from the files those options wrote."""
        return record, {}


def batches(items: list[Any], size: int) -> Iterable[list[Any]]:
    """``items`` in consecutive chunks of at most ``size``."""
    size = max(1, int(size))
    for start in range(0, len(items), size):
        yield items[start: start + size]
