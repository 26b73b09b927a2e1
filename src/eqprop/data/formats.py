"""Readers for the published image-dataset file formats (our own code, no torchvision).

Every reader returns ``(x, y)`` as numpy arrays: ``x`` uint8 ``(N, C, H, W)``, ``y`` int64
``(N,)`` with 0-based labels. A missing file raises :class:`DatasetNotFound`, a truncated or
malformed one :class:`DatasetError`; both name the file and say where it is expected.
"""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from ..optional import require

__all__ = ["DatasetError", "DatasetNotFound", "first_existing", "missing", "read_cifar", "read_idx", "read_idx_pair",
           "read_imagenet32", "read_pickle_dict", "read_svhn"]


class DatasetError(ValueError):
    """A dataset file is malformed, truncated or inconsistent (the message names the file)."""


class DatasetNotFound(DatasetError, FileNotFoundError):
    """A dataset file is missing (the message gives the exact path where it is expected)."""


def missing(what: str, expected: Path | list[Path], hint: str = "") -> DatasetNotFound:
    paths = expected if isinstance(expected, list) else [expected]
    where = " or ".join(str(p) for p in paths)
    msg = f"{what}: file not found; put it at {where}"
    return DatasetNotFound(msg + (f" ({hint})" if hint else ""))


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
    return np.frombuffer(raw, dtype, offset=header).reshape(shape)


def read_idx_pair(directory: Path, split: str, what: str, hint: str = "") -> tuple[np.ndarray, np.ndarray]:
    """MNIST-style ``train-images-idx3-ubyte[.gz]`` / ``t10k-labels-idx1-ubyte[.gz]`` in ``directory``."""
    prefix = {"train": "train", "test": "t10k"}[split]
    arrays = []
    for kind, nd in (("images", 3), ("labels", 1)):
        base = directory / f"{prefix}-{kind}-idx{nd}-ubyte"
        path = first_existing([base.with_name(base.name + ".gz"), base], f"{what} {split} {kind}", hint)
        arrays.append(read_idx(path))
    x, y = arrays
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise DatasetError(f"{directory}: {what} {split} images {x.shape} and labels {y.shape} do not match")
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
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        lo, hi = label_offset, num_classes - 1 + label_offset
        raise DatasetError(f"{path}: labels outside {lo}..{hi} (found {labels.min() + lo}..{labels.max() + lo})")
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
    if "X" not in m or "y" not in m:
        raise DatasetError(f"{path}: missing keys 'X'/'y' (found {sorted(k for k in m if not k.startswith('__'))})")
    x, y = m["X"], np.asarray(m["y"], dtype=np.int64).reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
        raise DatasetError(f"{path}: X is {x.dtype} {x.shape} and y has {len(y)} labels; "
                           "expected uint8 (32, 32, 3, N) and N labels")
    if len(y) and (y.min() < 1 or y.max() > 10):
        raise DatasetError(f"{path}: labels outside 1..10 (found {y.min()}..{y.max()})")
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)), y % 10
