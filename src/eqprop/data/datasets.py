"""`load_dataset`: every supported dataset by name, as uint8 images or float32 sequences.

Data directory layout (``root`` = the data directory)::

    root/mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    root/fashion_mnist/...same...
    root/cifar-10-batches-py/{data_batch_1..5,test_batch}
    root/cifar-100-python/{train,test}
    root/svhn/{train,test}_32x32.mat
    root/imagenet32/{train_data_batch_1..10,val_data}[.npz]
    root/uea/<Name>/<Name>_{TRAIN,TEST}.ts

Where the files are looked for: an explicit ``root`` (``data_dir``, ``--data-dir``) is the only
place; without one, the root is ``$EQPROP_DATA`` (which must exist when set), else
``~/.cache/eqprop``, and two fallbacks follow it: Debian's Fashion-MNIST
(``/usr/share/datasets/fashion-mnist``, for the Fashion-MNIST sets) and the ``.ts`` files inside
the optional sktime wheel (for the UEA sets). The first folder holding either split's files
serves both splits.

Mean and std are always those of the *train* split (per channel for images, in 0..1 units;
per feature for sequences, over the observed steps only), so loading a test split reads the
train split once; the result is cached per process, keyed by (name, root, options) and checked
against the train files' sizes and head checksums. Loading the test split also checks it
against the train split: the same sample shape (images) or number of features (sequences),
and the same declared class labels.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import formats, sequences
from .formats import DatasetError, DatasetNotFound, missing

__all__ = ["FASHION_SYSTEM_DIR", "IMAGE_SETS", "LAYOUT", "MISSING_OPTIONS", "NAMES", "SEQUENCE_SETS", "DataLocation",
           "Dataset", "DatasetError", "DatasetNotFound", "clear_stats_cache", "data_location", "data_record",
           "load_dataset", "resolve_data_dir", "write_data_record"]

FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

IMAGE_SETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "imagenet32")
SEQUENCE_SETS = ("seq_fashion_mnist_row", "seq_fashion_mnist_pixel", "uea_japanese_vowels", "uea_basic_motions")
NAMES = IMAGE_SETS + SEQUENCE_SETS  # plus "uea:<Name>" for any .ts pair
MISSING_OPTIONS = ("error", *sequences.IMPUTE)  # the UEA sets' missing= option

_IDX = "{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz (or without .gz)"
LAYOUT = {  # the files a dataset needs, relative to the data directory
    "mnist": "mnist/" + _IDX,
    "fashion_mnist": "fashion_mnist/" + _IDX,
    "cifar10": "cifar-10-batches-py/{data_batch_1..5,test_batch}",
    "cifar100": "cifar-100-python/{train,test}",
    "svhn": "svhn/{train,test}_32x32.mat",
    "imagenet32": "imagenet32/{train_data_batch_1..10,val_data} (or .npz)",
}


def _layout(name: str) -> str:
    problem = sequences.uea_problem(name)
    if problem:
        return f"uea/{problem}/{problem}_{{TRAIN,TEST}}.ts"
    return LAYOUT["fashion_mnist" if name.startswith("seq_fashion_mnist_") else name]


@dataclass(frozen=True)
class DataLocation:
    """Where a dataset is looked for: ``root``, and whether it was given explicitly (then it is the
    only place searched) or comes from ``$EQPROP_DATA`` / ``~/.cache/eqprop`` (then the system
    Fashion-MNIST and sktime's bundled UEA files are fallbacks)."""

    root: Path
    explicit: bool
    origin: str  # "data_dir", "EQPROP_DATA" or "default"


def data_location(data_dir: str | os.PathLike | None = None) -> DataLocation:
    """The data directory and how it was chosen: ``data_dir`` if given (explicit), else
    ``$EQPROP_DATA``, else ``~/.cache/eqprop``."""
    if data_dir is not None and str(data_dir) != "":
        return DataLocation(Path(data_dir).expanduser(), True, "data_dir")
    env = os.environ.get("EQPROP_DATA")
    if env:
        return DataLocation(Path(env).expanduser(), False, "EQPROP_DATA")
    return DataLocation(Path("~/.cache/eqprop").expanduser(), False, "default")


def resolve_data_dir(path: str | os.PathLike | None = None) -> Path:
    """The data directory: ``path`` if given, else ``$EQPROP_DATA``, else ``~/.cache/eqprop``."""
    return data_location(path).root


def _check_location(loc: DataLocation, name: str) -> None:
    """An explicit data directory, or one named by $EQPROP_DATA, must be an existing folder."""
    if loc.origin == "default" or loc.root.is_dir():
        return
    what = "does not exist" if not loc.root.exists() else "is not a folder"
    given = f"data_dir {loc.root}" if loc.explicit else f"EQPROP_DATA={loc.root}"
    only = " (an explicit data_dir is the only place searched)" if loc.explicit else ""
    raise DatasetNotFound(f"{given} {what}{only}; {name} expects the files {loc.root / _layout(name)}")


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
    source: str = ""               # where the files were found (folder, or the .ts file)
    lengths: torch.Tensor | None = None  # int64 (N,) true lengths of padded sequences
    class_names: tuple[str, ...] | None = None
    split: str = "train"
    sources: list[dict] = field(default_factory=list)  # the files read: formats.file_record of each
    imputed: int = 0               # sequence values that were missing/non-finite and filled (missing=mean|zero)

    def __len__(self) -> int:
        return len(self.x)


def data_record(*datasets: Dataset) -> dict:
    """What a run should keep about its data: per dataset split, the name and the files actually
    read (absolute path, size in bytes, sha256 of the first 64 KiB). JSON-serialisable."""
    return {"datasets": [{"name": d.name, "split": d.split, "source": d.source, "examples": len(d),
                          "imputed": d.imputed, "files": [dict(f) for f in d.sources]} for d in datasets]}


def write_data_record(path: str | os.PathLike, *datasets: Dataset) -> Path:
    """Write :func:`data_record` of ``datasets`` as JSON to ``path`` atomically (a temporary file in
    the same folder, then a rename); returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data_record(*datasets), f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@dataclass
class _TrainInfo:
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None
    sample_shape: tuple[int, ...]
    files: list[dict]
    paths: list[str]
    folder: str  # where the train files were found
    fill: np.ndarray | None  # per-feature values that replace missing ones (missing=mean|zero)


_STATS_CACHE: dict[tuple, _TrainInfo] = {}
_OPTIONS = {"seq_fashion_mnist_row": {"permute_seed"}, "seq_fashion_mnist_pixel": {"permute_seed"}}
_UEA_OPTIONS = {"pad", "missing"}


def clear_stats_cache() -> None:
    """Forget the train-split statistics cached by :func:`load_dataset`."""
    _STATS_CACHE.clear()


def _hint(name: str, loc: DataLocation, subdir: str, names: tuple[str, ...]) -> str:
    """What to do about a missing file: for an explicit data_dir, that no other place is searched
    (and whether the files sit in the data_dir itself instead of its subfolder)."""
    if not loc.explicit:
        return (f"or pass --data-dir / set EQPROP_DATA to the directory holding it; "
                f"`eqprop data fetch {name}` downloads it when online")
    msg = f"data_dir {loc.root} is the only place searched, as it was given explicitly"
    stray = [n for n in names if (loc.root / n).is_file()]
    if stray:
        msg += f"; {loc.root} itself holds {stray[0]}: the files belong in {loc.root / subdir}"
    return msg


def _idx_names(prefix: str) -> tuple[str, ...]:
    return tuple(f"{prefix}-{k}-ubyte{e}" for k in ("images-idx3", "labels-idx1") for e in (".gz", ""))


def _fashion_dir(root: Path, split: str, loc: DataLocation, hint: str) -> Path:
    """The first folder holding Fashion-MNIST images of either split: both splits come from one folder."""
    prefix = {"train": "train", "test": "t10k"}[split]
    dirs = [root / "fashion_mnist"] + ([] if loc.explicit else [FASHION_SYSTEM_DIR])
    for d in dirs:
        if any((d / f"{p}-images-idx3-ubyte{ext}").is_file() for p in ("train", "t10k") for ext in (".gz", "")):
            return d
    extra = "" if loc.explicit else "; Debian's package dataset-fashion-mnist installs the second path"
    raise missing(f"Fashion-MNIST {split} images", [d / f"{prefix}-images-idx3-ubyte.gz" for d in dirs], hint + extra)


def _read_images(name: str, split: str, loc: DataLocation) -> tuple[np.ndarray, np.ndarray, str]:
    root = loc.root
    prefix = {"train": "train", "test": "t10k"}[split]
    if name in ("mnist", "fashion_mnist"):
        hint = _hint(name, loc, name, _idx_names(prefix))
        what = "MNIST" if name == "mnist" else "Fashion-MNIST"
        d = root / "mnist" if name == "mnist" else _fashion_dir(root, split, loc, hint)
        x, y = formats.read_idx_pair(d, split, what, hint, num_classes=10)
    elif name in ("cifar10", "cifar100"):
        k = 10 if name == "cifar10" else 100
        sub = "cifar-10-batches-py" if k == 10 else "cifar-100-python"
        d = root / sub
        first = ("data_batch_1" if split == "train" else "test_batch") if k == 10 else split
        x, y = formats.read_cifar(d, split, k, _hint(name, loc, sub, (first,)))
    elif name == "svhn":
        d = root / "svhn"
        x, y = formats.read_svhn(d, split, _hint(name, loc, "svhn", (f"{split}_32x32.mat",)))
    elif name == "imagenet32":
        d = root / "imagenet32"
        first = "train_data_batch_1" if split == "train" else "val_data"
        x, y = formats.read_imagenet32(d, split, _hint(name, loc, "imagenet32", (first, first + ".npz")))
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


def _shape_mismatch(fields: dict, train: _TrainInfo) -> str | None:
    """Why the test split cannot go with the train split (None when it can)."""
    def where(paths: list[str]) -> str:
        paths = [p for p in paths if "-labels-idx1-" not in Path(p).name] or paths  # the files holding samples
        return paths[0] + (f" and {len(paths) - 1} more" if len(paths) > 1 else "") if paths else "?"

    shape = tuple(fields["x"].shape[1:]) if fields["series"] is None else (fields["series"][0].shape[1],)
    if shape == train.sample_shape:
        return None
    if fields["series"] is not None:
        return (f"{where(fields['paths'])}: the test series have {shape[0]} dimensions per step but the train series "
                f"({where(train.paths)}) have {train.sample_shape[0]}")
    return (f"{where(fields['paths'])}: test samples have shape {shape} but the train samples "
            f"({where(train.paths)}) have {train.sample_shape}; both splits must have one sample shape")


def _read(name: str, split: str, loc: DataLocation, options: dict) -> dict:
    """Read one split's files; the fields of a Dataset except mean/std, the files read, and (sequences
    from .ts files) the raw cases, missing values as NaN."""
    with formats.recording() as paths:
        fields = _read_split(name, split, loc, options)
    fields["files"] = [formats.file_record(p) for p in paths]
    fields["paths"] = [str(p) for p in paths]  # as found, for messages
    fields["folder"] = str(paths[0].parent) if paths else fields["source"]
    return fields


def _finish(fields: dict, options: dict, train: _TrainInfo | None = None) -> dict:
    """Check a split read by `_read` against the train split's ``train`` info (the test split), impute
    missing sequence values (missing=mean|zero; the test split with the train split's fill values)
    and pad the cases."""
    if train is not None:
        why = _shape_mismatch(fields, train)
        if why:
            raise DatasetError(why)
    series = fields.pop("series")
    fields["fill"], fields["imputed"] = None, 0
    if series is not None:
        how = options.get("missing", "error")
        if how != "error":
            fill = train.fill if train is not None else _fill_values(series, how, fields["source"])
            series, fields["imputed"] = sequences.impute(series, fill)
            fields["fill"] = fill
        fields["x"], fields["lengths"] = sequences.pad_series(series, options.get("pad", "edge"))
    return fields


def _fill_values(series: list[np.ndarray], how: str, source: str) -> np.ndarray:
    if how == "zero":
        return np.zeros(series[0].shape[1])
    means = sequences.observed_means(series)
    empty = np.flatnonzero(np.isnan(means)).tolist()
    if empty:
        raise DatasetError(f"{source}: dimension(s) {empty} have no observed value in the train split; "
                           "missing=mean has no mean to fill in (use missing=zero)")
    return means


def _read_split(name: str, split: str, loc: DataLocation, options: dict) -> dict:
    if name in IMAGE_SETS:
        x, y, src = _read_images(name, split, loc)
        k = {"cifar100": 100, "imagenet32": 1000}.get(name, 10)
        return dict(x=x, y=y, num_classes=k, kind="image", source=src, lengths=None, class_names=None, series=None)
    if name.startswith("seq_fashion_mnist_"):
        mode = name.rsplit("_", 1)[1]
        x, y, src = _read_images("fashion_mnist", split, loc)
        x = sequences.image_to_sequence(x, mode, options.get("permute_seed"))
        return dict(x=x, y=y, num_classes=10, kind="sequence", source=src, lengths=None, class_names=None, series=None)
    problem = sequences.uea_problem(name)
    fname = f"{problem}_{split.upper()}.ts"
    hint = _hint(name, loc, f"uea/{problem}", (fname,))
    if not loc.explicit:
        hint += "; or install the optional extra eqprop[uea] (sktime), which ships some UEA sets"
    candidates = sequences.uea_candidates(problem, split, loc.root, bundled=not loc.explicit)
    other = "TEST" if split == "train" else "TRAIN"  # both splits come from the first folder holding either
    held = [p for p in candidates if p.is_file() or (p.parent / f"{problem}_{other}.ts").is_file()]
    path = formats.first_existing(held[:1] or candidates, f"UEA {problem} {split}", hint)
    ts = sequences.read_ts(path, "error" if options.get("missing", "error") == "error" else "nan")
    y = ts.y if ts.class_names is not None else ts.y.astype(np.float32).reshape(-1, 1)
    return dict(x=None, y=y, num_classes=len(ts.class_names or ()), kind="sequence", source=str(path), lengths=None,
                class_names=ts.class_names, series=ts.series)


def _train_info(fields: dict) -> _TrainInfo:
    if fields["kind"] == "image":
        mean, std = _image_stats(fields["x"])
    else:
        mean, std = _sequence_stats(fields["x"], fields["lengths"])
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):  # pragma: no cover - the readers refuse such values
        raise DatasetError(f"{fields['source']}: the train split's mean/std are not finite")
    shape = tuple(fields["x"].shape[1:]) if fields["lengths"] is None else (fields["x"].shape[2],)
    return _TrainInfo(mean, std, fields["class_names"], shape, fields["files"], fields["paths"],
                      fields["folder"], fields["fill"])


def _unchanged(files: list[dict]) -> bool:
    """Whether the cached train files still have the recorded size and head checksum."""
    try:
        return all(formats.file_record(Path(f["path"])) == f for f in files)
    except OSError:
        return False


def _check_options(name: str, uea: bool, options: dict) -> None:
    allowed = _UEA_OPTIONS if uea else _OPTIONS.get(name, set())
    unknown = set(options) - allowed
    if unknown:
        raise DatasetError(f"dataset {name!r} does not take options {sorted(unknown)} "
                         f"(allowed: {sorted(allowed) or 'none'})")
    if "missing" in options and options["missing"] not in MISSING_OPTIONS:
        if options["missing"] == "nan":
            raise DatasetError(f"dataset {name!r}: missing='nan' would leave NaN in the inputs, which cannot be "
                             "normalised or trained on; use missing='error' (the default: refuse such files), "
                             "'mean' (fill with the train split's per-dimension mean) or 'zero'")
        raise DatasetError(f"dataset {name!r}: missing must be one of {', '.join(MISSING_OPTIONS)}, "
                         f"got {options['missing']!r}")
    seed = options.get("permute_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise DatasetError(f"dataset {name!r}: permute_seed must be an integer or null, got {seed!r}")
    if "pad" in options and options["pad"] not in ("edge", "zero"):
        raise DatasetError(f"dataset {name!r}: pad must be 'edge' or 'zero', got {options['pad']!r}")


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None, **options) -> Dataset:
    """Load ``split`` ("train" or "test") of dataset ``name``.

    ``root``: the data directory. Given, it is the only place searched (a missing folder or file is
    a :class:`DatasetNotFound` naming it and the files expected there); None searches
    ``$EQPROP_DATA`` or ``~/.cache/eqprop``, then the system Fashion-MNIST and sktime's UEA files.

    Names: mnist, fashion_mnist, cifar10, cifar100, svhn, imagenet32 (uint8 images);
    seq_fashion_mnist_row (T=28, F=28), seq_fashion_mnist_pixel (T=784, F=1), both with option
    ``permute_seed=int`` for a fixed time permutation; uea_japanese_vowels, uea_basic_motions,
    ``uea:<Name>`` (options ``pad="edge"|"zero"`` for unequal lengths; ``missing="error"`` (default:
    a missing or non-finite value is an error naming the file and line), ``"mean"`` (fill it with the
    train split's per-dimension mean of the observed values) or ``"zero"``).
    Sequences are float32 in the file's units (Fashion-MNIST sequences in 0..1).
    ``Dataset.sources`` lists the files read (see :func:`data_record`).
    """
    if split not in ("train", "test"):
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    uea = sequences.uea_problem(name) is not None
    if name not in NAMES and not uea:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(NAMES)}, or uea:<Name>")
    if uea and not sequences.uea_problem(name):
        raise DatasetError(f"dataset {name!r}: empty UEA problem name")
    _check_options(name, uea, options)
    loc = data_location(root)
    _check_location(loc, name)

    key = (name, str(loc.root), loc.explicit, tuple(sorted((k, v) for k, v in options.items() if k != "permute_seed")))
    test = _read(name, "test", loc, options) if split == "test" else None  # its errors first
    train = _STATS_CACHE.get(key)
    if (split == "train" or train is None or not _unchanged(train.files)
            or (test is not None and test["folder"] != train.folder)):  # the train files of another folder
        fields = _finish(_read(name, "train", loc, options), options)
        train = _STATS_CACHE[key] = _train_info(fields)
    if test is not None:
        fields = _finish(test, options, train)
        if train.class_names != fields["class_names"]:
            raise DatasetError(f"{fields['source']}: declared labels {fields['class_names']} differ from "
                               f"the train file's {train.class_names}")
    lengths = fields["lengths"]
    return Dataset(
        x=torch.from_numpy(np.ascontiguousarray(fields["x"])),
        y=torch.from_numpy(np.ascontiguousarray(fields["y"])),
        num_classes=fields["num_classes"], mean=train.mean, std=train.std, name=name, kind=fields["kind"],
        source=fields["source"], lengths=None if lengths is None else torch.from_numpy(lengths),
        class_names=fields["class_names"], split=split, sources=fields["files"], imputed=fields["imputed"],
    )
