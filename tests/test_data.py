"""Dataset readers (small files written in each real format), the .ts parser, DeviceLoader, CLI."""
from __future__ import annotations

import gzip
import io
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eqprop.data import (
    Dataset,
    DatasetError,
    DatasetNotFound,
    DeviceLoader,
    crop_flip,
    load_dataset,
    read_ts,
    resolve_data_dir,
    sequences,
)
from eqprop.data import cli as data_cli
from eqprop.data import datasets as data_datasets

rng = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _no_system_fashion(monkeypatch, tmp_path):
    """Tests see only the files they write (Debian's Fashion-MNIST is tested separately)."""
    monkeypatch.setattr(data_datasets, "FASHION_SYSTEM_DIR", tmp_path / "no-system-fashion")
    data_datasets.clear_stats_cache()


# ------------------------------------------------------------------ writers in the real formats

def write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    raw = header + arr.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def write_mnist_like(directory: Path, n_train=12, n_test=5, gz=True, side=28):
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        ext = ".gz" if gz else ""
        write_idx(directory / f"{prefix}-images-idx3-ubyte{ext}", x)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{ext}", y)
        out[prefix] = (x, y)
    return out


def write_pickle(path: Path, obj, protocol=2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def rows(n):
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


def image_stats(x: np.ndarray):
    v = x.astype(np.float64) / 255
    return v.mean(axis=(0, 2, 3)), v.std(axis=(0, 2, 3))


# ------------------------------------------------------------------ data directory

def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EQPROP_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "x") == tmp_path / "x"
    assert resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("EQPROP_DATA")
    assert resolve_data_dir() == Path.home() / ".cache" / "eqprop"


# ------------------------------------------------------------------ idx

@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_roundtrip(tmp_path, gz):
    files = write_mnist_like(tmp_path / "mnist", gz=gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load_dataset("mnist", split, tmp_path)
        x, y = files[prefix]
        assert ds.x.dtype == torch.uint8 and ds.x.shape == (len(x), 1, 28, 28)
        assert torch.equal(ds.x[:, 0], torch.from_numpy(x)) and torch.equal(ds.y, torch.from_numpy(y.astype(np.int64)))
        assert ds.num_classes == 10 and ds.kind == "image" and ds.split == split
        mean, std = image_stats(files["train"][0][:, None])  # test split carries the train statistics
        np.testing.assert_allclose(ds.mean, mean, rtol=1e-12)
        np.testing.assert_allclose(ds.std, std, rtol=1e-10)


def test_fashion_default_search_then_system_dir(tmp_path, monkeypatch):
    system = tmp_path / "system"
    sys_files = write_mnist_like(system)
    monkeypatch.setattr(data_datasets, "FASHION_SYSTEM_DIR", system)
    (tmp_path / "root").mkdir()
    monkeypatch.setenv("EQPROP_DATA", str(tmp_path / "root"))
    ds = load_dataset("fashion_mnist", "train")  # no data_dir: $EQPROP_DATA, then the system copy
    assert ds.source == str(system) and torch.equal(ds.x[:, 0], torch.from_numpy(sys_files["train"][0]))
    own = write_mnist_like(tmp_path / "root" / "fashion_mnist", n_train=7)
    ds = load_dataset("fashion_mnist", "train")
    assert ds.source == str(tmp_path / "root" / "fashion_mnist") and len(ds) == 7
    assert torch.equal(ds.x[:, 0], torch.from_numpy(own["train"][0]))


def test_fashion_missing_names_both_places(tmp_path, monkeypatch):
    monkeypatch.setenv("EQPROP_DATA", str(tmp_path))
    with pytest.raises(DatasetNotFound) as e:
        load_dataset("fashion_mnist", "train")
    msg = str(e.value)
    assert str(tmp_path / "fashion_mnist" / "train-images-idx3-ubyte.gz") in msg
    assert "no-system-fashion" in msg and isinstance(e.value, FileNotFoundError)


def test_idx_errors(tmp_path):
    d = tmp_path / "mnist"
    write_mnist_like(d)
    img = d / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(img.read_bytes())
    img.write_bytes(img.read_bytes()[:-30])  # truncated gzip stream
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz.*truncated"):
        load_dataset("mnist", "train", tmp_path)
    img.write_bytes(gzip.compress(raw[:-10]))  # valid gzip, too little data
    with pytest.raises(DatasetError, match="needs"):
        load_dataset("mnist", "train", tmp_path)
    img.write_bytes(gzip.compress(b"\x00\x00\x07\x03" + raw[4:]))
    with pytest.raises(DatasetError, match="magic"):
        load_dataset("mnist", "train", tmp_path)
    write_idx(img, rng.integers(0, 256, (11, 28, 28), dtype=np.uint8))  # 11 images, 12 labels
    with pytest.raises(DatasetError, match="do not match"):
        load_dataset("mnist", "train", tmp_path)
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFound, match=str(d / "t10k-labels-idx1-ubyte.gz")):
        load_dataset("mnist", "test", tmp_path)


# ------------------------------------------------------------------ CIFAR, ImageNet32 pickles

def test_cifar10_roundtrip_and_layout(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    batches = [(rows(4), list(rng.integers(0, 10, 4))) for _ in range(6)]
    for i, (x, y) in enumerate(batches[:5], 1):
        write_pickle(d / f"data_batch_{i}", {b"batch_label": b"x", b"data": x, b"labels": y}, protocol=2 + i % 4)
    write_pickle(d / "test_batch", {b"data": batches[5][0], b"labels": batches[5][1]})
    ds = load_dataset("cifar10", "train", tmp_path)
    data = np.concatenate([b[0] for b in batches[:5]])
    assert ds.x.shape == (20, 3, 32, 32) and ds.x.dtype == torch.uint8
    assert ds.y.tolist() == sum((b[1] for b in batches[:5]), [])
    # channel-major rows: R plane, G plane, B plane, each row-major 32x32
    assert ds.x[3, 0, 0, 1] == data[3, 1] and ds.x[3, 1, 0, 0] == data[3, 1024]
    assert ds.x[3, 2, 1, 0] == data[3, 2048 + 32]
    np.testing.assert_allclose(ds.mean, image_stats(data.reshape(-1, 3, 32, 32))[0], rtol=1e-12)
    test = load_dataset("cifar10", "test", tmp_path)
    assert test.y.tolist() == batches[5][1] and test.mean == ds.mean and test.std == ds.std


def test_cifar100_fine_labels(tmp_path):
    d = tmp_path / "cifar-100-python"
    for split, n in (("train", 6), ("test", 3)):
        write_pickle(d / split, {b"filenames": [], b"data": rows(n), b"fine_labels": list(rng.integers(0, 100, n)),
                                 b"coarse_labels": [0] * n})
    ds = load_dataset("cifar100", "test", tmp_path)
    assert ds.num_classes == 100 and ds.x.shape == (3, 3, 32, 32) and ds.y.max() < 100


def test_pickle_errors(tmp_path):
    d = tmp_path / "cifar-100-python"
    write_pickle(d / "train", {b"data": rows(2), b"labels": [0, 1]})  # CIFAR-10 keys in a CIFAR-100 file
    with pytest.raises(DatasetError, match=r"train: missing keys \['fine_labels'\]"):
        load_dataset("cifar100", "train", tmp_path)
    write_pickle(d / "train", {b"data": rows(2), b"fine_labels": [0, 100]})
    with pytest.raises(DatasetError, match=r"train: label 100 at index 1 is outside 0..99 \(100 classes\)"):
        load_dataset("cifar100", "train", tmp_path)
    write_pickle(d / "train", {b"data": rows(2), b"fine_labels": [0]})
    with pytest.raises(DatasetError, match="2 images but 1 labels"):
        load_dataset("cifar100", "train", tmp_path)
    good = pickle.dumps({b"data": rows(2), b"fine_labels": [0, 1]}, protocol=2)
    (d / "train").write_bytes(good[: len(good) // 2])
    with pytest.raises(DatasetError, match="truncated"):
        load_dataset("cifar100", "train", tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    write_pickle(d / "train", {b"data": Evil(), b"fine_labels": []})
    with pytest.raises(DatasetError, match="refusing to unpickle: global .*print is not allowed"):
        load_dataset("cifar100", "train", tmp_path)


def test_imagenet32_pickle_and_npz(tmp_path):
    d = tmp_path / "imagenet32"
    labels = []
    for i in range(1, 11):
        y = list(rng.integers(1, 1001, 2))
        labels += y
        if i % 2:
            write_pickle(d / f"train_data_batch_{i}", {"data": rows(2), "labels": y, "mean": np.zeros(3072)},
                         protocol=4)
        else:
            np.savez(d / f"train_data_batch_{i}.npz", data=rows(2), labels=np.asarray(y), mean=np.zeros(3072))
    write_pickle(d / "val_data", {"data": rows(3), "labels": [1, 1000, 7]})
    ds = load_dataset("imagenet32", "train", tmp_path)
    assert ds.x.shape == (20, 3, 32, 32) and ds.num_classes == 1000 and ds.y.tolist() == [v - 1 for v in labels]
    assert load_dataset("imagenet32", "test", tmp_path).y.tolist() == [0, 999, 6]
    write_pickle(d / "val_data", {"data": rows(1), "labels": [0]})
    with pytest.raises(DatasetError, match="val_data: label 0 at index 0 is outside 1..1000"):
        load_dataset("imagenet32", "test", tmp_path)
    (d / "train_data_batch_4.npz").unlink()
    with pytest.raises(DatasetNotFound, match="train_data_batch_4"):
        load_dataset("imagenet32", "train", tmp_path)


# ------------------------------------------------------------------ SVHN .mat

def test_svhn_mat(tmp_path):
    import scipy.io

    d = tmp_path / "svhn"
    d.mkdir()
    X = rng.integers(0, 256, (32, 32, 3, 5), dtype=np.uint8)
    y = np.array([[10], [1], [9], [10], [3]], dtype=np.uint8)
    for split in ("train", "test"):
        scipy.io.savemat(d / f"{split}_32x32.mat", {"X": X, "y": y})
    ds = load_dataset("svhn", "test", tmp_path)
    assert ds.y.tolist() == [0, 1, 9, 0, 3] and ds.x.shape == (5, 3, 32, 32)
    assert ds.x[2, 1, 4, 7] == X[4, 7, 1, 2]  # X[h, w, c, n] -> x[n, c, h, w]
    scipy.io.savemat(d / "train_32x32.mat", {"X": X, "labels": y})
    with pytest.raises(DatasetError, match="train_32x32.mat: missing keys"):
        load_dataset("svhn", "train", tmp_path)
    raw = (d / "test_32x32.mat").read_bytes()
    (d / "test_32x32.mat").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError, match="test_32x32.mat"):
        load_dataset("svhn", "test", tmp_path)


# ------------------------------------------------------------------ .ts files

def ts_text(cases, labels=("a", "b"), equal=True, extra_header="", univariate=False):
    dims = len(cases[0][0])
    head = ["# comment", "@problemName Toy", "@timeStamps false", "@missing false",
            f"@univariate {'true' if univariate else 'false'}", f"@dimensions {dims}",
            f"@equalLength {'true' if equal else 'false'}"]
    if equal:
        head.append(f"@seriesLength {len(cases[0][0][0])}")
    head += [f"@classLabel true {' '.join(labels)}", extra_header, "@data"]
    body = [":".join(",".join(f"{v:g}" for v in dim) for dim in series) + f":{lab}" for series, lab in cases]
    return "\n".join(head + body) + "\n"


def write_uea(root: Path, name: str, train: str, test: str) -> None:
    d = root / "uea" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}_TRAIN.ts").write_text(train)
    (d / f"{name}_TEST.ts").write_text(test)


def random_cases(n, dims, lengths, labels):
    return [(rng.normal(size=(dims, L)).round(3), labels[i % len(labels)]) for i, L in enumerate(lengths[:n])]


def test_ts_equal_length(tmp_path):
    cases = random_cases(4, 3, [5] * 4, ["Standing", "Running"])
    write_uea(tmp_path, "BasicMotions", ts_text(cases, ("Standing", "Running")),
              ts_text(cases[:2], ("Standing", "Running")))
    ds = load_dataset("uea_basic_motions", "train", tmp_path)
    assert ds.x.shape == (4, 5, 3) and ds.x.dtype == torch.float32 and ds.kind == "sequence"
    assert ds.y.tolist() == [0, 1, 0, 1] and ds.num_classes == 2 and ds.class_names == ("Standing", "Running")
    np.testing.assert_allclose(ds.x[2].numpy(), cases[2][0].T, rtol=1e-6)
    flat = np.concatenate([c[0].T for c in cases])
    np.testing.assert_allclose(ds.mean, flat.mean(0), rtol=1e-6)
    np.testing.assert_allclose(ds.std, flat.std(0), rtol=1e-6)
    test = load_dataset("uea:BasicMotions", "test", tmp_path)
    assert test.x.shape == (2, 5, 3) and test.mean == ds.mean


@pytest.mark.parametrize("pad", ["edge", "zero"])
def test_ts_unequal_length_padding(tmp_path, pad):
    lens = [7, 3, 5]
    cases = random_cases(3, 2, lens, ["1", "2", "3"])
    text = ts_text(cases, ("1", "2", "3"), equal=False)
    write_uea(tmp_path, "JapaneseVowels", text, text)
    ds = load_dataset("uea_japanese_vowels", "train", tmp_path, pad=pad)
    assert ds.x.shape == (3, 7, 2) and ds.lengths.tolist() == lens and ds.y.tolist() == [0, 1, 2]
    np.testing.assert_allclose(ds.x[1, :3].numpy(), cases[1][0].T, rtol=1e-6)
    fill = cases[1][0].T[-1] if pad == "edge" else np.zeros(2)
    np.testing.assert_allclose(ds.x[1, 3:].numpy(), np.broadcast_to(fill, (4, 2)), rtol=1e-6)
    observed = np.concatenate([c[0].T for c in cases])  # statistics exclude the padding
    np.testing.assert_allclose(ds.mean, observed.mean(0), rtol=1e-6)


def test_ts_sktime_location_without_import(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "sktime"
    (pkg / "datasets" / "data" / "JapaneseVowels").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('sktime must not be imported')\n")
    cases = random_cases(2, 1, [4, 6], ["x", "y"])
    for split in ("TRAIN", "TEST"):
        (pkg / "datasets" / "data" / "JapaneseVowels" / f"JapaneseVowels_{split}.ts").write_text(
            ts_text(cases, ("x", "y"), equal=False, univariate=True))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    (tmp_path / "empty-root").mkdir()
    monkeypatch.setenv("EQPROP_DATA", str(tmp_path / "empty-root"))
    ds = load_dataset("uea_japanese_vowels", "test")  # the default search ends in sktime's files
    assert ds.x.shape == (2, 6, 1) and "sktime" in ds.source and "sktime" not in sys.modules
    with pytest.raises(DatasetNotFound, match="only place searched"):  # an explicit data_dir does not
        load_dataset("uea_japanese_vowels", "test", tmp_path / "empty-root")


def test_ts_missing_file_says_where(tmp_path):
    with pytest.raises(DatasetNotFound, match=str(tmp_path / "uea" / "Foo" / "Foo_TRAIN.ts")):
        load_dataset("uea:Foo", "train", tmp_path)


@pytest.mark.parametrize("body, error", [
    ("1,2,3:4,5:a", r"bad.ts:9: dimensions have different lengths \[3, 2\]"),
    ("1,2,3:4,5,6:c", r"bad.ts:9: label 'c' is not among the declared labels \['a', 'b'\]"),
    ("1,2,3:a", r"bad.ts:9: 1 dimensions, expected 2"),
    ("1,2,3:4,5,6:a\n1,2:3,4:b", r"bad.ts:10: series length 2, but @equalLength true with length 3"),
    ("1,?,3:4,5,6:a", r"bad.ts:9: missing value '\?' in dimension 0"),
    ("1,x,3:4,5,6:a", r"bad.ts:9: dimension 0 has a non-numeric value"),
])
def test_ts_bad_files(tmp_path, body, error):
    head = "@problemName Bad\n@univariate false\n@dimensions 2\n@equalLength true\n@seriesLength 3\n" \
           "@classLabel true a b\n@timeStamps false\n@data\n"
    path = tmp_path / "bad.ts"
    path.write_text(head + body + "\n")
    with pytest.raises(DatasetError, match=error):
        read_ts(path)


def test_ts_missing_as_nan_timestamps_and_header_errors(tmp_path):
    p = tmp_path / "t.ts"
    p.write_text("@classLabel true a\n@data\n1,?,3:a\n")
    assert np.isnan(read_ts(p, missing_values="nan").series[0][1, 0])
    p.write_text("@timeStamps true\n@classLabel true a\n@data\n(2020-01-01 00:00:00,1):a\n")
    with pytest.raises(DatasetError, match="t.ts:1: time-stamped"):
        read_ts(p)
    p.write_text("@classLabel true a\n1,2:a\n")
    with pytest.raises(DatasetError, match="t.ts:2: expected a header line"):
        read_ts(p)
    p.write_text("@classLabel true a\n")
    with pytest.raises(DatasetError, match="no @data"):
        read_ts(p)
    p.write_text("@targetLabel true\n@data\n1,2:0.5\n3,4:1.5\n")
    ts = read_ts(p)
    assert ts.class_names is None and ts.y.tolist() == [0.5, 1.5]


def test_uea_train_test_label_lists_must_agree(tmp_path):
    cases = random_cases(2, 1, [3, 3], ["a", "b"])
    write_uea(tmp_path, "Toy", ts_text(cases, ("a", "b")), ts_text(cases, ("b", "a")))
    with pytest.raises(DatasetError, match="differ from the train file"):
        load_dataset("uea:Toy", "test", tmp_path)


# ------------------------------------------------------------------ sequential Fashion-MNIST

def test_sequential_fashion(tmp_path):
    files = write_mnist_like(tmp_path / "fashion_mnist")
    x = files["train"][0]
    row = load_dataset("seq_fashion_mnist_row", "train", tmp_path)
    assert row.x.shape == (12, 28, 28) and row.x.dtype == torch.float32 and len(row.mean) == 28
    np.testing.assert_allclose(row.x[3].numpy(), x[3] / 255, rtol=1e-6)
    np.testing.assert_allclose(row.mean, (x / 255).mean(axis=(0, 1)), rtol=1e-6)
    pix = load_dataset("seq_fashion_mnist_pixel", "test", tmp_path, permute_seed=0)
    perm = torch.randperm(784, generator=torch.Generator().manual_seed(0)).numpy()
    assert pix.x.shape == (5, 784, 1) and len(pix.mean) == 1
    np.testing.assert_allclose(pix.x[2, :, 0].numpy(), files["t10k"][0][2].reshape(-1)[perm] / 255, rtol=1e-6)
    np.testing.assert_allclose(pix.mean, [(x / 255).mean()], rtol=1e-6)
    with pytest.raises(ValueError, match="does not take options"):
        load_dataset("fashion_mnist", "train", tmp_path, permute_seed=0)


def test_unknown_name_and_split(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cifar11'"):
        load_dataset("cifar11", "train", tmp_path)
    with pytest.raises(ValueError, match="split must be"):
        load_dataset("mnist", "val", tmp_path)


# ------------------------------------------------------------------ DeviceLoader

def image_dataset(n=50, c=3, side=32, name="cifar10"):
    x = torch.from_numpy(rng.integers(0, 256, (n, c, side, side), dtype=np.uint8))
    mean, std = image_stats(x.numpy())
    return Dataset(x=x, y=torch.arange(n), num_classes=n, mean=tuple(mean), std=tuple(std), name=name, kind="image")


def crop_flip_reference(img: np.ndarray, dy: int, dx: int, flip: bool, mode: str, pad=4) -> np.ndarray:
    padded = np.pad(img, ((0, 0), (pad, pad), (pad, pad)), mode="edge" if mode == "edge" else "constant")
    h, w = img.shape[1:]
    out = padded[:, pad + dy: pad + dy + h, pad + dx: pad + dx + w]
    return out[:, :, ::-1] if flip else out


@pytest.mark.parametrize("mode", ["edge", "zero"])
def test_crop_flip_matches_padded_crop(mode):
    x = torch.from_numpy(rng.integers(0, 256, (6, 2, 9, 7), dtype=np.uint8))
    shifts = torch.tensor([[-4, -4], [4, 4], [0, 0], [-2, 3], [1, -4], [3, 0]])
    flips = torch.tensor([False, True, True, False, True, False])
    out = crop_flip(x, shifts, flips, mode)
    for i in range(6):
        ref = crop_flip_reference(x[i].numpy(), *shifts[i].tolist(), bool(flips[i]), mode)
        assert np.array_equal(out[i].numpy(), ref), i


def test_loader_shapes_normalisation_and_test_order():
    ds = image_dataset(n=21, name="cifar10")
    loader = DeviceLoader(ds, 8, train=False, std_factor=3.0)
    assert not loader.augment and not loader.drop_last and len(loader) == 3
    batches = list(loader)
    assert [len(b[0]) for b in batches] == [8, 8, 5]
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (8, 3, 32, 32) and y.tolist() == list(range(8))
    mean = torch.tensor(ds.mean).view(1, 3, 1, 1)
    std = torch.tensor(ds.std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, ((ds.x[:8].double() / 255 - mean) / (3 * std)).float(), rtol=1e-5, atol=1e-5)
    xb, _ = next(iter(DeviceLoader(ds, 8, train=False, dtype=torch.bfloat16, memory_format=torch.channels_last)))
    assert xb.dtype == torch.bfloat16 and xb.is_contiguous(memory_format=torch.channels_last)


def test_loader_train_permutation_determinism_and_epochs():
    ds = image_dataset(n=40, name="mnist_like")
    a = DeviceLoader(ds, 16, train=True, seed=3, augment=False)
    assert len(a) == 2 and a.drop_last
    ys = lambda loader: torch.cat([y for _, y in loader])  # noqa: E731
    first = ys(a)
    assert len(first) == 32 and len(set(first.tolist())) == 32
    assert torch.equal(first, ys(DeviceLoader(ds, 16, train=True, seed=3, augment=False)))
    assert not torch.equal(first, ys(DeviceLoader(ds, 16, train=True, seed=4, augment=False)))
    a.set_epoch(1)
    second = ys(a)
    assert not torch.equal(first, second)
    a.set_epoch(0)
    assert torch.equal(first, ys(a))  # resumable: an epoch's order depends on (seed, epoch) only
    full = DeviceLoader(ds, 16, train=True, seed=3, augment=False, drop_last=False)
    assert sorted(ys(full).tolist()) == list(range(40))


def test_loader_augmentation_is_a_crop_flip_of_the_original():
    ds = image_dataset(n=12, name="cifar10")
    loader = DeviceLoader(ds, 12, train=True, std_factor=3.0, seed=1)
    assert loader.augment
    x, y = next(iter(loader))
    assert x.shape == (12, 3, 32, 32)
    mean, std = np.asarray(ds.mean)[:, None, None], np.asarray(ds.std)[:, None, None]
    flipped = 0
    for j in range(12):
        orig = ds.x[y[j]].numpy()
        found = [(dy, dx, f) for dy in range(-4, 5) for dx in range(-4, 5) for f in (False, True)
                 if np.allclose(x[j].numpy(), (crop_flip_reference(orig, dy, dx, f, "edge") / 255 - mean) / (3 * std),
                                atol=1e-5)]
        assert len(found) == 1, (j, found)  # random images: exactly one crop/flip explains the output
        flipped += found[0][2]
    assert 0 < flipped < 12
    again, _ = next(iter(DeviceLoader(ds, 12, train=True, std_factor=3.0, seed=1)))
    assert torch.equal(x, again)


@pytest.mark.parametrize("drop_last", [True, False])
def test_loader_sharding_concatenates_to_single_rank(drop_last):
    ds = image_dataset(n=45, name="cifar10")
    kw = dict(batch_size=8, train=True, seed=5, drop_last=drop_last)
    single = DeviceLoader(ds, **kw)
    ranks = [DeviceLoader(ds, rank=r, world_size=2, **kw) for r in range(2)]
    for epoch in (0, 1):
        for l in [single, *ranks]:
            l.set_epoch(epoch)
        ref = list(single)
        parts = [list(l) for l in ranks]
        assert len(ref) == len(parts[0]) == len(parts[1]) == (5 if drop_last else 6)
        for b, (x, y) in enumerate(ref):
            if b < 5:
                assert len(parts[0][b][1]) == len(parts[1][b][1]) == 4
            assert torch.equal(torch.cat([parts[0][b][0], parts[1][b][0]]), x)
            assert torch.equal(torch.cat([parts[0][b][1], parts[1][b][1]]), y)


def test_loader_limit_sequences_and_errors():
    ds = image_dataset(n=30, name="mnist_like")
    lim = DeviceLoader(ds, 4, train=True, limit=10, augment=False, drop_last=False)
    assert lim.num_examples == 10 and len(lim) == 3
    assert sorted(torch.cat([y for _, y in lim]).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="limit must be in 1..30"):
        DeviceLoader(ds, 4, train=True, limit=31)
    with pytest.raises(ValueError, match="not divisible by world_size 3"):
        DeviceLoader(ds, 8, train=True, world_size=3)
    with pytest.raises(ValueError, match="rank"):
        DeviceLoader(ds, 8, train=True, rank=2, world_size=2)
    seq = Dataset(x=torch.randn(9, 5, 3), y=torch.zeros(9, dtype=torch.long), num_classes=2,
                  mean=(1.0, 2.0, 3.0), std=(2.0, 4.0, 0.5), name="toy", kind="sequence")
    x, _ = next(iter(DeviceLoader(seq, 9, train=False)))
    torch.testing.assert_close(x, (seq.x - torch.tensor([1.0, 2.0, 3.0])) / torch.tensor([2.0, 4.0, 0.5]))
    with pytest.raises(ValueError, match="augmentation is for images"):
        DeviceLoader(seq, 3, train=True, augment=True)
    bad = Dataset(x=seq.x, y=seq.y, num_classes=2, mean=(0.0,) * 3, std=(1.0, 0.0, 1.0), name="toy", kind="sequence")
    with pytest.raises(ValueError, match=r"std is zero or invalid for channel/feature \[1\]"):
        DeviceLoader(bad, 3, train=False)


# ------------------------------------------------------------------ real Fashion-MNIST (Debian's package)

@pytest.mark.skipif(not (data_datasets.FASHION_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(data_datasets, "FASHION_SYSTEM_DIR", Path("/usr/share/datasets/fashion-mnist"))
    monkeypatch.setenv("EQPROP_DATA", str(tmp_path))  # the default search ends in the system copy
    train = load_dataset("fashion_mnist", "train")
    test = load_dataset("fashion_mnist", "test")
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    for ds in (train, test):
        assert ds.y.min() == 0 and ds.y.max() == 9 and torch.bincount(ds.y).tolist() == [len(ds) // 10] * 10
    assert 0.28 < train.mean[0] < 0.29 and 0.35 < train.std[0] < 0.36


def _sktime_has(problem: str) -> bool:
    d = sequences.sktime_data_dir()
    return d is not None and (d / problem / f"{problem}_TRAIN.ts").is_file()


@pytest.mark.skipif(not (_sktime_has("JapaneseVowels") and _sktime_has("BasicMotions")),
                    reason="the optional sktime extra is not installed")
def test_real_uea_from_sktime(tmp_path, monkeypatch):
    monkeypatch.setenv("EQPROP_DATA", str(tmp_path))  # the default search ends in sktime's files
    jv = load_dataset("uea_japanese_vowels", "train")
    jv_test = load_dataset("uea_japanese_vowels", "test")
    assert jv.x.shape[0] == 270 and jv.x.shape[2] == 12 and jv_test.x.shape[0] == 370
    assert jv.num_classes == 9 and torch.bincount(jv.y).tolist() == [30] * 9
    assert int(jv_test.lengths.min()) == 7 and int(jv_test.lengths.max()) == 29
    bm = load_dataset("uea_basic_motions", "test")
    assert bm.x.shape == (40, 100, 6) and bm.class_names == ("Standing", "Running", "Walking", "Badminton")


# ------------------------------------------------------------------ CLI

def test_cli_info(tmp_path, capsys):
    from eqprop.cli import main

    write_mnist_like(tmp_path / "mnist")
    assert main(["data", "info", "mnist", "--split", "test", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "(5, 1, 28, 28) uint8" in out and str(tmp_path / "mnist") in out
    assert main(["data", "info", "cifar10", "--data-dir", str(tmp_path)]) == 2
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in capsys.readouterr().err


def test_checksum_and_offline_fetch(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    f = tmp_path / "blob"
    f.write_bytes(b"abc")
    data_cli.verify_checksum(f, "900150983cd24fb0d6963f7d28e17f72")
    data_cli.verify_checksum(f, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "sha256")
    with pytest.raises(DatasetError, match="md5 is 9001.*expected 0000"):
        data_cli.verify_checksum(f, "0" * 32)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DatasetError, match="offline.*" + str(tmp_path / "svhn" / "train_32x32.mat")):
        data_cli.fetch("svhn", tmp_path)
    assert not list((tmp_path / "svhn").iterdir())  # no partial file left behind

    def corrupt(url, timeout):
        return io.BytesIO(b"not the file")

    monkeypatch.setattr(urllib.request, "urlopen", corrupt)
    with pytest.raises(DatasetError, match="corrupt"):
        data_cli.fetch("mnist", tmp_path)
    assert not list((tmp_path / "mnist").iterdir())


# ------------------------------------------------------------------ properties of the DDP sharding

def indexed_sequences(n: int) -> Dataset:
    """Example i is the constant sequence i with label i: every batch names the examples it holds."""
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1)
    return Dataset(x=x, y=torch.arange(n), num_classes=n, mean=(0.0,), std=(1.0,), name="indexed", kind="sequence")


def epoch_batches(ds: Dataset, world: int, epoch: int, **kw) -> list[list[list[int]]]:
    """batches[rank][b]: the example indices of batch b on `rank`, from fresh loaders."""
    out = []
    for rank in range(world):
        loader = DeviceLoader(ds, rank=rank, world_size=world, **kw)
        loader.set_epoch(epoch)
        batches = [y.tolist() for x, y in loader]
        assert all(x[:, 0, 0].tolist() == y.tolist() for x, y in loader)  # inputs travel with their labels
        assert len(batches) == len(loader)
        out.append(batches)
    return out


@settings(max_examples=50, deadline=None, database=None)
@given(n=st.integers(1, 150), per_rank=st.integers(1, 12), world=st.integers(1, 4), seed=st.integers(0, 10**6),
       epoch=st.integers(0, 1000), drop_last=st.booleans())
def test_property_ranks_shard_a_training_epoch(n, per_rank, world, seed, epoch, drop_last):
    """Training, for any size, global batch, world size, seed and epoch: the ranks' batches are
    disjoint, equal in number, cover the epoch (all examples, or all but the n mod B dropped with
    drop_last), each global batch is the ranks' slices in rank order, and the order depends on
    (seed, epoch) only."""
    batch, train = per_rank * world, True
    ds = indexed_sequences(n)
    kw = dict(batch_size=batch, train=train, seed=seed, drop_last=drop_last)
    ranks = epoch_batches(ds, world, epoch, **kw)
    full, rest = divmod(n, batch)
    count = full + (1 if rest and not drop_last else 0)
    assert [len(r) for r in ranks] == [count] * world  # the same number of batches on every rank
    seen = [i for r in ranks for b in r for i in b]
    assert len(seen) == len(set(seen))  # disjoint across ranks and batches
    assert len(seen) == (full * batch if drop_last else n) and set(seen) <= set(range(n))
    for b in range(count):
        sizes = [len(r[b]) for r in ranks]
        if b < full:
            assert sizes == [per_rank] * world
        else:  # the final partial batch, split as torch.tensor_split
            assert sizes == [len(p) for p in torch.tensor_split(torch.arange(rest), world)]
    single = epoch_batches(ds, 1, epoch, **kw)[0]
    assert [sum((r[b] for r in ranks), []) for b in range(count)] == single  # rank order = the 1-rank batch
    assert epoch_batches(ds, world, epoch, **kw) == ranks  # a function of (seed, epoch): reproducible
    loader = DeviceLoader(ds, rank=world - 1, world_size=world, **kw)
    loader.set_epoch(epoch + 1)
    list(loader)
    loader.set_epoch(epoch)
    assert [y.tolist() for _, y in loader] == ranks[-1]  # and resumable after another epoch
    if n >= 20 and count:
        assert epoch_batches(ds, 1, epoch + 1, **kw)[0] != single  # a new order each epoch
        assert epoch_batches(ds, 1, epoch, **{**kw, "seed": seed + 1})[0] != single  # and per seed


@settings(max_examples=150, deadline=None, database=None)
@given(n=st.integers(1, 120), batch=st.integers(1, 70), world=st.integers(1, 9), limit=st.integers(0, 120),
       drop_last=st.booleans())
def test_property_evaluation_shards_any_batch_over_any_world(n, batch, world, limit, drop_last):
    """Evaluation, for any test-set size (and limit), any batch size and any world size, with no
    divisibility required: the union of all ranks' examples is exactly the (limited) test set, each
    example once; the ranks hold contiguous blocks in rank order whose sizes differ by at most one;
    no batch is empty or larger than ceil(B/W); and the per-rank sums, reduced, equal the 1-rank
    sums with no NaN, a rank without examples contributing zero sums and a count of zero."""
    limit = min(limit, n) or None
    used = limit or n
    if drop_last:
        used -= used % batch
    ds = indexed_sequences(n)
    kw = dict(batch_size=batch, train=False, limit=limit, drop_last=drop_last)
    ranks = epoch_batches(ds, world, 0, **kw)
    flat = [[i for b in r for i in b] for r in ranks]
    assert sum(flat, []) == list(range(used))  # each example once, in dataset order across ranks
    assert max(map(len, flat)) - min(map(len, flat)) <= 1
    local = -(-batch // world)
    assert all(1 <= len(b) <= local for r in ranks for b in r)  # never an empty batch
    sums = []
    for rank in range(world):
        loader = DeviceLoader(ds, rank=rank, world_size=world, **kw)
        assert loader.shard == (sum(map(len, flat[:rank])), sum(map(len, flat[:rank + 1])))
        s = torch.zeros(2, dtype=torch.float64)  # (loss * n, n), accumulated as the trainer does per batch
        for x, y in loader:
            loss = (x.double() ** 2).mean()
            s += torch.stack([loss * len(y), torch.tensor(float(len(y)), dtype=torch.float64)])
        sums.append(s)
        if not flat[rank]:
            assert s.tolist() == [0.0, 0.0]
    total = torch.stack(sums).sum(0)  # the all-reduce
    assert torch.isfinite(total).all() and total[1] == used
    assert torch.allclose(total[0], (torch.arange(used, dtype=torch.float64) ** 2).sum())


def test_evaluation_batch_not_divisible_by_world_size():
    ds = indexed_sequences(10)
    loaders = [DeviceLoader(ds, 3, train=False, rank=r, world_size=4) for r in range(4)]
    assert [[y.tolist() for _, y in lo] for lo in loaders] == [[[0], [1], [2]], [[3], [4], [5]], [[6], [7]], [[8], [9]]]
    assert [len(lo) for lo in loaders] == [3, 3, 2, 2]
    tiny = [DeviceLoader(ds, 512, train=False, rank=r, world_size=16, limit=3) for r in range(16)]
    assert [len(lo) for lo in tiny] == [1, 1, 1] + [0] * 13 and not list(tiny[15])
    with pytest.raises(ValueError, match="training batch_size 3 is not divisible by world_size 4"):
        DeviceLoader(ds, 3, train=True, rank=0, world_size=4)


def test_loader_refuses_non_finite_inputs():
    x = torch.zeros(4, 3, 2)
    x[2, 1, 0] = float("nan")
    ds = Dataset(x=x, y=torch.zeros(4, dtype=torch.long), num_classes=2, mean=(0.0, 0.0), std=(1.0, 1.0),
                 name="toy", kind="sequence", split="test")
    with pytest.raises(ValueError, match=r"toy test: 1 example\(s\) hold NaN or infinite values \(the first: "
                                         r"example 2\); impute them when loading \(dataset option missing=mean"):
        DeviceLoader(ds, 2, train=False)
    assert len(DeviceLoader(ds, 2, train=False, limit=2)) == 1  # the first two examples are finite
    ds.x[2, 1, 0] = 0.0
    ds.mean = (0.0, float("inf"))
    with pytest.raises(ValueError, match=r"mean is not finite for channel/feature \[1\]"):
        DeviceLoader(ds, 2, train=False)


# ------------------------------------------------------------------ optional extras (eqprop.optional)

def hide(monkeypatch, *modules: str) -> None:
    """Make `import m` fail for each module, as if its package were not installed."""
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


def test_require_names_the_extra(monkeypatch):
    from eqprop.optional import available, package_version, require

    assert require("json", "none", "nothing") is sys.modules["json"] and available("json")
    hide(monkeypatch, "tqdm")
    with pytest.raises(ImportError, match=r"^tqdm is needed for progress bars: pip install 'eqprop\[progress\]'$"):
        require("tqdm", "progress", "progress bars")
    assert not available("surely_not_installed_pkg") and not available("surely_not_installed_pkg.sub")
    assert package_version("surely-not-installed-dist") == "0+unknown"
    import eqprop

    assert eqprop.__version__ == package_version() != "0+unknown"  # the installed metadata's version


def test_missing_extras_svhn_plot_tensorboard(tmp_path, monkeypatch):
    from eqprop.training.metrics import MetricsLogger, plot_curves

    hide(monkeypatch, "scipy", "scipy.io", "matplotlib", "matplotlib.pyplot", "tensorboard")
    (tmp_path / "svhn").mkdir()
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"")
    with pytest.raises(ImportError, match=r"scipy is needed .*SVHN.*eqprop\[svhn\]"):
        load_dataset("svhn", "test", tmp_path)
    with pytest.warns(UserWarning, match=r"eqprop\[tensorboard\].*metrics.jsonl only"):
        logger = MetricsLogger(tmp_path / "run", tensorboard=True)
    logger.log({"epoch": 1, "train_loss": 0.5, "train_top1": 80.0})
    logger.close()
    assert logger.writer is None and len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    with pytest.raises(ImportError, match=r"matplotlib is needed .*eqprop\[plot\]"):
        plot_curves(tmp_path / "run" / "metrics.jsonl", tmp_path / "run" / "curves.png")
