"""One training engine for every task: phases, AMP, accumulation, schedules, checkpoints, logs.

Importing the package imports no torch (``engine/run_folder.py``, the run folder's layout, is read by
the torch-free command line); its training names load on first use."""

from typing import Any

__all__ = ["NonFiniteLossError", "Trainer", "autocast", "resolve_precision", "select_device", "to_device"]


def __getattr__(name: str) -> Any:
    if name in ("autocast", "resolve_precision", "select_device", "to_device"):
        from dinotune.engine import device

        return getattr(device, name)
    if name in ("NonFiniteLossError", "Trainer"):
        from dinotune.engine import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'dinotune.engine' has no attribute {name!r}")
