"""Multi-GPU (and multi-process CPU) training through ``torch.distributed``.

dinotune does not start processes itself: launch the usual command under ``torchrun``
(``torchrun --nproc_per_node 4 -m dinotune train ...``). ``torchrun`` sets ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK``; ``setup`` then joins the process group (NCCL on CUDA, Gloo on the
CPU), and the engine wraps the model in ``DistributedDataParallel`` and gives every process its
shard of each epoch through a ``DistributedSampler``. ``--batch-size`` is per process, so the
effective batch is ``batch_size x processes x accumulate``. Process 0 alone evaluates, writes the
run folder, logs and prints; the others wait for it.

We use ``torch.distributed`` directly rather than ``accelerate``: the engine already owns the
pieces accelerate would wrap (AMP, accumulation, clipping, checkpoints), and DDP + a sampler is all
that is missing.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

# rank 0 evaluates and writes checkpoints while the others wait in a collective; a large
# validation set can take longer than the default timeout
_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``world_size`` 1 and ``enabled`` False outside ``torchrun``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True when this process was started by ``torchrun`` (or another launcher setting its env:
    a stray ``WORLD_SIZE`` from a job scheduler alone does not count)."""
    return all(k in os.environ for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"))


def setup(device_spec: str = "auto") -> DistContext:
    """Join the process group when launched by ``torchrun`` (idempotent); else a no-op context.
    ``device_spec`` ``cpu`` forces Gloo; otherwise NCCL when CUDA is available."""
    if not launched():
        return DistContext()
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and not str(device_spec).startswith(("cpu", "mps"))
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=_TIMEOUT)
    return current()


def cleanup() -> None:
    """Leave the process group (at the end of a command run under torchrun)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def current() -> DistContext:
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True)


def device_for(ctx: DistContext, device: torch.device) -> torch.device:
    """Each process drives its own GPU: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def broadcast_object(obj: Any) -> Any:
    """Process 0's ``obj`` on every process (e.g. the run folder it chose)."""
    if not current().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def mean_over_processes(value: float, device: torch.device) -> float:
    """The mean of a per-process scalar over all processes (the loss of a step, for logs and the
    non-finite check, so every process stops together)."""
    ctx = current()
    return sum_over_processes({"value": value}, device)["value"] / ctx.world_size if ctx.enabled else value


def sum_over_processes(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Per-key sums over all processes of a dict with the same keys everywhere (epoch totals)."""
    if not current().enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` (only its trainable parameters are synchronised;
    wrap again after changing which parameters train)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = None
    if device.type == "cuda":
        ids = [device.index if device.index is not None else torch.cuda.current_device()]
        # batch statistics over every GPU's images, not each GPU's few (segmentation decoders); in
        # place, so checkpoints keep their keys. SyncBatchNorm needs CUDA: CPU runs keep plain BN.
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # find_unused_parameters: heads may leave outputs out of the loss (e.g. auxiliary layers an
    # option switches off); the extra graph walk is cheap next to a ViT forward
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def shard_loader(loader: DataLoader, seed: int) -> DataLoader:
    """``loader`` with a ``DistributedSampler``: each process gets its own ``1 / world_size`` of
    every epoch, shuffled by ``seed + epoch`` when ``loader`` shuffled (``set_epoch`` each epoch)."""
    shuffle = not isinstance(loader.sampler, SequentialSampler)
    sampler = DistributedSampler(loader.dataset, shuffle=shuffle, seed=seed, drop_last=loader.drop_last)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      generator=loader.generator, drop_last=loader.drop_last, pin_memory=loader.pin_memory)
