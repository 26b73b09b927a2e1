"""What the analyses and the benchmark suite share: a fixed random image batch, the input
currents of a chain's blocks, the model and training batches of a training checkpoint,
timing (wall and CPU) of one call or one training step, and matplotlib for figures."""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..chain import FFEBM
from ..optional import require

__all__ = ["synthetic_images", "block_inputs", "trained_model", "training_batches", "timed", "train_step", "pyplot"]


def synthetic_images(batch: int, in_size: int = 32, num_classes: int = 10, seed: int = 0,
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """A fixed Gaussian batch of 3-channel images with random labels (no data set needed)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, in_size, in_size, generator=gen)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    return x.to(device=device, dtype=dtype), y.to(device)


def block_inputs(model: FFEBM, x: Tensor, relaxed: bool = False) -> list[Tensor]:
    """The input current of every block of `model` for the batch x. relaxed=False: one sweep
    per block (T1 = 1), so only the shapes and the feedforward maps' scale are meaningful;
    relaxed=True: the free phases as configured, so each block sees what a training forward
    (batch norm in the model's mode) gives it."""
    us: list[Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda m, a: us.append(a[0].detach())) for b in model.blocks]
    saved = [b.T1 for b in model.blocks]
    try:
        if not relaxed:
            model.configure_blocks(T1=1)
        with torch.no_grad():
            model(x)
    finally:
        for b, t in zip(model.blocks, saved):
            b.configure(T1=t)
        for h in hooks:
            h.remove()
    return us


def trained_model(path: str | Path, data_dir: str | None = None) -> tuple[nn.Module, dict, object, dict]:
    """(model in train mode, its run's config, the run's training set, the checkpoint's
    position {'epoch', 'step'}) from a training checkpoint file; in channels-last layout when
    the run trained in it, so its relaxations run as in training."""
    from ..data import load_dataset  # the training layer, imported when used
    from ..training import checkpoint as ckpt_io
    from ..training.config import DEFAULTS, merge
    from ..training.models import build_model, model_inputs

    state = ckpt_io.load(Path(path))
    cfg = merge(DEFAULTS, state["config"], allow_new=True)
    train = load_dataset(cfg["dataset"], "train", data_dir or cfg["data_dir"], **cfg["dataset_options"])
    model = build_model(cfg, model_inputs(train))
    ckpt_io.load_model_state(model, state["model"], Path(path))
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    return model.train(), cfg, train, state["position"]


def training_batches(cfg: dict, train: object, batch: int, batches: int) -> object:
    """The first `batches` batches of a run's training set in file order, normalised as that
    run's training normalised them (its std_factor) and laid them out (channels_last), without
    augmentation."""
    from ..data import DeviceLoader, default_std_factor

    std = cfg["std_factor"] if cfg["std_factor"] is not None else default_std_factor(train.name)
    fmt = torch.channels_last if cfg["channels_last"] and train.kind == "image" else None
    return DeviceLoader(train, batch, train=False, augment=False, std_factor=std, limit=batch * batches,
                        memory_format=fmt)


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
