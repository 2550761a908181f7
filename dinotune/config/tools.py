"""Defaults of the commands that are not a task: ``dinotune pca``."""

from __future__ import annotations

from dataclasses import dataclass

from dinotune.config.base import opt


@dataclass
class PcaConfig:
    image_size: int = opt(448, "short side in pixels for a backbone spec (a run uses its own --image-size)", ge=1)
    max_images: int = opt(8, "use at most this many images, one figure row each", ge=1)
