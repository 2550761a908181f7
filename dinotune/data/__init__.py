"""Data plumbing shared by every task: robust image reading (pictures and band arrays), the input
spec of N-band data, and DINOv2 preprocessing.

The names below are loaded on first use: ``dinotune.data.images`` and ``dinotune.data.arrays`` need
no torch, so the torch-free inference runtime (``dinotune.runtime``) reads files with them."""

from typing import Any

__all__ = ["ImageReadError", "InputSpec", "SkipReport", "load_image", "read_input", "scan_images"]


def __getattr__(name: str) -> Any:
    if name in ("InputSpec", "read_input"):
        from dinotune.data import bands

        return getattr(bands, name)
    if name in ("ImageReadError", "SkipReport", "load_image", "scan_images"):
        from dinotune.data import images

        return getattr(images, name)
    raise AttributeError(f"module 'dinotune.data' has no attribute {name!r}")
