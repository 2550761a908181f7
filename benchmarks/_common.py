"""Helpers shared by the benchmark scripts: where the shared datasets are, what machine ran."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path


def shared_dataset(name: str, given: str | None) -> Path:
    """``given``, else ``$DINOTUNE_SHARED/data/<name>``; exits with the reason when absent."""
    root = os.environ.get("DINOTUNE_SHARED")
    path = Path(given) if given else (Path(root) / "data" / name if root else None)
    if path is None or not path.is_dir():
        sys.exit(f"{name} not found: pass --data DIR or set DINOTUNE_SHARED to the shared/ folder")
    return path


def machine_info(device: str = "auto") -> dict:
    """Platform, torch build, processor and (when used) GPU of this run."""
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads()}
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                 if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu_model"] = platform.processor() or platform.machine()
    use_cuda = torch.cuda.is_available() and device != "cpu"
    info["device"] = f"cuda: {torch.cuda.get_device_name(0)}" if use_cuda else "cpu"
    return info
