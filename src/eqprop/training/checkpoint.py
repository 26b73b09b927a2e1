"""Checkpoints: atomic writes, the previous checkpoint kept, and safe loads.

A checkpoint holds only tensors and plain Python values (dicts, lists, numbers, strings),
so loading it can never run code (`torch.load(..., weights_only=True)`): model, optimizer
and scheduler state, RNG states (torch, CUDA, numpy, python `random`, and the generators of
the blocks' analog devices, `eqprop.devices.device_state`), the position in training (epoch
and step, the data loader's order being a function of the seed and the epoch) and the config.

`save_rotating` keeps the last two checkpoints, `checkpoint.pt` and `checkpoint.prev.pt`;
`load_latest` reads the newer one and falls back to the older one when the newer is damaged
(truncated, corrupt, missing after an interrupted rotation). Every load goes to the CPU
first; the trainer moves the states to its device.

Every write is a temporary file in the same folder (``.<name>.<random>.tmp``), fsync, then
`os.replace`: a crash leaves either the old file or the new one, never a torn one, and at
worst a stale temporary file, which `remove_stale_temporaries` deletes at the next start.

`kill_point(name)` is a testing hook: with the environment variable ``EQPROP_KILL_AT`` set to
``NAME:N`` (several separated by commas), the process sends itself SIGKILL the N-th time it
reaches the point NAME. The points are ``step`` (inside an optimizer step, between backward
and update), ``eval`` (inside the evaluation, after its first batch), ``save`` (the new
checkpoint written to its temporary file, not yet in place), ``rotate`` (the old checkpoint
renamed to the previous one, the new one not yet in place) and ``log`` (before a
metrics record is appended). Without the variable it does nothing.
"""
from __future__ import annotations

import os
import random
import signal
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..devices import device_blocks, device_state, load_device_state

__all__ = ["FORMAT", "REQUIRED", "TEMP_SUFFIX", "CheckpointError", "kill_point", "load", "load_latest",
           "load_model_state", "previous_path", "remove_stale_temporaries", "rng_state", "save_atomic",
           "save_rotating", "set_rng_state", "write_text_atomic", "device_rng_state", "restore_device_state"]

FORMAT = "eqprop-checkpoint/1"
REQUIRED = ("format", "config", "model", "optimizer", "scheduler", "rng", "position")
TEMP_SUFFIX = ".tmp"
KILL_ENV = "EQPROP_KILL_AT"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, empty, truncated, corrupt, not from eqprop, or that does
    not fit the model."""


# ---- writing -------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_temp(path: Path, write) -> str:
    """write(f) into a temporary file beside `path`, flushed and fsynced; its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return tmp


def _replace_atomic(path: str | os.PathLike, write, before_replace=None) -> Path:
    """`write(file)` into a temporary file beside `path`, fsync, then os.replace onto `path`
    (after `before_replace()`, when given); the temporary file never outlives a failure."""
    path = Path(path)
    tmp = _write_temp(path, write)
    try:
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def save_atomic(obj: dict, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file in the same directory, fsync, then os.replace."""
    return _replace_atomic(path, lambda f: torch.save(obj, f))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Replace a text file in one step (temporary file, fsync, os.replace)."""
    return _replace_atomic(path, lambda f: f.write(text.encode()))


def previous_path(path: str | os.PathLike) -> Path:
    """checkpoint.pt -> checkpoint.prev.pt: where the previous checkpoint is kept."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def save_rotating(obj: dict, path: str | os.PathLike, rotate: bool = True) -> Path:
    """Write `path` atomically and keep the checkpoint it replaces as `previous_path(path)`.

    Order: the new file is complete on disk, then the current one becomes the previous one,
    then the new one takes its place. Killed between the two renames, only the previous one
    is there; `load_latest` takes it. A current file that is not a complete archive, or
    `rotate=False` (the current one is known to be damaged), is replaced without becoming
    the previous one, so that the previous one stays a good checkpoint."""
    path = Path(path)

    def rotate_current() -> None:
        kill_point("save")
        if rotate and path.exists() and zipfile.is_zipfile(path):
            os.replace(path, previous_path(path))
            kill_point("rotate")

    return _replace_atomic(path, lambda f: torch.save(obj, f), rotate_current)


def remove_stale_temporaries(folder: str | os.PathLike, names: tuple[str, ...]) -> list[Path]:
    """Delete the temporary files a killed writer of one of `names` left in `folder` (only
    files of the form .<name>.<random>.tmp); the paths removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for name in names:
        for p in folder.glob(f".{name}.*{TEMP_SUFFIX}"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


# ---- the testing hook ------------------------------------------------------------------------

_kill_counts: dict[str, int] = {}


def kill_point(name: str) -> None:
    """SIGKILL this process the N-th time point `name` is reached when EQPROP_KILL_AT holds
    `name:N` (a documented testing hook; a no-op without the variable)."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    _kill_counts[name] = _kill_counts.get(name, 0) + 1
    for item in spec.split(","):
        point, _, count = item.strip().partition(":")
        if point == name and count.strip().isdigit() and int(count) == _kill_counts[name]:
            os.kill(os.getpid(), signal.SIGKILL)


# ---- reading ---------------------------------------------------------------------------------

def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def _unsafe_detail(e: BaseException) -> str:
    """The part of torch's weights-only refusal that says what the file holds, without its
    advice on loading it unsafely or allowlisting globals."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    text = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    for cut in (" Please use", " was not an allowed global"):
        if cut in text:
            text = text.split(cut, 1)[0] + (" (not allowed)" if cut.startswith(" was") else "")
    return text.strip().rstrip(".")


def _check_archive(path: Path) -> None:
    """torch.save writes a zip archive: a cut-off one lacks its end record, a damaged one
    fails a member's CRC."""
    with open(path, "rb") as f:
        head = f.read(4)
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):
        if head == b"PK\x03\x04":
            raise CheckpointError(f"checkpoint {path} is truncated ({size} bytes, the end of the archive is "
                                  f"missing): the write was cut off or the copy is incomplete")
        raise CheckpointError(f"checkpoint {path} is not a valid eqprop checkpoint (not a torch archive)")
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: {_first_line(e)}") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: its part {bad!r} fails its checksum")


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read and check a checkpoint; every failure is a CheckpointError naming the file.

    Load on the CPU (the default) and move to the device afterwards: the numpy RNG state and
    the position must stay on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
    _check_archive(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # every reader failure becomes one message
        if "Weights only load failed" in str(e) or "WeightsUnpickler" in str(e):
            raise CheckpointError(f"checkpoint {path} is not a valid eqprop checkpoint or comes from an untrusted "
                                  f"source: it holds objects other than tensors and plain values "
                                  f"({_unsafe_detail(e)}); it was not loaded") from None
        raise CheckpointError(f"checkpoint {path} cannot be read (corrupt): {_first_line(e)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not an eqprop training checkpoint (format "
                              f"{ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__!r}, "
                              f"expected {FORMAT!r})")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}")
    _check_structure(ckpt, path)
    return ckpt


def _check_structure(ckpt: dict, path: Path) -> None:
    """The parts a hand-edited checkpoint may have broken, named by key."""
    def bad(key: str, what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {key!r} {what}; the file was edited or is damaged")

    if not isinstance(ckpt["config"], dict):
        raise bad("config", "is not a mapping of settings")
    if not isinstance(ckpt["model"], dict) or not all(isinstance(v, torch.Tensor) for v in ckpt["model"].values()):
        raise bad("model", "is not a mapping of parameter names to tensors")
    for key in ("optimizer", "scheduler", "rng"):
        if not isinstance(ckpt[key], dict):
            raise bad(key, "is not a mapping")
    pos = ckpt["position"]
    if not isinstance(pos, dict) or set(pos) != {"epoch", "step"}:
        raise bad("position", f"must be {{'epoch': E, 'step': S}}, got {pos!r}")
    for k, v in pos.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise bad(f"position.{k}", f"must be an integer >= 0, got {v!r}")
    rng = ckpt["rng"]
    for k in ("torch", "python", "numpy"):
        if k not in rng:
            raise bad(f"rng.{k}", "is missing")
    if not isinstance(rng["torch"], torch.Tensor) or rng["torch"].dtype != torch.uint8:
        raise bad("rng.torch", "is not a byte tensor")
    n = rng["numpy"]
    if not isinstance(n, dict) or not {"kind", "keys", "pos", "has_gauss", "gauss"} <= set(n) \
            or not isinstance(n["keys"], torch.Tensor):
        raise bad("rng.numpy", "is not a numpy RNG state")
    cuda = rng.get("cuda")
    if cuda is not None and (not isinstance(cuda, (list, tuple)) or
                             not all(isinstance(s, torch.Tensor) for s in cuda)):
        raise bad("rng.cuda", "is not a list of byte tensors")
    partial = ckpt.get("partial")
    if partial is not None and not isinstance(partial, torch.Tensor):
        raise bad("partial", "is not a tensor")
    devices = ckpt.get("devices")
    if devices is not None and not (isinstance(devices, dict) and all(isinstance(v, dict) for v in devices.values())):
        raise bad("devices", "is not a mapping of block names to device states")


def load_latest(path: str | os.PathLike, echo=print) -> tuple[dict, Path]:
    """(checkpoint, the file it came from): `path`, or the previous checkpoint kept beside it
    when `path` is damaged or missing, saying so through `echo`."""
    path = Path(path)
    prev = previous_path(path)
    try:
        return load(path), path
    except CheckpointError as newer:
        if not prev.is_file():
            raise
        try:
            state = load(prev)
        except CheckpointError as older:
            raise CheckpointError(f"{newer}; the previous checkpoint cannot be used either: {older}") from None
        pos = state["position"]
        where = f"epoch {pos['epoch'] + 1}, step {pos['step']}" if pos["step"] else f"the end of epoch {pos['epoch']}"
        echo(f"warning: {newer}; resuming from the previous checkpoint {prev} instead ({where})")
        return state, prev


def load_model_state(model: nn.Module, state: dict, path: str | os.PathLike) -> None:
    """model.load_state_dict(strict) with an error that names the file and the mismatch."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = "; ".join(lines[1:4]) if len(lines) > 1 else lines[0]
        raise CheckpointError(f"checkpoint {path} was written for a different architecture than the "
                              f"configured model: {detail}") from None


# ---- RNG states ------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """Every RNG the training loop may draw from, as tensors and plain values."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _to_plain(random.getstate())}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], path: str | os.PathLike = "checkpoint") -> None:
    """Restore the RNG states (from tensors on any device). CUDA states are restored for the
    devices visible now: a checkpoint written with more GPUs restores the first ones, one
    written with fewer leaves the others as seeded; without CUDA they are ignored."""
    try:
        torch.set_rng_state(state["torch"].cpu())
        random.setstate(_to_tuple(state["python"]))
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].cpu().numpy().astype(np.uint32), int(n["pos"]),
                             int(n["has_gauss"]), float(n["gauss"])))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path}: the saved RNG state cannot be restored ({_first_line(e)}); "
                              f"the file was edited or is damaged") from None
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        for index, s in enumerate(list(cuda)[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), index)


def _to_plain(x):
    return [_to_plain(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x


# ---- analog devices ----------------------------------------------------------------------------

def device_rng_state(model: nn.Module) -> dict[str, dict]:
    """The random state of the model's analog devices (eqprop.devices.device_state): what a
    checkpoint stores under 'devices'."""
    return device_state(model)


def restore_device_state(model: nn.Module, ckpt: dict, path: str | os.PathLike = "checkpoint") -> list[str]:
    """Restore a checkpoint's device state into `model`; the notes to show (blocks whose device
    changed or has no saved state). A checkpoint from before device states were saved loads
    with one note when the model has noisy devices: their draws restart from their seeds."""
    saved = ckpt.get("devices")
    if saved is None:
        names = sorted(n or "model" for n, m in model.named_modules() if m in device_blocks(model))
        if not names:
            return []
        return [f"note: checkpoint {path} holds no device state (written before it was saved): the device noise "
                f"of {', '.join(names)} will restart from their seeds, so this run will not repeat an "
                f"uninterrupted one draw for draw"]
    try:
        notes = load_device_state(model, saved)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: {e}; the file was edited or is damaged") from None
    return [f"note: checkpoint {path}: {n}" for n in notes]
