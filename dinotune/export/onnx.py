"""``dinotune export RUN --format onnx`` (and ``torchscript``): a trained run as one graph at a fixed
image size, beside ``dinotune_export.json`` for ``dinotune.runtime``.

The run is loaded with its adapter merged (``dinotune.load(merge=True)``: LoRA / DoRA folded into the
base weights, so the frozen backbone and the head are one plain network), wrapped in its task's graph
(``Task.export_graph``: the model and the tensor part of its post-processing, ``models/graph.py``)
and exported with a dynamic batch. DINOv2's position table is interpolated once for the export size. The ONNX
file is checked with ``onnx.checker`` and then run once with onnxruntime on a random batch against
PyTorch; the largest difference is written into the JSON (``verification``).

Two ONNX exporters (``--exporter``): ``dynamo`` (default), PyTorch's ``torch.export``-based exporter,
which also simplifies the graph with onnxscript's optimizer (constant folding, dead nodes); and
``legacy``, the TorchScript tracer PyTorch deprecated in 2.9, several times faster to export and
kept as a fallback. Both give graphs whose outputs agree with PyTorch to float rounding.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from dinotune.adapters import adapter_for, merge_adapter
from dinotune.config.tools import ExportConfig
from dinotune.data.images import DEFAULT_MAX_IMAGE_PIXELS
from dinotune.engine.run_folder import BEST
from dinotune.errors import ConfigError, ExportError
from dinotune.models.graph import ExportGraph
from dinotune.runs import LoadedRun, checkpoint_folder, load, run_root
from dinotune.runtime.metadata import EXPORT_META, ExportInfo
from dinotune.utils import info, warn

# ONNX operators the graphs need: LayerNormalization (opset 17); GridSample, the deformable
# attention's bilinear sampling, came in opset 16.
MIN_OPSET = 17
# protobuf cannot hold a file over 2 GB: larger models keep their weights in model.onnx.data
EXTERNAL_DATA_BYTES = 1_800_000_000
EXPORTERS = ("dynamo", "legacy")


def _load(run: Any, checkpoint_name: str, model: str | None, device: str) -> LoadedRun:
    """A loaded run with its adapter merged (``run`` may already be one; it is merged in place,
    which changes none of its outputs)."""
    if isinstance(run, LoadedRun):
        merge_adapter(run.model.backbone)
        return run
    return load(run, checkpoint_name=checkpoint_name, device=device, merge=True, model=model, precision="fp32")


@contextlib.contextmanager
def export_ready(loaded: LoadedRun, image_size: int, half: bool) -> Iterator[ExportGraph]:
    """The task's graph of ``loaded``'s model in eval mode (a half-precision copy with ``half``),
    with DINOv2's position embeddings fixed for ``image_size``."""
    model = loaded.model.eval()
    if half:
        model = copy.deepcopy(model).half()
    # DINOv2 interpolates its learned position table (bicubic) at every forward: fixed once for the
    # export size, the graph holds a constant and no bicubic Resize (DINOv3's RoPE has no table)
    with model.backbone.family.fixed_position_embeddings(model.backbone, image_size, image_size):
        yield loaded.task.export_graph(loaded, model, image_size).eval()


def _resolve(loaded: Any, image_size: int | None, opset: int | None, exporter: str | None) -> tuple[int, int, str]:
    defaults = ExportConfig()
    size = image_size or loaded.cfg.backbone.image_size
    loaded.model.backbone.check_image_size(size, "--image-size")
    opset = defaults.opset if opset is None else int(opset)
    if opset < MIN_OPSET:
        raise ConfigError(f"--opset {opset}: the graph needs opset {MIN_OPSET} or later (LayerNormalization is "
                          f"opset 17; the detector's GridSample opset 16)")
    exporter = exporter or defaults.exporter
    if exporter not in EXPORTERS:
        raise ConfigError(f"--exporter {exporter!r}: choose {' or '.join(EXPORTERS)}")
    return size, opset, exporter


def _prepare_out(out: str | Path) -> Path:
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not empty; remove it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def export_onnx(run: Any, out: str | Path, *, image_size: int | None = None, half: bool = False,
                opset: int | None = None, exporter: str | None = None, checkpoint_name: str = BEST,
                model: str | None = None, device: str = "cpu") -> Path:
    """Export ``run`` as ``out/model.onnx`` + ``out/dinotune_export.json``; returns ``out``.

    Args:
        run: a run folder, one of its checkpoint folders, or a ``dinotune.load``-ed run.
        out: a new (or empty) folder.
        image_size: the graph's fixed input side (default: the run's ``backbone.image_size``); a
            multiple of the patch size.
        half: fp16 weights and arithmetic inside the graph (inputs and outputs stay float32).
        opset: ONNX opset (default ``ExportConfig.opset``; at least ``MIN_OPSET``).
        exporter: ``dynamo`` or ``legacy`` (default ``ExportConfig.exporter``).
        checkpoint_name, model, device: as ``dinotune.load``.
    """
    import onnx

    loaded = _load(run, checkpoint_name, model, device)
    size, opset, exporter = _resolve(loaded, image_size, opset, exporter)
    out = _prepare_out(out)
    graph_path = out / "model.onnx"
    try:
        with export_ready(loaded, size, half) as graph:
            names = graph.input_names
            device = next(graph.parameters()).device
            args = tuple(a.to(device) for a in graph.example_inputs(loaded.input_spec.in_channels, size))
            info(f"exporting {loaded.task.name} run to ONNX (opset {opset}, {exporter} exporter, {size} x {size}, "
                 f"{'fp16' if half else 'fp32'})")
            _export(graph, args, names, graph.output_names, graph_path, opset, exporter)
            expected = [t.detach().float().cpu().numpy() for t in _as_tuple(graph(*args))]
        onnx.checker.check_model(str(graph_path), full_check=True)
        _refuse_bicubic(onnx.load(str(graph_path), load_external_data=False), loaded)
        difference, labels_equal = _verify(graph_path, names, args, expected)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    meta = _metadata(loaded, size, graph, checkpoint_name, half)
    meta.update(format="onnx", model_file=graph_path.name, opset=opset, exporter=exporter,
                verification={"max_abs_diff": difference, "labels_equal": labels_equal, "batch": len(args[0]),
                              "inputs": "random", "runtime": "onnxruntime CPUExecutionProvider"})
    ExportInfo(**meta).write(out)
    info(f"wrote {graph_path} (largest difference to PyTorch on a random batch: {difference:.2e})")
    return out


def export_torchscript(run: Any, out: str | Path, *, image_size: int | None = None, half: bool = False,
                       checkpoint_name: str = BEST, model: str | None = None, device: str = "cpu") -> Path:
    """Export ``run`` as ``out/model.pt`` (``torch.jit.trace`` of the same graph module as the ONNX
    export: same inputs, outputs and fixed size) + ``out/dinotune_export.json``. TorchScript is
    deprecated by PyTorch (it recommends ``torch.export``); this format is for tools that still
    load ``torch.jit`` files. ``dinotune.runtime`` reads the ONNX export only."""
    loaded = _load(run, checkpoint_name, model, device)
    size, _, _ = _resolve(loaded, image_size, ExportConfig().opset, None)
    out = _prepare_out(out)
    path = out / "model.pt"
    try:
        with export_ready(loaded, size, half) as graph:
            channels = loaded.input_spec.in_channels
            device = next(graph.parameters()).device
            args = tuple(a.to(device) for a in graph.example_inputs(channels, size))
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # TracerWarnings, and jit's own deprecation notice
                traced = torch.jit.trace(graph, args, check_trace=False)
                traced.save(str(path))
                check = tuple(a.to(device) for a in graph.example_inputs(channels, size, batch=3))
                reloaded = torch.jit.load(str(path), map_location=device)
                difference = max(float((a.float() - b.float()).abs().max())
                                 for a, b in zip(_as_tuple(reloaded(*check)), _as_tuple(graph(*check))))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    meta = _metadata(loaded, size, graph, checkpoint_name, half)
    meta.update(format="torchscript", model_file=path.name, exporter="torch.jit.trace",
                verification={"max_abs_diff": difference, "batch": 3, "inputs": "random", "runtime": "torch.jit.load"})
    ExportInfo(**meta).write(out)
    info(f"wrote {path}")
    return out


def _as_tuple(x: Any) -> tuple[torch.Tensor, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _export(graph: nn.Module, args: tuple[torch.Tensor, ...], names: tuple[str, ...], outputs: tuple[str, ...],
            path: Path, opset: int, exporter: str) -> None:
    big = sum(p.numel() * p.element_size() for p in graph.parameters()) > EXTERNAL_DATA_BYTES
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings on shape arithmetic, the legacy exporter's notice
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1)
            with _quiet_stdout():
                torch.onnx.export(graph, args, str(path), input_names=list(names), output_names=list(outputs),
                                  dynamic_shapes=tuple({0: batch} for _ in names), opset_version=opset,
                                  dynamo=True, external_data=big, optimize=True, verbose=False)
        else:
            axes = {n: {0: "batch"} for n in (*names, *outputs)}
            torch.onnx.export(graph, args, str(path), input_names=list(names), output_names=list(outputs),
                              dynamic_axes=axes, opset_version=opset, dynamo=False)


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """The dynamo exporter prints its progress on stdout, where ``dinotune export`` keeps nothing
    but results (it goes to stderr instead), and onnxscript's optimizer logs a warning for every
    ``Split`` it leaves unfolded (kept back: they say nothing a user can act on)."""
    import logging
    import sys

    optimizer = logging.getLogger("onnxscript")
    level = optimizer.level
    optimizer.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        optimizer.setLevel(level)


def _refuse_bicubic(graph: Any, loaded: Any) -> None:
    """The fixed position embeddings leave no bicubic ``Resize`` in the graph; one that is still
    there means a backbone whose interpolation was not replaced, and is reported, not shipped."""
    from onnx import helper

    for node in graph.graph.node:
        if node.op_type == "Resize":
            modes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if modes.get("mode") in (b"cubic", "cubic"):
                raise ExportError(f"{loaded.cfg.backbone.model}: the exported graph still interpolates its position "
                                  "embeddings (a bicubic Resize); this backbone's embeddings are not supported by the "
                                  "ONNX export")


def _verify(path: Path, names: tuple[str, ...], args: tuple[torch.Tensor, ...], expected: list[np.ndarray]
            ) -> tuple[float, float]:
    """onnxruntime's outputs against PyTorch's on ``args``: the largest absolute difference of the
    float outputs, and the share of equal integer outputs (class labels; two near-equal scores may
    swap places in a top-k, so a label mismatch is reported, not refused)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: a.cpu().numpy() for n, a in zip(names, args)})
    worst, equal, count = 0.0, 0, 0
    for g, e in zip(got, expected):
        if np.issubdtype(g.dtype, np.integer):
            equal += int((g == e.astype(g.dtype)).sum())
            count += g.size
        elif g.size:
            worst = max(worst, float(np.abs(g.astype(np.float64) - e.astype(np.float64)).max()))
    share = equal / count if count else 1.0
    if share < 1.0:
        warn(f"{path}: {100 * (1 - share):.1f}% of the class labels differ from PyTorch's on the check batch "
             "(near-equal scores ordered differently, or a real difference: compare on your images)")
    return worst, share


def _metadata(loaded: LoadedRun, size: int, graph: ExportGraph, checkpoint_name: str, half: bool) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        dinotune_version = version("dinotune")
    except PackageNotFoundError:  # a source tree that was never installed
        dinotune_version = "unknown"
    cfg = loaded.cfg
    categories = loaded.bundle.categories
    return dict(
        task=loaded.task.name, class_names=list(loaded.bundle.class_names), image_size=size,
        patch_size=loaded.model.patch_size, inputs=list(graph.input_names), outputs=list(graph.output_names),
        input=loaded.input_spec, postprocess=graph.postprocess,
        categories=[{"id": int(c["id"]), "name": str(c["name"])} for c in categories] if categories else None,
        # a run trained without a pixel limit (0) still ships one: whoever runs the export reads untrusted files
        dtype="float16" if half else "float32", max_image_pixels=cfg.data.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS,
        dinotune_version=dinotune_version,
        source={"run": str(loaded.run_dir), "checkpoint": checkpoint_name, "backbone": cfg.backbone.model,
                "adapter": cfg.adapter.kind, "adapter_merged": adapter_for(cfg.adapter.kind).merges,
                "trained_image_size": cfg.backbone.image_size},
    )


def onnx_for_run(run: str | Path, *, checkpoint_name: str = BEST, model: str | None = None,
                 exporter: str | None = None) -> Path:
    """The ONNX export of a run folder for ``predict --backend onnx``: ``RUN/export/onnx-<checkpoint>``,
    exported on first use (with ``exporter``, default ``ExportConfig.exporter``) and again whenever
    the checkpoint's files change (their names, sizes and modification times are recorded in the
    export's ``source``)."""
    import json

    from dinotune.engine.run_folder import RunLayout

    folder = checkpoint_folder(Path(run).expanduser(), checkpoint_name, quiet=True)
    stamp = _files_stamp(folder) + (f"|model={model}" if model else "")
    out = RunLayout(run_root(folder)).export_dir(f"onnx-{folder.name}")
    meta_path = out / EXPORT_META
    if meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()).get("source", {}).get("checkpoint_stamp") == stamp:
                return out
        except ValueError:
            pass
        info(f"{folder} changed since {out} was exported; exporting again")
    else:
        info(f"exporting {folder} to ONNX once, into {out} (reused while the checkpoint is unchanged)")
    if out.exists():  # an older export, or one that was interrupted
        shutil.rmtree(out)
    loaded = load(run, checkpoint_name=checkpoint_name, device="cpu", merge=True, model=model, precision="fp32")
    export_onnx(loaded, out, checkpoint_name=checkpoint_name, exporter=exporter)
    info_file = ExportInfo.read(out)
    info_file.source["checkpoint_stamp"] = stamp
    info_file.write(out)
    return out


def _files_stamp(folder: Path) -> str:
    """A hash of the names, sizes and modification times of the files in ``folder``."""
    import hashlib

    hasher = hashlib.sha1()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        st = path.stat()
        hasher.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return hasher.hexdigest()[:16]
