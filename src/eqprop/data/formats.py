"""Readers for the published image-dataset file formats (our own code, no torchvision).

Every reader returns ``(x, y)`` as numpy arrays: ``x`` uint8 ``(N, C, H, W)``, ``y`` int64
``(N,)`` with 0-based labels, checked to lie in ``0..num_classes-1``. A missing file raises
:class:`DatasetNotFound`, a truncated or malformed one :class:`DatasetError`; both name the
file and say where it is expected. Inside :func:`recording`, every file a reader reads is
noted (see :func:`file_record`).
"""
from __future__ import annotations

import contextvars
import gzip
import hashlib
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..optional import require

__all__ = ["HEAD_BYTES", "DatasetError", "DatasetNotFound", "check_labels", "file_record", "first_existing", "missing",
           "note_read", "read_cifar", "read_idx", "read_idx_pair", "read_imagenet32", "read_pickle_dict", "read_svhn",
           "recording"]


class DatasetError(ValueError):
    """A dataset cannot be loaded as asked: a file is malformed, truncated or inconsistent with the
    other split, or a dataset name, split or option is unknown (the message names the file or setting)."""


class DatasetNotFound(DatasetError, FileNotFoundError):
    """A dataset file is missing (the message gives the exact path where it is expected)."""


def missing(what: str, expected: Path | list[Path], hint: str = "") -> DatasetNotFound:
    paths = expected if isinstance(expected, list) else [expected]
    where = " or ".join(str(p) for p in paths)
    msg = f"{what}: file not found; put it at {where}"
    return DatasetNotFound(msg + (f" ({hint})" if hint else ""))


# ---------------------------------------------------------------- which files were read

HEAD_BYTES = 1 << 16  # a file's fingerprint: sha256 of its first 64 KiB (the whole file when smaller)
_READ: contextvars.ContextVar[list[Path] | None] = contextvars.ContextVar("eqprop_data_read", default=None)


@contextmanager
def recording() -> Iterator[list[Path]]:
    """Collect the paths of the files the readers read inside the block (in reading order, no repeats)."""
    files: list[Path] = []
    token = _READ.set(files)
    try:
        yield files
    finally:
        _READ.reset(token)


def note_read(path: Path) -> None:
    """Note that ``path`` was read (a no-op outside :func:`recording`)."""
    files = _READ.get()
    if files is not None and Path(path) not in files:
        files.append(Path(path))


def file_record(path: Path) -> dict:
    """``{"path", "size", "head_sha256"}`` of a file: its absolute path, size in bytes, and the sha256
    of its first :data:`HEAD_BYTES` bytes (cheap even for multi-gigabyte files)."""
    path = Path(path).absolute()
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
        size = f.seek(0, 2)
    return {"path": str(path), "size": size, "head_sha256": hashlib.sha256(head).hexdigest()}


def check_labels(path: Path, labels: np.ndarray, num_classes: int, offset: int = 0) -> None:
    """Raise DatasetError naming ``path`` and the first offending value unless every label (as stored,
    ``offset``-based) lies in ``offset..offset+num_classes-1``."""
    lo, hi = offset, offset + num_classes - 1
    labels = np.asarray(labels).reshape(-1)
    bad = np.flatnonzero((labels < lo) | (labels > hi))
    if len(bad):
        i = int(bad[0])
        more = f" ({len(bad) - 1} more outside the range)" if len(bad) > 1 else ""
        raise DatasetError(f"{path}: label {labels[i]} at index {i} is outside {lo}..{hi} "
                           f"({num_classes} classes){more}")


def first_existing(candidates: list[Path], what: str, hint: str = "") -> Path:
    """The first path in ``candidates`` that exists, else a DatasetNotFound listing them all."""
    for p in candidates:
        if p.is_file():
            return p
    raise missing(what, candidates, hint)


# ---------------------------------------------------------------- idx (MNIST, Fashion-MNIST)

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (``.gz`` or plain): magic 0x0000TTNN, NN big-endian int32 sizes, data."""
    path = Path(path)
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise missing("idx file", path) from None
    except (OSError, EOFError) as e:  # truncated or not gzip
        raise DatasetError(f"{path}: cannot read idx file ({e}); the file is truncated or corrupt") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DatasetError(f"{path}: bad idx magic number {raw[:4].hex()} (expected 0x000008NN)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated idx header")
    shape = tuple(int(v) for v in np.frombuffer(raw, ">u4", ndim, 4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    need = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != need:
        raise DatasetError(f"{path}: idx data has {len(raw) - header} bytes, header {shape} needs {need}; "
                           "the file is truncated or corrupt")
    note_read(path)
    return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def read_idx_pair(directory: Path, split: str, what: str, hint: str = "",
                  num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """MNIST-style ``train-images-idx3-ubyte[.gz]`` / ``t10k-labels-idx1-ubyte[.gz]`` in ``directory``:
    uint8 images, integer labels in ``0..num_classes-1``."""
    prefix = {"train": "train", "test": "t10k"}[split]
    arrays, paths = [], []
    for kind, nd in (("images", 3), ("labels", 1)):
        base = directory / f"{prefix}-{kind}-idx{nd}-ubyte"
        path = first_existing([base.with_name(base.name + ".gz"), base], f"{what} {split} {kind}", hint)
        arrays.append(read_idx(path))
        paths.append(path)
    x, y = arrays
    if x.dtype != np.uint8:
        raise DatasetError(f"{paths[0]}: idx images are {x.dtype}, expected unsigned bytes (type code 0x08)")
    if y.dtype.kind not in "iu":
        raise DatasetError(f"{paths[1]}: idx labels are {y.dtype}, expected integers")
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DatasetError(f"{directory}: {what} {split} images {x.shape} and labels {y.shape} do not match")
    check_labels(paths[1], y, num_classes)
    return x[:, None].copy(), y.astype(np.int64)


# ---------------------------------------------------------------- pickles (CIFAR, ImageNet32)

_CORE = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
_ALLOWED = {  # the only globals a pickled dict of numpy arrays and lists needs
    "multiarray._reconstruct": _CORE.multiarray._reconstruct,
    "multiarray.scalar": _CORE.multiarray.scalar,
    "numeric._frombuffer": _CORE.numeric._frombuffer,
    "numpy.ndarray": np.ndarray,
    "numpy.dtype": np.dtype,
    "_codecs.encode": __import__("_codecs").encode,
}


class _Forbidden(pickle.UnpicklingError):
    pass


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and builtin containers: a data file cannot run code."""

    def find_class(self, module: str, name: str):
        key = f"{module.removeprefix('numpy.core.').removeprefix('numpy._core.')}.{name}"
        if key in _ALLOWED:
            return _ALLOWED[key]
        raise _Forbidden(f"global {module}.{name} is not allowed in a dataset file")


def read_pickle_dict(path: Path, keys: tuple[str, ...]) -> dict:
    """Load a pickled dict (Python 2 or 3 pickles; bytes keys decoded) and check it has ``keys``."""
    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise missing("pickle batch", path) from None
    except _Forbidden as e:
        raise DatasetError(f"{path}: refusing to unpickle: {e} (only numpy arrays, lists and dicts are)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DatasetError(f"{path}: cannot unpickle ({type(e).__name__}: {e}); "
                           "the file is truncated or corrupt") from None
    note_read(path)
    if not isinstance(d, dict):
        raise DatasetError(f"{path}: expected a pickled dict, found {type(d).__name__}")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    absent = [k for k in keys if k not in d]
    if absent:
        raise DatasetError(f"{path}: missing keys {absent} (found {sorted(map(str, d))})")
    return d


def _rows_to_images(path: Path, data, labels, side: int, label_offset: int, num_classes: int):
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1) - label_offset
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * side * side:
        raise DatasetError(f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, {3 * side * side})")
    if len(labels) != len(data):
        raise DatasetError(f"{path}: {len(data)} images but {len(labels)} labels")
    check_labels(path, labels + label_offset, num_classes, label_offset)
    return data.reshape(-1, 3, side, side), labels


def read_cifar(directory: Path, split: str, num_classes: int, hint: str = "") -> tuple[np.ndarray, np.ndarray]:
    """CIFAR "python version": ``data_batch_1..5``/``test_batch`` (10) or ``train``/``test`` (100)."""
    if num_classes == 10:
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key = "labels"
    else:
        files, label_key = [split], "fine_labels"
    xs, ys = [], []
    for name in files:
        path = first_existing([directory / name], f"CIFAR-{num_classes} {split}", hint)
        d = read_pickle_dict(path, ("data", label_key))
        x, y = _rows_to_images(path, d["data"], d[label_key], 32, 0, num_classes)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def read_imagenet32(directory: Path, split: str, hint: str = "") -> tuple[np.ndarray, np.ndarray]:
    """Downsampled ImageNet 32x32: pickles ``train_data_batch_1..10`` / ``val_data`` (or ``.npz``)."""
    names = [f"train_data_batch_{i}" for i in range(1, 11)] if split == "train" else ["val_data"]
    xs, ys = [], []
    for name in names:
        path = first_existing([directory / name, directory / f"{name}.npz"], f"ImageNet32 {split}", hint)
        if path.suffix == ".npz":
            try:
                with np.load(path, allow_pickle=False) as z:
                    d = {k: z[k] for k in z.files}
            except (OSError, ValueError, EOFError) as e:
                raise DatasetError(f"{path}: cannot read npz ({e}); the file is truncated or corrupt") from None
            note_read(path)
            if "data" not in d or "labels" not in d:
                raise DatasetError(f"{path}: missing keys 'data'/'labels' (found {sorted(d)})")
        else:
            d = read_pickle_dict(path, ("data", "labels"))
        x, y = _rows_to_images(path, d["data"], d["labels"], 32, 1, 1000)
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


# ---------------------------------------------------------------- SVHN (.mat)

def read_svhn(directory: Path, split: str, hint: str = "") -> tuple[np.ndarray, np.ndarray]:
    """SVHN cropped digits ``{train,test}_32x32.mat``: X (32, 32, 3, N) uint8, y (N, 1) with 10 for digit 0.

    Needs scipy (the ``svhn`` extra) to read the MATLAB files."""
    path = first_existing([directory / f"{split}_32x32.mat"], f"SVHN {split}", hint)
    sio = require("scipy.io", "svhn", "reading SVHN's .mat files")
    try:
        m = sio.loadmat(path)
    except Exception as e:  # scipy raises assorted errors on truncated files
        raise DatasetError(f"{path}: cannot read .mat ({type(e).__name__}: {e}); "
                           "the file is truncated or corrupt") from None
    note_read(path)
    if "X" not in m or "y" not in m:
        raise DatasetError(f"{path}: missing keys 'X'/'y' (found {sorted(k for k in m if not k.startswith('__'))})")
    x, y = m["X"], np.asarray(m["y"], dtype=np.int64).reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise DatasetError(f"{path}: X is {x.dtype} {x.shape} and y has {len(y)} labels; "
                           "expected uint8 (32, 32, 3, N) and N labels")
    check_labels(path, y, 10, 1)
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y % 10
