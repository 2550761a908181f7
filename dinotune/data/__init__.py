"""Data plumbing shared by every task: robust image reading (pictures and band arrays), the input
spec of N-band data, and DINOv2 preprocessing."""

from dinotune.data.bands import InputSpec, read_input
from dinotune.data.images import ImageReadError, SkipReport, load_image, scan_images

__all__ = ["ImageReadError", "InputSpec", "SkipReport", "load_image", "read_input", "scan_images"]
