"""Process-group setup and the few collectives pre-training needs (single process, torchrun single- or multi-node).

Launch with ``torchrun``; it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``,
which :func:`init_distributed` reads. Without them everything runs in one process and every collective here is a
no-op, so the same training code serves laptops, one GPU and many nodes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DistInfo",
    "init_distributed",
    "is_main",
    "is_distributed",
    "all_reduce_mean",
    "all_gather_mean_keep_grad",
    "barrier",
    "cleanup_distributed",
    "wrap_ddp",
    "gather_objects",
    "broadcast_object",
]


@dataclass
class DistInfo:
    """Where this process sits: global rank, number of processes, rank on its node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def is_distributed() -> bool:
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _pick_device(device: str | None, local_rank: int) -> torch.device:
    if device is not None:
        picked = torch.device(device)
        if picked.type == "cuda" and picked.index is None:
            picked = torch.device("cuda", local_rank)
        return picked
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(device: str | None = None) -> DistInfo:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU), or describe the single process when not launched by it.

    Args:
        device: ``"cpu"``, ``"cuda"`` (the node-local GPU ``LOCAL_RANK`` is chosen) or ``"cuda:N"``; ``None`` picks
            CUDA when available.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    picked = _pick_device(device, local_rank)
    if picked.type == "cuda":
        torch.cuda.set_device(picked)
    if world_size > 1 and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun")
        backend = "nccl" if picked.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=picked)


def is_main(info: DistInfo) -> bool:
    """The process that writes checkpoints, figures and logs."""
    return info.rank == 0


def all_reduce_mean(t: Tensor) -> Tensor:
    """Mean of ``t`` over all processes (a detached copy; ``t`` is untouched). No-op copy in a single process."""
    out = t.detach().clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def all_gather_mean_keep_grad(local_mean: Tensor, count: float | None = None) -> Tensor:
    """Global mean of per-rank means whose gradient flows through this rank's ``local_mean`` only.

    Without ``count`` every rank is assumed to average the same number of items (true for equal per-rank batches
    of equal crops), and the value is the plain mean of the rank means. With ``count`` (this rank's number of
    items) the value is the count-weighted mean, i.e. the mean over all items of the global batch.

    The gradient w.r.t. ``local_mean`` is ``world_size * count / total_count`` (1 for equal counts), not
    ``count / total_count``: DDP averages gradients over ranks, which supplies the ``1/world_size`` and sums the
    other ranks' parts in, so a loss ``f(global mean)`` updates the weights exactly as one process holding the
    whole global batch would.
    """
    if not is_distributed():
        return local_mean
    world = dist.get_world_size()
    local = local_mean.detach().contiguous()
    weight = torch.ones((), device=local.device, dtype=local.dtype) if count is None else \
        torch.tensor(float(count), device=local.device, dtype=local.dtype)
    packed = torch.cat([(local * weight).reshape(-1), weight.reshape(1)])
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed)
    total = torch.stack(gathered).sum(0)
    global_mean = (total[:-1] / total[-1]).view_as(local)
    coefficient = world * weight / total[-1]
    scaled = local_mean * coefficient
    return scaled + (global_mean - scaled.detach())


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def cleanup_distributed() -> None:
    """Leave the process group if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` when several processes run; the model itself otherwise."""
    if info.world_size <= 1 or not is_distributed():
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def gather_objects(obj: object) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank (e.g. a path only rank 0 computed); ``obj`` in a single process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
