"""The teacher of self-distillation: an exponential moving average of the student's trained weights.

DINO's teacher is not trained: after every optimizer step each of its weights moves towards the
student's, ``t <- m * t + (1 - m) * s``, with the momentum ``m`` rising from ``--momentum`` (0.992)
to 1 on a cosine over training (DINOv2's schedule), so the teacher is an ensemble of recent
students that changes ever more slowly.

Only the weights that train have a teacher copy (the head, and the backbone's adapter weights or all
of it with ``full``); frozen weights are shared, so a LoRA student's teacher costs the adapters'
size, not a second backbone. The copies are buffers of the head, so they are saved and restored
with it (a resumed run continues with its teacher), and the teacher runs by swapping them into the
student's modules under ``no_grad`` and back, leaving the student's values exact.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


def _key(name: str) -> str:
    return name.replace(".", "__")  # buffer names cannot hold dots


class TeacherWeights(nn.Module):
    """The teacher's copy of ``named`` (``{name: parameter}``), starting equal to the student."""

    def __init__(self, named: dict[str, nn.Parameter]):
        super().__init__()
        self.names = list(named)
        for name, p in named.items():
            self.register_buffer(_key(name), p.detach().clone().float())

    def copies(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, _key(name)) for name in self.names}

    @torch.no_grad()
    def update(self, named: dict[str, nn.Parameter], momentum: float) -> None:
        """``t <- momentum * t + (1 - momentum) * s`` for every tracked weight; momentum 1 keeps the teacher."""
        for name, copy in self.copies().items():
            copy.mul_(momentum).add_(named[name].detach().float(), alpha=1.0 - momentum)

    @contextlib.contextmanager
    def swapped_in(self, named: dict[str, nn.Parameter]) -> Iterator[None]:
        """The student's modules with the teacher's weights for the block; the student's come back exactly."""
        saved = {name: p.detach().clone() for name, p in named.items()}
        try:
            with torch.no_grad():
                for name, copy in self.copies().items():
                    named[name].copy_(copy)
            yield
        finally:
            with torch.no_grad():
                for name, p in named.items():
                    p.copy_(saved[name])
