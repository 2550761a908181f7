"""Data plumbing shared by every task: robust image reading and DINOv2 preprocessing."""

from dinotune.data.images import ImageReadError, SkipReport, load_image, scan_images

__all__ = ["ImageReadError", "SkipReport", "load_image", "scan_images"]
