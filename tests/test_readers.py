"""What every reader checks at load: label ranges, one sample shape for train and test, finite
sequence values (or an imputation that trains)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eqprop.data import DatasetError, DeviceLoader, load_dataset, read_ts
from eqprop.data import datasets as data_datasets


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setattr(data_datasets, "FASHION_SYSTEM_DIR", tmp_path / "no-system-fashion")
    data_datasets.clear_stats_cache()


# ------------------------------------------------------------------ label ranges

@pytest.mark.parametrize("bad", [10, 255])
def test_idx_label_out_of_range(tmp_path, data_files, bad):
    d = tmp_path / "fashion_mnist"
    data_files.mnist_like(d)
    labels = d / "t10k-labels-idx1-ubyte.gz"
    data_files.idx(labels, np.array([3, 9, bad, 0, bad]))
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion_mnist", "test", tmp_path)
    assert str(e.value) == f"{labels}: label {bad} at index 2 is outside 0..9 (10 classes) (1 more outside the range)"


def test_idx_label_out_of_range_in_data_info(tmp_path, data_files, capsys):
    from eqprop.cli import main

    d = tmp_path / "mnist"
    data_files.mnist_like(d)
    data_files.idx(d / "train-labels-idx1-ubyte.gz", np.array([10] + [1] * 11))
    assert main(["data", "info", "mnist", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == (f"eqprop data info: {d / 'train-labels-idx1-ubyte.gz'}: label 10 at index 0 is outside 0..9 "
                   "(10 classes)\n")


def test_idx_types(tmp_path, data_files):
    d = tmp_path / "mnist"
    data_files.mnist_like(d)
    data_files.idx(d / "train-labels-idx1-ubyte.gz", np.array([-1] + [1] * 11), type_code=0x09)
    with pytest.raises(DatasetError, match="label -1 at index 0 is outside 0..9"):
        load_dataset("mnist", "train", tmp_path)
    data_files.idx(d / "train-images-idx3-ubyte.gz", np.zeros((12, 28, 28)), type_code=0x0D)
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz: idx images are >f4, expected unsigned bytes"):
        load_dataset("mnist", "train", tmp_path)


def test_cifar_train_files_named_in_a_shape_mismatch(tmp_path, data_files, monkeypatch):
    data_files.cifar10(tmp_path)
    load_dataset("cifar10", "train", tmp_path)
    info = next(iter(data_datasets._STATS_CACHE.values()))
    monkeypatch.setattr(info, "sample_shape", (3, 28, 28))  # as if the train batches held 28x28 images
    d = tmp_path / "cifar-10-batches-py"
    with pytest.raises(DatasetError, match=f"^{d / 'test_batch'}: test samples have shape \\(3, 32, 32\\) but the "
                                           f"train samples \\({d / 'data_batch_1'} and 4 more\\) have"):
        load_dataset("cifar10", "test", tmp_path)


def test_cifar_label_out_of_range(tmp_path, data_files):
    data_files.cifar10(tmp_path, test_labels=[0, 10, 3])
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    with pytest.raises(DatasetError, match=f"^{path}: label 10 at index 1 is outside 0..9 \\(10 classes\\)$"):
        load_dataset("cifar10", "test", tmp_path)


def test_svhn_label_out_of_range(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    d = tmp_path / "svhn"
    d.mkdir()
    scipy_io.savemat(d / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[1], [0]])})
    with pytest.raises(DatasetError, match="test_32x32.mat: label 0 at index 1 is outside 1..10"):
        load_dataset("svhn", "test", tmp_path)


# ------------------------------------------------------------------ train and test shapes

@pytest.mark.parametrize("train_first", [True, False])
def test_test_images_of_another_size(tmp_path, data_files, train_first):
    d = tmp_path / "mnist"
    data_files.mnist_like(d, test_side=32)
    if train_first:  # the train statistics come from the cache
        load_dataset("mnist", "train", tmp_path)
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", "test", tmp_path)
    assert str(e.value) == (f"{d / 't10k-images-idx3-ubyte.gz'}: test samples have shape (1, 32, 32) but "
                            f"the train samples ({d / 'train-images-idx3-ubyte.gz'}) have (1, 28, 28); "
                            "both splits must have one sample shape")


def test_sequential_fashion_of_another_size(tmp_path, data_files):
    data_files.mnist_like(tmp_path / "fashion_mnist", test_side=20)
    with pytest.raises(DatasetError, match=r"test samples have shape \(20, 20\) but the train samples .* \(28, 28\)"):
        load_dataset("seq_fashion_mnist_row", "test", tmp_path)


def test_ts_test_file_with_other_dimensions(tmp_path, data_files):
    d = data_files.uea(tmp_path, "Toy", data_files.ts(["1,2:3,4:a", "1:2:b"]),
                       data_files.ts(["1,2:3,4:5,6:a"], dims=3))
    with pytest.raises(DatasetError) as e:
        load_dataset("uea:Toy", "test", tmp_path)
    assert str(e.value) == (f"{d / 'Toy_TEST.ts'}: the test series have 3 dimensions per step but the train series "
                            f"({d / 'Toy_TRAIN.ts'}) have 2")
    data_files.uea(tmp_path, "Toy", data_files.ts(["1,2:3,4:a", "1:2:b"]), data_files.ts(["1,2,7:3,4,8:a"]))
    assert load_dataset("uea:Toy", "test", tmp_path).x.shape == (1, 3, 2)  # lengths may differ


# ------------------------------------------------------------------ non-finite values in .ts files

@pytest.mark.parametrize("value, what", [
    ("NaN", "non-finite value 'NaN'"), ("nan", "non-finite value 'nan'"), ("inf", "non-finite value 'inf'"),
    ("-Infinity", "non-finite value '-Infinity'"), ("1e300", "value beyond float32's range '1e300'"),
    ("-3.5e38", "value beyond float32's range '-3.5e38'"), ("?", "missing value '?'"),
])
def test_ts_non_finite_values_are_refused(tmp_path, data_files, value, what):
    path = tmp_path / "bad.ts"
    path.write_text(data_files.ts(["1,2,3:4,5,6:a", f"1,2,3:4,{value},6:b"]))
    with pytest.raises(DatasetError) as e:
        read_ts(path)
    assert str(e.value) == (f"{path}:10: {what} in dimension 1 at step 1 "
                            "(the dataset option missing=mean or missing=zero imputes such values)")
    assert np.isnan(read_ts(path, "nan").series[1][1, 1])  # the raw reader can mark them NaN


def test_ts_non_finite_regression_target(tmp_path, data_files):
    path = tmp_path / "reg.ts"
    path.write_text(data_files.ts(["1,2:3,4:0.5", "1,2:3,4:inf"], labels=None))
    with pytest.raises(DatasetError, match=f"^{path}:10: target 'inf' is not a finite float32 number$"):
        read_ts(path)


def test_missing_nan_is_not_a_load_option(tmp_path):
    with pytest.raises(ValueError, match="missing='nan' would leave NaN in the inputs, which cannot be normalised"):
        load_dataset("uea:Toy", "train", tmp_path, missing="nan")
    with pytest.raises(ValueError, match="missing must be one of error, mean, zero, got 'drop'"):
        load_dataset("uea:Toy", "train", tmp_path, missing="drop")


def uea_with_gaps(data_files, root):
    train = data_files.ts(["1,NaN,3:10,20,30:a", "5,?,7,8:inf,40,1e300,60:b", "2,3:50,NaN:a"])
    test = data_files.ts(["?,1:-inf,2:b"])
    return data_files.uea(root, "Gaps", train, test)


@pytest.mark.parametrize("how", ["mean", "zero"])
def test_imputation_fills_finite_values(tmp_path, data_files, how):
    uea_with_gaps(data_files, tmp_path)
    train = load_dataset("uea:Gaps", "train", tmp_path, missing=how, pad="zero")
    test = load_dataset("uea:Gaps", "test", tmp_path, missing=how, pad="zero")
    observed = np.array([1, 3, 5, 7, 8, 2, 3.0]), np.array([10, 20, 30, 40, 60, 50.0])
    fill = [o.mean() for o in observed] if how == "mean" else [0.0, 0.0]
    assert train.imputed == 5 and test.imputed == 2
    np.testing.assert_allclose(train.x[0, 1].numpy(), [fill[0], 20])
    np.testing.assert_allclose(train.x[1, :, 1].numpy(), [fill[1], 40, fill[1], 60])
    np.testing.assert_allclose(test.x[0].numpy(), [[fill[0], fill[1]], [1, 2]])  # the train split's fill values
    values = [np.append(o, [fill[i]] * (9 - len(o))) for i, o in enumerate(observed)]  # stats include the fills
    np.testing.assert_allclose(train.mean, [v.mean() for v in values], rtol=1e-6)
    np.testing.assert_allclose(train.std, [v.std() for v in values], rtol=1e-6)
    assert test.mean == train.mean and test.std == train.std
    for ds in (train, test):
        x, _ = next(iter(DeviceLoader(ds, 8, train=False)))
        assert torch.isfinite(x).all()


def test_mean_imputation_needs_an_observed_value(tmp_path, data_files):
    d = data_files.uea(tmp_path, "Empty", data_files.ts(["1,2:?,NaN:a"]), data_files.ts(["1,2:3,4:a"]))
    with pytest.raises(DatasetError, match=f"^{d / 'Empty_TRAIN.ts'}: dimension\\(s\\) \\[1\\] have no observed "
                                           "value in the train split; missing=mean has no mean to fill in"):
        load_dataset("uea:Empty", "train", tmp_path, missing="mean")
    assert load_dataset("uea:Empty", "train", tmp_path, missing="zero").imputed == 2


def test_imputed_sequences_train(tmp_path, data_files):
    """A .ts pair with NaN, '?', inf and 1e300 trains to finite losses with missing=mean."""
    from eqprop.training.config import load_config
    from eqprop.training.trainer import Trainer

    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        label = "ab"[i % 2]
        dims = [rng.normal(i % 2, 1, 6).round(2).astype(str) for _ in range(2)]
        dims[i % 2][i % 6] = ["NaN", "?", "inf", "1e300"][i % 4]
        rows.append(":".join(",".join(d) for d in dims) + f":{label}")
    data_files.uea(tmp_path / "data", "Gaps", data_files.ts(rows), data_files.ts(rows[:8]))
    cfg = load_config("seq_basic_motions", [
        "dataset=uea:Gaps", "dataset_options={missing: mean}", f"data_dir={tmp_path / 'data'}",
        "model.hidden=4", "model.state_size=4", "model.n_blocks=1", "epochs=2", "batch_size=8", "eval_batch_size=8",
        "progress=false", "tensorboard=false", f"out_dir={tmp_path / 'run'}"])
    summary = Trainer(cfg, echo=lambda _m: None).fit()
    assert summary["status"] == "completed"
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(np.isfinite(m["train_loss"]) and np.isfinite(m["test_loss"]) for m in metrics)
