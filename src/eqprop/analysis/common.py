"""What the analyses and the benchmark suite share: a fixed random image batch, the input
currents of a chain's blocks, timing (wall and CPU) of one call or one training step, and
matplotlib for figures."""
from __future__ import annotations

import time
from collections.abc import Callable
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..chain import FFEBM
from ..optional import require

__all__ = ["synthetic_images", "block_inputs", "timed", "train_step", "pyplot"]


def synthetic_images(batch: int, in_size: int = 32, num_classes: int = 10, seed: int = 0,
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """A fixed Gaussian batch of 3-channel images with random labels (no data set needed)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, in_size, in_size, generator=gen)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    return x.to(device=device, dtype=dtype), y.to(device)


def block_inputs(model: FFEBM, x: Tensor) -> list[Tensor]:
    """The input current of every block of `model` for the batch x (one sweep per block,
    T1 = 1, so only the shapes and the feedforward maps' scale are meaningful)."""
    us: list[Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda m, a: us.append(a[0].detach())) for b in model.blocks]
    saved = [b.T1 for b in model.blocks]
    try:
        model.configure_blocks(T1=1)
        with torch.no_grad():
            model(x)
    finally:
        for b, t in zip(model.blocks, saved):
            b.configure(T1=t)
        for h in hooks:
            h.remove()
    return us


def timed(fn: Callable[..., object], *args: object, device: str | torch.device | None = None) -> tuple[float, float]:
    """(wall, process CPU) seconds of fn(*args), a CUDA device synchronised before and after. CPU
    time counts this process' threads only, so on a shared machine it moves less with other
    programs' load than wall time does."""
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    w0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - w0, time.process_time() - c0


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    """One training step: forward, cross-entropy, backward (the model's estimators), optimiser step."""
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def pyplot() -> ModuleType:
    """matplotlib.pyplot with the file-only Agg backend (the `analysis` extra)."""
    require("matplotlib", "analysis", "analysis figures").use("Agg")
    return require("matplotlib.pyplot", "analysis", "analysis figures")
