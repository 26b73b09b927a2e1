"""Sequence data: a reader for the UEA/UCR ``.ts`` format and image-to-sequence views.

``.ts`` files (as shipped by the UEA archive and inside the ``sktime`` wheel) have a header of
``@key value`` lines (``@problemName``, ``@timeStamps``, ``@missing``, ``@univariate``,
``@dimensions``, ``@equalLength``, ``@seriesLength``, ``@classLabel true <labels...>`` or
``@targetLabel true``), then ``@data`` and one case per line: the dimensions separated by
``:``, each a comma-separated list of values, the class label (or regression target) last.
``#`` starts a comment line. Time-stamped series (``@timeStamps true``) are not supported.

Every value must be a finite number that float32 can hold: a missing value ``?``, a literal
``NaN``/``inf`` or a number beyond float32's range (such as ``1e300``) is an error naming the file
and line, unless ``read_ts(..., missing_values="nan")`` is asked to return all of them as NaN
(what :func:`eqprop.data.load_dataset` does before imputing them with ``missing="mean"`` or
``missing="zero"``). Regression targets must be finite.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .formats import DatasetError, missing, note_read

__all__ = ["FLOAT32_MAX", "IMPUTE", "TsFile", "image_to_sequence", "impute", "observed_means", "pad_series", "read_ts",
           "sktime_data_dir", "uea_candidates", "uea_problem"]

FLOAT32_MAX = float(np.finfo(np.float32).max)
IMPUTE = ("mean", "zero")  # load_dataset's missing= options that fill missing/non-finite values
_IMPUTE_HINT = "the dataset option missing=mean or missing=zero imputes such values"


@dataclass
class TsFile:
    series: list[np.ndarray]      # one float64 array (length, dims) per case
    y: np.ndarray                 # int64 class indices (declared label order) or float64 targets
    class_names: tuple[str, ...] | None  # None for regression files
    header: dict[str, str]


def _bool(value: str, path: Path, lineno: int, key: str) -> bool:
    v = value.strip().lower()
    if v not in ("true", "false"):
        raise DatasetError(f"{path}:{lineno}: @{key} must be true or false, found {value!r}")
    return v == "true"


def read_ts(path: Path, missing_values: str = "error") -> TsFile:
    """Parse one ``.ts`` file; errors name the file and line."""
    path = Path(path)
    if missing_values not in ("error", "nan"):
        raise ValueError(f"read_ts: missing_values must be 'error' or 'nan', got {missing_values!r}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise missing(".ts file", path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from None
    header: dict[str, str] = {}
    class_names: tuple[str, ...] | None = None
    target = False
    data_start = None
    for lineno, line in enumerate(lines, 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if not s.startswith("@"):
            raise DatasetError(f"{path}:{lineno}: expected a header line '@key value' before @data, found {s[:40]!r}")
        key, _, value = s[1:].partition(" ")
        key = key.lower()
        if key == "data":
            data_start = lineno
            break
        header[key] = value.strip()
        if key == "timestamps" and _bool(value, path, lineno, key):
            raise DatasetError(f"{path}:{lineno}: time-stamped series (@timeStamps true) are not supported")
        if key == "classlabel":
            flag, *labels = value.split()
            if _bool(flag or "", path, lineno, key):
                if not labels:
                    raise DatasetError(f"{path}:{lineno}: @classLabel true declares no labels")
                class_names = tuple(labels)
        if key == "targetlabel":
            target = _bool(value, path, lineno, key)
    if data_start is None:
        raise DatasetError(f"{path}: no @data line; not a .ts file or truncated")
    if class_names is None and not target:
        raise DatasetError(f"{path}: header declares neither '@classLabel true <labels>' nor '@targetLabel true'")
    label_index = {name: i for i, name in enumerate(class_names or ())}
    declared_dims = int(header["dimensions"]) if "dimensions" in header else None
    equal = "equallength" in header and _bool(header["equallength"], path, 0, "equalLength")
    declared_len = int(header["serieslength"]) if equal and "serieslength" in header else None

    series, ys = [], []
    for lineno in range(data_start + 1, len(lines) + 1):
        s = lines[lineno - 1].strip()
        if not s or s.startswith("#"):
            continue
        *dims, label = s.split(":")
        if not dims:
            raise DatasetError(f"{path}:{lineno}: no ':' separating the series from the label")
        if declared_dims is None:
            declared_dims = len(dims)
        if len(dims) != declared_dims:
            raise DatasetError(f"{path}:{lineno}: {len(dims)} dimensions, expected {declared_dims}")
        values = []
        for d, part in enumerate(dims):
            items = [v.strip() for v in part.split(",")]
            if "?" in items:
                if missing_values == "error":
                    raise DatasetError(f"{path}:{lineno}: missing value '?' in dimension {d} at step "
                                       f"{items.index('?')} ({_IMPUTE_HINT})")
                items = ["nan" if v == "?" else v for v in items]
            try:
                v = np.asarray(items, dtype=np.float64)
            except ValueError:
                raise DatasetError(f"{path}:{lineno}: dimension {d} has a non-numeric value") from None
            bad = ~(np.abs(v) <= FLOAT32_MAX)  # NaN, inf, and what float32 would turn into inf
            if bad.any():
                if missing_values == "error":
                    i = int(np.flatnonzero(bad)[0])
                    what = "non-finite value" if not np.isfinite(v[i]) else "value beyond float32's range"
                    raise DatasetError(f"{path}:{lineno}: {what} {items[i]!r} in dimension {d} at step {i} "
                                       f"({_IMPUTE_HINT})")
                v[bad] = np.nan
            values.append(v)
        lengths = {len(v) for v in values}
        if len(lengths) != 1:
            raise DatasetError(f"{path}:{lineno}: dimensions have different lengths {[len(v) for v in values]}")
        length = lengths.pop()
        expected = declared_len if declared_len is not None else (len(series[0]) if series else length)
        if equal and length != expected:
            raise DatasetError(f"{path}:{lineno}: series length {length}, but @equalLength true with length {expected}")
        label = label.strip()
        if target:
            try:
                value = float(label)
            except ValueError:
                raise DatasetError(f"{path}:{lineno}: target {label!r} is not a number") from None
            if not abs(value) <= FLOAT32_MAX:
                raise DatasetError(f"{path}:{lineno}: target {label!r} is not a finite float32 number")
            ys.append(value)
        else:
            if label not in label_index:
                raise DatasetError(f"{path}:{lineno}: label {label!r} is not among the declared labels "
                                   f"{list(class_names)}")
            ys.append(label_index[label])
        series.append(np.stack(values, axis=1))
    if not series:
        raise DatasetError(f"{path}: no cases after @data")
    note_read(path)
    y = np.asarray(ys, dtype=np.float64 if target else np.int64)
    return TsFile(series, y, class_names, header)


def observed_means(series: list[np.ndarray]) -> np.ndarray:
    """Per-feature mean (float64) of the observed (non-NaN) values of all cases; NaN for a feature
    with no observed value."""
    flat = np.concatenate(series)
    observed = ~np.isnan(flat)
    count = observed.sum(0)
    total = np.where(observed, flat, 0.0).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def impute(series: list[np.ndarray], fill: np.ndarray) -> tuple[list[np.ndarray], int]:
    """Replace the NaNs of every case by ``fill`` (one value per feature); returns the cases and
    how many values were filled."""
    out, filled = [], 0
    for s in series:
        nan = np.isnan(s)
        if nan.any():
            s = np.where(nan, fill[None, :], s)
            filled += int(nan.sum())
        out.append(s)
    return out, filled


def pad_series(series: list[np.ndarray], pad: str = "edge") -> tuple[np.ndarray, np.ndarray]:
    """Stack cases of unequal length into float32 ``(N, T_max, F)`` and their int64 lengths.

    ``pad="edge"`` repeats each case's last observation to ``T_max`` (so a model reading the last
    step sees the last real input held constant); ``pad="zero"`` fills with zeros.
    """
    if pad not in ("edge", "zero"):
        raise ValueError(f"pad must be 'edge' or 'zero', got {pad!r}")
    lengths = np.asarray([len(s) for s in series], dtype=np.int64)
    out = np.zeros((len(series), int(lengths.max()), series[0].shape[1]), dtype=np.float32)
    for i, s in enumerate(series):
        out[i, : len(s)] = s
        if pad == "edge":
            out[i, len(s):] = s[-1]
    return out, lengths


def uea_problem(name: str) -> str | None:
    """``uea_japanese_vowels`` -> ``JapaneseVowels``, ``uea:Name`` -> ``Name``; None if not a UEA name."""
    if name.startswith("uea:"):
        return name[4:]
    if name.startswith("uea_"):
        return "".join(w.capitalize() for w in name[4:].split("_"))
    return None


def sktime_data_dir() -> Path | None:
    """Where the optional sktime wheel keeps its bundled ``.ts`` files (found without importing it)."""
    try:
        spec = importlib.util.find_spec("sktime")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def uea_candidates(problem: str, split: str, root: Path, bundled: bool = True) -> list[Path]:
    """Paths searched for ``<Problem>_TRAIN.ts`` / ``_TEST.ts``: the data dir, then (if ``bundled``)
    the files inside the optional sktime wheel."""
    fname = f"{problem}_{split.upper()}.ts"
    paths = [root / "uea" / problem / fname]
    shipped = sktime_data_dir() if bundled else None
    if shipped is not None:
        paths.append(shipped / problem / fname)
    return paths


def image_to_sequence(x: np.ndarray, mode: str, permute_seed: int | None = None) -> np.ndarray:
    """uint8 images ``(N, 1, H, W)`` -> float32 sequences in [0, 1]: rows ``(N, H, W)`` or pixels ``(N, H*W, 1)``.

    ``permute_seed`` applies one fixed random permutation of the time steps (the same for all
    examples and splits), drawn from ``torch.Generator().manual_seed(permute_seed)``.
    """
    import torch

    n, c, h, w = x.shape
    if c != 1:
        raise ValueError(f"sequence views need single-channel images, got {c} channels")
    seq = x.reshape(n, h, w) if mode == "row" else x.reshape(n, h * w, 1)
    if permute_seed is not None:
        perm = torch.randperm(seq.shape[1], generator=torch.Generator().manual_seed(int(permute_seed))).numpy()
        seq = seq[:, perm]
    return seq.astype(np.float32) / np.float32(255)
