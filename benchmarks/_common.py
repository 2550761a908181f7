"""Helpers shared by the benchmark scripts: where the shared datasets are, what machine ran."""

from __future__ import annotations

import os
import platform
import subprocess
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
    if use_cuda:
        info.update(gpu_info(torch.device(device if device.startswith("cuda") else "cuda")))
    return info


def gpu_info(device) -> dict:
    """The GPU a CUDA result was measured on: name, compute capability, memory, driver, and the
    CUDA / cuDNN versions torch was built with (the driver from NVML, else nvidia-smi, else None)."""
    import torch

    props = torch.cuda.get_device_properties(device)
    return {"gpu": props.name, "gpu_count": torch.cuda.device_count(),
            "compute_capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 2**30, 1), "driver": nvidia_driver(),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "bf16_supported": torch.cuda.is_bf16_supported()}


def nvidia_driver() -> str | None:
    """The NVIDIA driver version, or None where neither NVML nor nvidia-smi answers."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:  # noqa: BLE001 - no NVML (package or library): try the command line
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None
