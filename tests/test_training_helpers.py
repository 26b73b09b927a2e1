"""Shared helpers of the training tests: tiny learnable datasets and configs."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from eqprop.data import Dataset
from eqprop.training.config import load_config

__all__ = ["synthetic_images", "tiny_config", "write_fashion_mnist", "write_idx"]


def synthetic_images(n: int, side: int = 8, classes: int = 4, seed: int = 0, split: str = "train") -> Dataset:
    """Class k lights up the k-th horizontal band of a noisy image: easy to learn, cheap to run."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randint(0, 60, (n, 1, side, side), generator=g).to(torch.uint8)
    band = side // classes
    for k in range(classes):
        x[y == k, :, k * band:(k + 1) * band, :] += 150
    xf = x.double() / 255
    return Dataset(x=x, y=y, num_classes=classes, mean=(xf.mean().item(),), std=(xf.std().item(),),
                   name="synthetic", kind="image", split=split)


def tiny_config(out_dir: Path, *overrides: str) -> dict:
    """fmnist_cpu shrunk to a one-block conv model on 8x8 images, plain sweeps (model.omega=1,
    model.anderson=0: device models refuse the numerical solvers), nudged phases of exactly T2
    steps from the free state, no progress bars or TensorBoard."""
    base = [
        'model.blocks=[{channels: [1, 4, 8], pools: "m-"}]', "model.T1=4", "model.tol=null", "model.anderson=0",
        "model.omega=1", "estimator.ep.T2=3", "estimator.ep.tol=null", "estimator.ep.mirror=false", "batch_size=16",
        "eval_batch_size=32", "epochs=2", "progress=false",
        "tensorboard=false", f"out_dir={out_dir}", "threads=1", "optim.lr=0.01",
    ]
    return load_config("fmnist_cpu", base + list(overrides))


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def write_fashion_mnist(root: Path, n_train: int = 48, n_test: int = 16) -> Path:
    """Tiny Fashion-MNIST idx files under root/fashion_mnist (random 28x28 images)."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / "fashion_mnist" / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / "fashion_mnist" / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return root


def free_port() -> int:
    """A free TCP port on the loopback interface, for a test's process group."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on the loopback interface (all bound at once, then released)."""
    import contextlib
    import socket

    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _traced_rank(rank: int, fn, trace_dir: str, world: int, *args) -> None:
    """Run fn(rank, world, *args) with faulthandler dumping every thread's stack to
    trace_dir/rank<r>.txt on SIGUSR1 (what spawn_ranks asks of a rank that hangs)."""
    import faulthandler
    import os
    import signal
    import sys

    with open(os.path.join(trace_dir, f"rank{rank}.txt"), "w") as f:
        faulthandler.register(signal.SIGUSR1, file=f, all_threads=True)
        fn(rank, world, *args)
    # fn has written its results and closed its process groups: leave without running the
    # destructors of the gloo objects, which can block when the peer has already exited
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_ranks(fn, world: int, *args, timeout_s: float = 300.0) -> None:
    """Run fn(rank, world, *args) in `world` spawned processes and wait for all of them; a
    rank that fails raises here, and ranks still running after `timeout_s` have their stacks
    dumped into the failure message and are killed (a hung collective must not hang the suite)."""
    import os
    import signal
    import tempfile
    import time

    import pytest
    import torch.multiprocessing as mp

    trace_dir = tempfile.mkdtemp(prefix="eqprop-ranks-")
    ctx = mp.start_processes(_traced_rank, args=(fn, trace_dir, world, *args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
            for r in alive:
                os.kill(ctx.processes[r].pid, signal.SIGUSR1)
            time.sleep(2.0)
            stacks = ""
            for r in alive:
                path = os.path.join(trace_dir, f"rank{r}.txt")
                stacks += f"\n--- rank {r} ---\n" + (open(path).read() if os.path.exists(path) else "(no dump)")
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join(10)
            pytest.fail(f"ranks {alive} of {world} still running after {timeout_s:.0f} s (killed); their stacks:"
                        f"{stacks}")


def join_as_rank(rank: int, world: int, port: int) -> None:
    """Set the environment torchrun would give process `rank` of `world` (run inside a worker)."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
