"""Peak memory of a training process: the CUDA allocator's peak on a GPU, the peak resident set
size elsewhere. Recorded per epoch (``sys/peak_memory_mb``) and read by benchmarks and sweeps."""

from __future__ import annotations

import sys
from typing import Any

import torch


def reset_peak(device: torch.device) -> None:
    """Start a new peak: the CUDA allocator's counter (RSS has no reset; its peak is the process's)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: torch.device) -> float | None:
    """MiB: ``torch.cuda.max_memory_allocated`` on CUDA (since the last ``reset_peak``), else the
    process's peak resident set size (``None`` where the platform does not tell)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def batch_length(batch: Any) -> int:
    """Images in a batch: the first dimension of its first tensor (``image`` / ``images``)."""
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else [batch]
    for value in values:
        if torch.is_tensor(value) and value.ndim:
            return int(value.shape[0])
    return 0
