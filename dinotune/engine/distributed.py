"""Multi-GPU (and multi-process CPU) training through ``torch.distributed``.

dinotune does not start processes itself: launch the usual command under ``torchrun``
(``torchrun --nproc_per_node 4 -m dinotune train ...``). ``torchrun`` sets ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK``; ``setup`` then joins the process group (NCCL on CUDA, Gloo on the
CPU), and the engine wraps the model in ``DistributedDataParallel`` and gives every process its
shard of each epoch through a ``DistributedSampler``. ``--batch-size`` is per process, so the
effective batch is ``batch_size x processes x accumulate``; losses that normalise by a count
(boxes, labelled pixels) divide by the count over all processes (``average_count``), so the
gradient is the one a single process would compute on the whole batch. Every process evaluates
its own shard of the validation set and the partial results are gathered (``gather_objects``);
process 0 alone writes the run folder, logs and prints.

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
from torch.utils.data import DataLoader, DistributedSampler, Sampler, SequentialSampler

# the longest wait in a collective is the others waiting while process 0 writes a checkpoint
# (seconds, even for a fully fine-tuned giant backbone); evaluation is shared, not waited for
_TIMEOUT = datetime.timedelta(minutes=30)


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


def average_count(count: torch.Tensor) -> torch.Tensor:
    """A loss normaliser: this process's ``count`` (a float tensor: boxes, labelled pixels)
    summed over all processes and divided by their number, at least 1 (DETR's ``num_boxes``).
    DDP averages gradients over processes, so dividing each process's summed loss by this gives
    exactly the gradient of one process dividing the whole batch's sum by the whole count.
    A collective: call it from every process (training steps), never inside evaluation."""
    if current().enabled:
        count = count.detach().clone()
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1.0)


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (``[obj]`` outside ``torchrun``). Used to combine
    the partial evaluation results of each process's shard."""
    ctx = current()
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(model: nn.Module) -> None:
    """Process 0's buffers (e.g. BatchNorm running statistics) on every process, so that the
    shards of a sharded evaluation are scored by one and the same model."""
    if not current().enabled:
        return
    for buf in model.buffers():
        dist.broadcast(buf.data, src=0)


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...`` of a dataset: disjoint shards that together cover it
    exactly once (``DistributedSampler`` pads with repeats, which would count images twice)."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


def shard_eval_loader(loader: DataLoader) -> DataLoader:
    """``loader`` restricted to this process's shard (in order); ``loader`` itself outside
    ``torchrun``. ``loader.dataset`` stays the whole dataset (the ground truth)."""
    ctx = current()
    if not ctx.enabled:
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size,
                      sampler=ShardSampler(len(loader.dataset), ctx.rank, ctx.world_size),
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)


def wrap(model: nn.Module, device: torch.device, find_unused_parameters: bool) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` (only its trainable parameters are synchronised;
    wrap again after changing which parameters train). ``find_unused_parameters``: the model
    declares that some trainable parameters may get no gradient in a step (DDP then walks the
    graph each step to find them; otherwise it waits for their gradients forever)."""
    from torch.nn.parallel import DistributedDataParallel

    ids = None
    if device.type == "cuda":
        ids = [device.index if device.index is not None else torch.cuda.current_device()]
        # batch statistics over every GPU's images, not each GPU's few (segmentation decoders); in
        # place, so checkpoints keep their keys. SyncBatchNorm needs CUDA: CPU runs keep plain BN.
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def shard_loader(loader: DataLoader, seed: int) -> DataLoader:
    """``loader`` with a ``DistributedSampler``: each process gets its own ``1 / world_size`` of
    every epoch, shuffled by ``seed + epoch`` when ``loader`` shuffled (``set_epoch`` each epoch).
    A sampler with a ``shard(rank, world_size)`` method (``--sampler balanced``) shards itself:
    each process takes its share of one weighted draw."""
    shard = getattr(loader.sampler, "shard", None)
    if shard is not None:
        ctx = current()
        sampler = shard(ctx.rank, ctx.world_size)
    else:
        shuffle = not isinstance(loader.sampler, SequentialSampler)
        sampler = DistributedSampler(loader.dataset, shuffle=shuffle, seed=seed, drop_last=loader.drop_last)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      generator=loader.generator, drop_last=loader.drop_last, pin_memory=loader.pin_memory)
