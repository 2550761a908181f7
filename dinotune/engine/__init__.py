"""One training engine for every task: phases, AMP, accumulation, schedules, checkpoints, logs."""

from dinotune.engine.device import autocast, resolve_precision, select_device, to_device
from dinotune.engine.trainer import NonFiniteLossError, Trainer

__all__ = ["NonFiniteLossError", "Trainer", "autocast", "resolve_precision", "select_device", "to_device"]
