"""The memory and speed switches of a training run, applied to the backbone before training:
activation checkpointing (``--grad-checkpointing``) and ``torch.compile`` (``--compile``), and the
measure of what checkpointing saves (``saved_activations``), read by the tests and the adapters
benchmark.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from dinotune.config import TrainConfig
from dinotune.errors import ConfigError
from dinotune.models.bundle import ModelBundle
from dinotune.utils import info


def cpp_compiler() -> str | None:
    """The C++ compiler Inductor would use on the CPU (its own search: ``$CXX`` / ``g++`` ...),
    or None when there is none."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # a torch without that helper: look for the usual names
        names = [os.environ.get("CXX"), "g++", "clang++", "c++"]
        return next((found for n in names if n and (found := shutil.which(n))), None)
    try:
        return get_cpp_compiler()
    except Exception:  # InvalidCxxCompiler: nothing found that runs
        return None


def compile_problem(device: torch.device) -> str | None:
    """Why ``torch.compile`` cannot work on ``device`` here, or None. Inductor writes C++ for the
    CPU (a C++ compiler is needed) and Triton kernels for CUDA (Triton is needed, and a C
    compiler for its launcher)."""
    if device.type == "cpu" and cpp_compiler() is None:
        return ("torch.compile on the CPU generates C++ and needs a C++ compiler, and none was found "
                "(install g++ or clang++, or point $CXX at one)")
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "torch.compile on CUDA generates Triton kernels, and Triton is not installed (pip install triton)"
    return None


def check_compile(device: torch.device) -> None:
    """Raise ConfigError when ``--compile`` cannot work on ``device``: checked before any work."""
    problem = compile_problem(device)
    if problem:
        raise ConfigError(f"--compile: {problem}; or drop --compile (training runs the same, uncompiled)")


def prepare_for_training(bundle: ModelBundle, train: TrainConfig, device: torch.device) -> None:
    """Apply ``train.grad_checkpointing`` and ``train.compile`` to ``bundle.model.backbone``.

    Checkpointing acts on every trainable part of the backbone whatever the adapter kind; blocks
    that neither train nor lead to a trainable weight (the frozen prefix under ``--last-n-blocks``,
    unless a widened N-band patch embedding trains before it) keep nothing and are not
    recomputed. Compilation is lazy: it happens at the first forward, and its failure is raised
    as a ConfigError there (``DinoBackbone.compile_model``).
    """
    backbone = bundle.model.backbone
    if train.grad_checkpointing:
        backbone.enable_grad_checkpointing()
        if not any(p.requires_grad for p in backbone.parameters()):
            info("--grad-checkpointing: the backbone is frozen, so it keeps no activations to recompute "
                 "(only a stage that unfreezes it benefits)")
    if train.compile:
        check_compile(device)
        backbone.compile_model()
        info("--compile: the backbone's blocks compile at the first forward (a minute or more; again "
             "when the batch size or training / evaluation mode first changes)")


# ------------------------------------------------------------------------------------ measure
@dataclass
class SavedActivations:
    """What one forward keeps for backward: ``bytes`` over distinct storages, autograd's saved
    tensors plus the inputs checkpointed blocks keep for their recompute, counted when the forward
    ends (a tensor saved into a graph that was dropped before then, as under ``detach``, is gone
    and not counted); ``recomputing`` the checkpointed modules that kept their inputs (they run
    again during backward)."""

    storages: dict[int, int] = field(default_factory=dict)
    recomputing: list[nn.Module] = field(default_factory=list)
    _seen: list[tuple[int, int, weakref.ref]] = field(default_factory=list, repr=False)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    @property
    def mb(self) -> float:
        return self.bytes / 2**20

    def add(self, obj: Any) -> None:
        if torch.is_tensor(obj):
            storage = obj.untyped_storage()
            self._seen.append((storage.data_ptr(), storage.nbytes(), weakref.ref(obj)))
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                self.add(item)
        elif isinstance(obj, dict):
            for item in obj.values():
                self.add(item)

    def close(self) -> None:
        """Count the storages whose tensors are still alive, each once (called as the forward ends)."""
        for ptr, nbytes, ref in self._seen:
            if ref() is not None:
                self.storages[ptr] = max(nbytes, self.storages.get(ptr, 0))
        self._seen.clear()


def _needs_grad(out: Any) -> bool:
    if torch.is_tensor(out):
        return out.requires_grad
    if isinstance(out, (list, tuple)):
        return any(_needs_grad(o) for o in out)
    return False


@contextlib.contextmanager
def saved_activations(model: nn.Module) -> Iterator[SavedActivations]:
    """Count what the forwards run inside the block keep for backward, each storage once, the
    weights of ``model`` left out (autograd keeps references to them, not copies).

    Autograd's saved tensors are seen through ``saved_tensors_hooks``. A checkpointed block
    (non-reentrant) hides its own from those hooks and keeps its inputs instead, referenced by the
    recompute function (only when something inside needs a gradient: otherwise the graph, and so
    the inputs, are dropped); those are counted by wrapping the blocks' checkpoint function.
    """
    counted = SavedActivations()
    # a weight saved for backward (to form the input's gradient) is a reference, not new memory
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            counted.add(t)
        return t

    def counting(module: nn.Module, checkpoint: Callable) -> Callable:
        def run(function: Callable, *args: Any, **kwargs: Any) -> Any:
            out = checkpoint(function, *args, **kwargs)
            if _needs_grad(out):
                counted.recomputing.append(module)
                counted.add(args)
                counted.add(list(getattr(function, "keywords", {}).values()))
            return out

        return run

    wrapped = {m: m._gradient_checkpointing_func for m in model.modules()
               if getattr(m, "gradient_checkpointing", False) and hasattr(m, "_gradient_checkpointing_func")}
    try:
        for m, func in wrapped.items():
            m._gradient_checkpointing_func = counting(m, func)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield counted
        counted.close()
    finally:
        for m, func in wrapped.items():
            m._gradient_checkpointing_func = func
