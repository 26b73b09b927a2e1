"""Data parallelism with torch.nn.parallel.DistributedDataParallel, launched by torchrun.

    torchrun --nproc_per_node=4 -m eqprop.cli train cifar10_split_l6_2blocks

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; with WORLD_SIZE > 1
the trainer joins the process group (nccl on GPUs, gloo on CPU), each rank takes its slice of
every global batch and DDP averages the gradients. The EP backward of a block returns the
parameter gradients from an autograd.Function, so DDP's gradient hooks see them as usual.

With a tolerance, ranks may relax for different numbers of iterations (their batches
differ); that is harmless: only the gradients are synchronised, after each backward.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "all_reduce_sum", "any_flag", "barrier", "gather_errors", "rank_seed", "resolve_device", "setup",
           "teardown", "wrap"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The device of this process: 'auto' is CUDA when available, else the CPU. Under torchrun
    (world_size > 1) each rank uses cuda:LOCAL_RANK, so a device index is refused there."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device={name!r} is not a device name (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={name!r} was asked for but CUDA is not available")
        if world_size > 1 and device.index is not None:
            raise ValueError(f"device={name!r} with {world_size} processes would put every rank on GPU "
                             f"{device.index}; give device=cuda (or auto): each rank then uses cuda:LOCAL_RANK")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device cuda:{device.index} does not exist: {torch.cuda.device_count()} GPU(s) are "
                               f"visible (LOCAL_RANK={local_rank})")
        torch.cuda.set_device(device)
    return device


def setup(device_name: str, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group when launched with WORLD_SIZE > 1; pick this rank's device.
    `timeout_s` bounds how long a rank waits for the others in a collective before it fails
    (a rank that died or hangs then stops the run instead of holding the rest forever)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    device = resolve_device(device_name, local, world)
    if world > 1 and not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if device.type == "cuda":
            dist.init_process_group(backend="nccl", rank=rank, world_size=world, device_id=device, timeout=timeout)
        else:
            dist.init_process_group(backend="gloo", rank=rank, world_size=world, timeout=timeout)
    return DistInfo(rank, world, local, device)


def rank_seed(seed: int, info: DistInfo) -> int:
    """The seed of this rank's random draws after the model is built (dropout masks,
    augmentation noise): distinct per rank, equal to `seed` on rank 0 and in one process."""
    return seed + info.rank


def gather_errors(error: BaseException | None, info: DistInfo) -> list[tuple[int, str]]:
    """[(rank, message)] of every rank that failed, on every rank: called by all ranks at the
    same point, so that a failure on one rank stops all of them with its message instead of
    leaving the others waiting in a collective."""
    mine = None if error is None else f"{type(error).__name__}: {error}"
    if not info.enabled:
        return [] if mine is None else [(info.rank, mine)]
    everyone: list = [None] * info.world_size
    dist.all_gather_object(everyone, mine)
    return [(r, m) for r, m in enumerate(everyone) if m is not None]


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """DDP around the model when distributed (parameters are broadcast from rank 0)."""
    if not info.enabled:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_flag(flag: bool, info: DistInfo) -> bool:
    """True on every rank when `flag` is true on any rank (keeps ranks in step on stop/NaN)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
