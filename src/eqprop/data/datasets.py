"""`load_dataset`: every supported dataset by name, as uint8 images or float32 sequences.

Data directory layout (``root`` = ``resolve_data_dir()``)::

    root/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    root/fashion_mnist/...same...        (else /usr/share/datasets/fashion-mnist, Debian's package)
    root/cifar-10-batches-py/{data_batch_1..5,test_batch}
    root/cifar-100-python/{train,test}
    root/svhn/{train,test}_32x32.mat
    root/imagenet32/{train_data_batch_1..10,val_data}[.npz]
    root/uea/<Name>/<Name>_{TRAIN,TEST}.ts  (else inside the optional sktime wheel)

Mean and std are always those of the *train* split (per channel for images, in 0..1 units;
per feature for sequences, over the observed steps only), so loading a test split reads the
train split once; the result is cached per process, keyed by (name, root, options).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import formats, sequences
from .formats import DatasetError, DatasetNotFound, missing

__all__ = ["FASHION_SYSTEM_DIR", "IMAGE_SETS", "NAMES", "SEQUENCE_SETS", "Dataset", "DatasetError", "DatasetNotFound",
           "clear_stats_cache", "load_dataset", "resolve_data_dir"]

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

IMAGE_SETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "imagenet32")
SEQUENCE_SETS = ("seq_fashion_mnist_row", "seq_fashion_mnist_pixel", "uea_japanese_vowels", "uea_basic_motions")
NAMES = IMAGE_SETS + SEQUENCE_SETS  # plus "uea:<Name>" for any .ts pair


def resolve_data_dir(path: str | os.PathLike | None = None) -> Path:
    """The data directory: ``path`` if given, else ``$EQPROP_DATA``, else ``~/.cache/eqprop``."""
    if path is None or str(path) == "":
        path = os.environ.get("EQPROP_DATA") or "~/.cache/eqprop"
    return Path(path).expanduser()


@dataclass
class Dataset:
    """One split of a dataset, held in memory (CPU)."""

    x: torch.Tensor                # images: uint8 (N, C, H, W); sequences: float32 (N, T, F)
    y: torch.Tensor                # int64 (N,) class indices; float32 (N, 1) for regression .ts files
    num_classes: int               # 0 for regression
    mean: tuple[float, ...]        # train-split mean per channel (images, 0..1 units) / per feature
    std: tuple[float, ...]
    name: str
    kind: str                      # "image" or "sequence"
    source: str = ""               # where the files were found
    lengths: torch.Tensor | None = None  # int64 (N,) true lengths of padded sequences
    class_names: tuple[str, ...] | None = None
    split: str = "train"

    def __len__(self) -> int:
        return len(self.x)


_STATS_CACHE: dict[tuple, tuple] = {}  # key -> (mean, std, train class names)
_OPTIONS = {"seq_fashion_mnist_row": {"permute_seed"}, "seq_fashion_mnist_pixel": {"permute_seed"}}
_UEA_OPTIONS = {"pad", "missing"}


def clear_stats_cache() -> None:
    """Forget the train-split statistics cached by :func:`load_dataset` (after the files changed)."""
    _STATS_CACHE.clear()


def _hint(name: str) -> str:
    return (f"or pass --data-dir / set EQPROP_DATA to the directory holding it; "
            f"`eqprop data fetch {name}` downloads it when online")


def _fashion_dir(root: Path, split: str) -> Path:
    prefix = {"train": "train", "test": "t10k"}[split]
    dirs = [root / "fashion_mnist", FASHION_SYSTEM_DIR]
    for d in dirs:
        if any((d / f"{prefix}-images-idx3-ubyte{ext}").is_file() for ext in (".gz", "")):
            return d
    raise missing(f"Fashion-MNIST {split} images", [d / f"{prefix}-images-idx3-ubyte.gz" for d in dirs],
                  _hint("fashion_mnist") + "; Debian's package dataset-fashion-mnist installs the second path")


def _read_images(name: str, split: str, root: Path) -> tuple[np.ndarray, np.ndarray, str]:
    hint = _hint(name)
    if name == "mnist":
        d = root / "mnist"
        x, y = formats.read_idx_pair(d, split, "MNIST", hint)
    elif name == "fashion_mnist":
        d = _fashion_dir(root, split)
        x, y = formats.read_idx_pair(d, split, "Fashion-MNIST", hint)
    elif name in ("cifar10", "cifar100"):
        k = 10 if name == "cifar10" else 100
        d = root / ("cifar-10-batches-py" if k == 10 else "cifar-100-python")
        x, y = formats.read_cifar(d, split, k, hint)
    elif name == "svhn":
        d = root / "svhn"
        x, y = formats.read_svhn(d, split, hint)
    elif name == "imagenet32":
        d = root / "imagenet32"
        x, y = formats.read_imagenet32(d, split, hint)
    else:  # pragma: no cover - guarded by load_dataset
        raise KeyError(name)
    return x, y, str(d)


def _image_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std (population) of uint8 images, in 0..1 units, in bounded memory."""
    t = torch.from_numpy(x)
    n, c = t.shape[:2]
    s = torch.zeros(c, dtype=torch.int64)
    sq = torch.zeros(c, dtype=torch.int64)
    for chunk in t.split(max(1, (1 << 24) // max(1, t[0].numel()))):
        v = chunk.reshape(len(chunk), c, -1).transpose(0, 1).reshape(c, -1).to(torch.int32)
        s += v.sum(1, dtype=torch.int64)
        sq += (v * v).sum(1, dtype=torch.int64)
    count = n * t[0, 0].numel()
    mean = s.double() / count
    var = sq.double() / count - mean**2
    return tuple((mean / 255).tolist()), tuple((var.clamp_min(0).sqrt() / 255).tolist())


def _sequence_stats(x: np.ndarray, lengths: np.ndarray | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-feature mean/std (population, float64) over all observed time steps (padding excluded)."""
    t = torch.from_numpy(x)
    if lengths is None:
        flat = t.reshape(-1, t.shape[-1])
    else:
        flat = t[torch.arange(t.shape[1])[None, :] < torch.from_numpy(lengths)[:, None]]
    chunks = flat.split(1 << 20)
    mean = sum(c.sum(0, dtype=torch.float64) for c in chunks) / len(flat)
    var = sum(((c.double() - mean) ** 2).sum(0) for c in chunks) / len(flat)
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())


def _read_uea(name: str, split: str, root: Path, pad: str, missing_values: str):
    problem = sequences.uea_problem(name)
    path = formats.first_existing(sequences.uea_candidates(problem, split, root), f"UEA {problem} {split}",
                                  "or install the optional extra eqprop[uea] (sktime), which ships some UEA sets")
    ts = sequences.read_ts(path, missing_values)
    x, lengths = sequences.pad_series(ts.series, pad)
    return x, ts.y, lengths, ts.class_names, str(path)


def _load(name: str, split: str, root: Path, options: dict) -> dict:
    """Read one split; returns the fields of a Dataset except mean/std."""
    if name in IMAGE_SETS:
        x, y, src = _read_images(name, split, root)
        k = {"cifar100": 100, "imagenet32": 1000}.get(name, 10)
        return dict(x=x, y=y, num_classes=k, kind="image", source=src, lengths=None, class_names=None)
    if name.startswith("seq_fashion_mnist_"):
        mode = name.rsplit("_", 1)[1]
        x, y, src = _read_images("fashion_mnist", split, root)
        x = sequences.image_to_sequence(x, mode, options.get("permute_seed"))
        return dict(x=x, y=y, num_classes=10, kind="sequence", source=src, lengths=None, class_names=None)
    pad, missing_values = options.get("pad", "edge"), options.get("missing", "error")
    x, y, lengths, names, src = _read_uea(name, split, root, pad, missing_values)
    if names is None:
        y = y.astype(np.float32).reshape(-1, 1)
    return dict(x=x, y=y, num_classes=len(names or ()), kind="sequence", source=src, lengths=lengths, class_names=names)


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None, **options) -> Dataset:
    """Load ``split`` ("train" or "test") of dataset ``name`` from the data directory ``root``.

    Names: mnist, fashion_mnist, cifar10, cifar100, svhn, imagenet32 (uint8 images);
    seq_fashion_mnist_row (T=28, F=28), seq_fashion_mnist_pixel (T=784, F=1), both with option
    ``permute_seed=int`` for a fixed time permutation; uea_japanese_vowels, uea_basic_motions,
    ``uea:<Name>`` (options ``pad="edge"|"zero"`` for unequal lengths, ``missing="error"|"nan"``).
    Sequences are float32 in the file's units (Fashion-MNIST sequences in 0..1).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    uea = sequences.uea_problem(name) is not None
    if name not in NAMES and not uea:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(NAMES)}, or uea:<Name>")
    if uea and not sequences.uea_problem(name):
        raise ValueError(f"dataset {name!r}: empty UEA problem name")
    allowed = _UEA_OPTIONS if uea else _OPTIONS.get(name, set())
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"dataset {name!r} does not take options {sorted(unknown)} "
                         f"(allowed: {sorted(allowed) or 'none'})")
    root = resolve_data_dir(root)
    fields = _load(name, split, root, options)

    key = (name, str(root), tuple(sorted((k, v) for k, v in options.items() if k != "permute_seed")))
    if key not in _STATS_CACHE or split == "train":
        train = fields if split == "train" else _load(name, "train", root, options)
        if train["kind"] == "image":
            mean, std = _image_stats(train["x"])
        else:
            mean, std = _sequence_stats(train["x"], train["lengths"])
        _STATS_CACHE[key] = (mean, std, train["class_names"])
    mean, std, train_names = _STATS_CACHE[key]
    if train_names != fields["class_names"]:
        raise DatasetError(f"{fields['source']}: declared labels {fields['class_names']} differ from "
                           f"the train file's {train_names}")
    lengths = fields["lengths"]
    return Dataset(
        x=torch.from_numpy(np.ascontiguousarray(fields["x"])),
        y=torch.from_numpy(np.ascontiguousarray(fields["y"])),
        num_classes=fields["num_classes"], mean=mean, std=std, name=name, kind=fields["kind"],
        source=fields["source"], lengths=None if lengths is None else torch.from_numpy(lengths),
        class_names=fields["class_names"], split=split,
    )


