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
from torch import Tensor, nn

__all__ = ["DistInfo", "SyncBatchNorm", "all_reduce_sum", "any_flag", "barrier", "gather_errors", "rank_seed",
           "resolve_device", "setup", "sync_batchnorm", "teardown", "wrap"]


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


class SumOverRanks(torch.autograd.Function):
    """x summed over the ranks; its backward sums the gradients over the ranks (each rank's
    loss depends on every rank's x through the sum)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


INPUT_DIMS = {nn.BatchNorm1d: (2, 3), nn.BatchNorm2d: (4,), nn.BatchNorm3d: (5,)}


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm on CPU tensors whose training statistics are those of the global batch.

    torch's nn.SyncBatchNorm runs on GPUs only (and DDP refuses it in a CPU model). Here the
    per-channel count, sum and sum of squares are summed over ranks with an autograd-aware
    all-reduce (gloo), so the forward, the backward and the running statistics equal those
    of one process on the whole batch. Same parameters and buffers as nn.BatchNorm*d, so
    checkpoints move between synchronised and per-rank statistics freely."""

    def __init__(self, *args, input_dims: tuple[int, ...] = (2, 3, 4, 5), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.input_dims = input_dims

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in self.input_dims:
            raise ValueError(f"SyncBatchNorm (for {' or '.join(map(str, self.input_dims))}-d inputs): got a "
                             f"{input.dim()}-d input")

    def forward(self, input: Tensor) -> Tensor:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if not self.training or world == 1:
            return super().forward(input)
        self._check_input_dim(input)
        if input.device.type != "cpu":
            raise ValueError(f"eqprop's SyncBatchNorm synchronises CPU tensors; got one on {input.device} (GPU models "
                             f"use torch.nn.SyncBatchNorm: distributed.sync_batchnorm(model, device))")
        c = input.shape[1]
        dims = [0] + list(range(2, input.dim()))
        shape = [1, c] + [1] * (input.dim() - 2)
        count = torch.full((1,), input.numel() / c, dtype=input.dtype)
        stats = SumOverRanks.apply(torch.cat([count, input.sum(dims), (input * input).sum(dims)]))
        n, mean = stats[0], stats[1:1 + c] / stats[0]
        if n.item() < 2:
            raise ValueError(f"SyncBatchNorm: {int(n.item())} value per channel over all ranks; batch statistics "
                             f"need at least 2")
        var = (stats[1 + c:] / n - mean * mean).clamp_min(0)  # biased: what batch norm normalises with
        out = (input - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean), momentum)
                self.running_var.lerp_((var.detach() * (n / (n - 1))).to(self.running_var), momentum)
        return out


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Make every batch norm of `model` use the global batch's statistics under DDP: torch's
    nn.SyncBatchNorm on GPUs, `SyncBatchNorm` on the CPU. In place for the submodules (the
    parameter and buffer objects are kept, so the optimizer and state_dict keys are unchanged);
    returns the model."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, SyncBatchNorm):
            new = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats,
                                input_dims=INPUT_DIMS.get(type(child), (2, 3, 4, 5)))
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            if child.track_running_stats:
                new.running_mean, new.running_var = child.running_mean, child.running_var
                new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(model, name, new)
        else:
            sync_batchnorm(child, device)
    return model


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
