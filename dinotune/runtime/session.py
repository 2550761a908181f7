"""An onnxruntime session on an exported graph: providers by device name, numpy in and out."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from dinotune.errors import ConfigError
from dinotune.threads import choose_threads, current

DEVICES = ("auto", "cpu", "cuda")


def providers_for(device: str, available: Sequence[str]) -> list[str]:
    """onnxruntime execution providers for ``device``: ``cpu``; ``cuda`` (refused when this
    onnxruntime has no CUDA provider: ``pip install onnxruntime-gpu``); ``auto`` CUDA when there."""
    name = device.split(":")[0]
    if name not in DEVICES:
        raise ConfigError(f"--device {device!r}: the ONNX backend runs on {', '.join(DEVICES)}")
    if name == "cpu" or (name == "auto" and "CUDAExecutionProvider" not in available):
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise ConfigError(f"--device {device}: this onnxruntime has no CUDA provider (it has "
                          f"{', '.join(available)}); install onnxruntime-gpu, or use --device cpu")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class OnnxSession:
    """``model.onnx`` in onnxruntime; ``run`` takes and returns numpy arrays by tensor name.

    Args:
        path: the ``.onnx`` file (its external weights, if any, beside it).
        device: ``auto``, ``cpu`` or ``cuda`` (``cuda:N`` picks the GPU).
        threads: intra-op threads (0: ``dinotune.threads``' choice, which does not oversubscribe).
    """

    def __init__(self, path: str | Path, device: str = "auto", threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ConfigError(f"the ONNX backend needs onnxruntime: pip install 'dinotune[runtime]' ({exc})") from None
        providers = providers_for(device, ort.get_available_providers())
        options = ort.SessionOptions()
        # onnxruntime's default (a thread per core) oversubscribes a busy machine as PyTorch's does
        options.intra_op_num_threads = threads or current() or choose_threads()
        provider_options = None
        if ":" in device and providers[0] == "CUDAExecutionProvider":
            provider_options = [{"device_id": int(device.split(":")[1])}, {}]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers,
                                                provider_options=provider_options)
        except Exception as exc:  # onnxruntime raises its own types (InvalidGraph, Fail, ...)
            raise ConfigError(f"{path}: onnxruntime cannot load the graph ({type(exc).__name__}: {exc})") from None
        self.providers = self.session.get_providers()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # name -> declared shape (ints where the graph fixes a dimension, strings where it is symbolic)
        self.input_shapes = {i.name: list(i.shape) for i in self.session.get_inputs()}
        self.output_shapes = {o.name: list(o.shape) for o in self.session.get_outputs()}

    def run(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """The graph's outputs by name, for inputs given by name."""
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ValueError(f"the graph takes {', '.join(self.input_names)}; missing {', '.join(missing)}")
        values = self.session.run(self.output_names, {n: inputs[n] for n in self.input_names})
        return dict(zip(self.output_names, values))
