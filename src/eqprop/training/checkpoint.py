"""Checkpoints: atomic writes and safe loads (`torch.load(..., weights_only=True)`).

A checkpoint holds only tensors and plain Python values (dicts, lists, numbers, strings),
so loading it can never run code: model, optimizer and scheduler state, RNG states
(torch, CUDA, numpy, python `random`), the position in training (epoch and step, the data
loader's order being a function of the seed and the epoch) and the config.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["FORMAT", "REQUIRED", "CheckpointError", "load", "load_model_state", "rng_state", "save_atomic",
           "set_rng_state"]

FORMAT = "eqprop-checkpoint/1"
REQUIRED = ("format", "config", "model", "optimizer", "scheduler", "rng", "position")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, empty, corrupt or does not fit the model."""


def save_atomic(obj: dict, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file in the same directory, fsync, then os.replace: a crash
    leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read and check a checkpoint; every failure is a CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt zip, truncated file, or a pickle of non-weight objects
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read safely (corrupt, truncated, or holding "
                              f"objects other than tensors and plain values): {first}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not an eqprop training checkpoint (format "
                              f"{ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__!r}, "
                              f"expected {FORMAT!r})")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}")
    return ckpt


def load_model_state(model: nn.Module, state: dict, path: str | os.PathLike) -> None:
    """model.load_state_dict(strict) with an error that names the file and the mismatch."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:4]) if len(lines) > 1 else lines[0]
        raise CheckpointError(f"checkpoint {path} was written for a different architecture than the "
                              f"configured model: {detail}") from None


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop may draw from, as tensors and plain values."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _to_plain(random.getstate())}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _to_plain(x):
    return [_to_plain(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x
