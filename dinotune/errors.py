"""Every error dinotune raises on purpose, in one module every layer may import.

Each is a ``DinotuneError`` (the CLI prints its message and exits with status 2, no trace) and
also a subclass of the built-in error it refines, so ``except ValueError`` keeps working. The
message always names the file, key or entry at fault and what would be accepted instead.
"""

from __future__ import annotations


class DinotuneError(Exception):
    """Base of the errors below: a problem with the user's input, told in one clear message."""


class ConfigError(DinotuneError, ValueError):
    """A configuration value is invalid; the message names the key and the valid choices."""


class DataError(DinotuneError, ValueError):
    """The data cannot be used; the message names the file or folder and the problem."""


class ImageReadError(DinotuneError, OSError):
    """An image could not be decoded; the message names the file."""


class MaskReadError(ImageReadError):
    """A mask file could not be decoded (a run-time read failure, like a broken image)."""


class CheckpointError(DinotuneError, RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the model / data."""


class CheckpointFormatError(DinotuneError, ValueError):
    """An official DINOv2 ``.pth`` checkpoint cannot be converted (the message says which tensor)."""


class BackboneLoadError(DinotuneError, RuntimeError):
    """The backbone could not be loaded; the message says why and what to try instead."""


class ExportError(DinotuneError, RuntimeError):
    """A run cannot be exported in the asked format, or the export cannot be uploaded; the message
    says why (the head, the backbone, the hub)."""


class NonFiniteLossError(DinotuneError, RuntimeError):
    """The loss became NaN or infinite; the run stopped without overwriting good checkpoints."""


__all__ = [
    "DinotuneError", "ConfigError", "DataError", "ImageReadError", "MaskReadError", "CheckpointError",
    "CheckpointFormatError", "BackboneLoadError", "ExportError", "NonFiniteLossError",
]
