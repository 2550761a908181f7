"""``--batch-size auto``: the largest batch that fits in GPU memory, found by trial.

The search doubles the batch (1, 2, 4, ...) while a training step of the real model on a batch of
the real training samples fits; the first out-of-memory error ends it, and the last size that fit
is the answer: the largest power of two that fits, capped by the number of training images (per
process) and by ``MAX_AUTO_BATCH``. No binary search between the last fit and the first failure:
the headroom a power of two leaves (the next one did not fit, so up to half the memory may be
unused) absorbs what a trial does not see (allocator fragmentation over an epoch, the DDP
gradient buckets, an EMA copy of the weights).

``find_batch_size`` is the search alone (any ``trial`` callable), testable without CUDA;
``TrainingTrial`` is one training step at a given batch size; ``resolve_auto_batch_size`` runs
the search with it on the real model and data, prints the result and writes it
into the run's config (``config.yaml``), so the run folder records the number and ``--resume``
reuses it.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from dinotune.config import save_yaml
from dinotune.engine import distributed
from dinotune.engine.device import autocast, to_device
from dinotune.engine.run_folder import RunLayout
from dinotune.errors import ConfigError
from dinotune.models.bundle import ModelBundle
from dinotune.utils import get_rng_state, info, set_rng_state

# Batches beyond this train few steps per epoch and rarely help; the search stops here.
MAX_AUTO_BATCH = 1024
# Distinct samples read from the training set; a batch repeats them (the same shapes and sizes).
_SAMPLES = 8
# What CUDA raises when memory runs out besides OutOfMemoryError (cuDNN / cuBLAS workspaces).
_OOM_MESSAGES = ("CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_NOT_SUPPORTED",
                 "cuDNN error: CUDNN_STATUS_ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    """An error that means the batch did not fit (not a bug to raise)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in _OOM_MESSAGES)


def free_memory() -> None:
    """Return what a failed trial left to CUDA's caching allocator (after its exception is gone;
    collecting first frees tensors held in reference cycles). Nothing to do elsewhere."""
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


def find_batch_size(trial: Callable[[int], None], limit: int, *, start: int = 1) -> tuple[int, int | None]:
    """The largest batch ``start * 2^k <= limit`` for which ``trial(batch)`` raises no
    out-of-memory error, and the first size that did not fit (None when the search reached
    ``limit``). Other errors propagate.

    Raises:
        ConfigError: not even ``start`` fits.
    """
    best, failed = 0, None
    size = start
    while size <= limit:
        fits = True
        try:
            trial(size)
        except Exception as exc:  # noqa: BLE001 - anything but out-of-memory is re-raised
            if not is_out_of_memory(exc):
                raise
            fits = False
        free_memory()  # outside the except block: the traceback (and its tensors) is gone
        if not fits:
            failed = size
            break
        best = size
        size *= 2
    if not best:
        raise ConfigError(f"--batch-size auto: not even a batch of {start} fits in GPU memory; try "
                          "--grad-checkpointing, --adapter lora with --last-n-blocks, a smaller --image-size "
                          "or --model")
    return best, failed


class TrainingTrial:
    """A trial for ``find_batch_size``: one training step of ``bundle.model`` on a batch of ``n``
    samples (``samples`` repeated, collated as the training loader does): forward under the
    run's precision, backward, and an optimizer-like step (AdamW's two moments per trainable
    weight, allocated once and kept across trials as training keeps them, and the temporaries
    of its update)."""

    def __init__(self, bundle: ModelBundle, task: Any, samples: Sequence[Any], collate: Callable[[list], Any],
                 device: torch.device, precision: str):
        self.bundle, self.task, self.samples, self.collate = bundle, task, list(samples), collate
        self.device, self.precision = device, precision
        self.model = bundle.model.to(device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.moments = [torch.zeros_like(p) for p in self.params for _ in range(2)]

    def __call__(self, n: int) -> None:
        model = self.model.train()
        try:
            batch = to_device(self.collate([self.samples[i % len(self.samples)] for i in range(n)]), self.device)
            with autocast(self.device, self.precision):
                loss = self.task.training_step(self.bundle, model, batch)["loss"]
            loss.backward()
            if self.moments:  # AdamW's update divides by the root of the second moment: one more copy
                torch._foreach_sqrt(self.moments[1::2])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        finally:
            model.zero_grad(set_to_none=True)


def resolve_auto_batch_size(cfg: Any, task: Any, bundle: ModelBundle, dataset: Dataset,
                            collate: Callable[[list], Any], run_dir: Path, device: torch.device,
                            precision: str) -> int:
    """Find the batch size, set ``cfg.train.batch_size`` to it and rewrite ``run_dir/config.yaml``.

    Under ``torchrun`` process 0 searches and every process takes its answer. The random states
    are restored afterwards, so the run trains exactly as one given that number would.
    """
    ctx = distributed.current()
    answer: int | str | None = None
    failure: BaseException | None = None
    if ctx.is_main:
        try:
            answer = _search(cfg, task, bundle, dataset, collate, run_dir, device, precision, ctx)
        except Exception as exc:  # noqa: BLE001 - told to the other processes, then raised
            answer, failure = f"--batch-size auto failed on process 0: {exc}", exc
    answer = distributed.broadcast_object(answer)  # the others wait here, and must not wait forever
    if failure is not None:
        raise failure
    if isinstance(answer, str):
        raise ConfigError(answer)
    cfg.train.batch_size = int(answer)
    if ctx.is_main:
        save_yaml(cfg, RunLayout(run_dir).config)
    return int(answer)


def _search(cfg: Any, task: Any, bundle: ModelBundle, dataset: Dataset, collate: Callable[[list], Any],
            run_dir: Path, device: torch.device, precision: str, ctx: distributed.DistContext) -> int:
    rng = get_rng_state()  # reading samples augments them, and the model's dropout draws too
    limit = min(MAX_AUTO_BATCH, max(1, len(dataset) // ctx.world_size))
    try:
        samples = [dataset[i] for i in range(min(_SAMPLES, len(dataset)))]
        size, failed = find_batch_size(TrainingTrial(bundle, task, samples, collate, device, precision), limit)
    finally:
        free_memory()  # the trial's optimizer moments are gone with it
        set_rng_state(rng)
    why = (f"a batch of {failed} did not fit" if failed is not None
           else f"capped at {limit}, " + ("the training images" + (" per process" if ctx.enabled else "")
                                          if limit < MAX_AUTO_BATCH else "the search's maximum"))
    info(f"--batch-size auto: {size} images per batch{' per process' if ctx.enabled else ''} "
         f"(the largest power of two that fits; {why}); saved to {RunLayout(run_dir).config}")
    return size
