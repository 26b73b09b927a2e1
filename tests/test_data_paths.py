"""Where data is looked for (an explicit data_dir is the only place), and the record of the files read."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from eqprop.data import DatasetNotFound, data_location, data_record, load_dataset, write_data_record
from eqprop.data import datasets as data_datasets


@pytest.fixture(autouse=True)
def system_fashion(monkeypatch, tmp_path, data_files) -> Path:
    """A stand-in for the system Fashion-MNIST that holds data, so that a fallback to it would succeed;
    $EQPROP_DATA unset and the home folder empty."""
    system = tmp_path / "system-fashion"
    data_files.mnist_like(system, n_train=9, n_test=4)
    monkeypatch.setattr(data_datasets, "FASHION_SYSTEM_DIR", system)
    monkeypatch.delenv("EQPROP_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data_datasets.clear_stats_cache()
    return system


def fake_sktime(tmp_path, monkeypatch, data_files, problem="BasicMotions"):
    """A package named sktime holding <problem>_{TRAIN,TEST}.ts where the sktime wheel keeps them."""
    pkg = tmp_path / "site" / "sktime"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    text = data_files.ts(["1,2,3:4,5,6:a", "2,3,4:5,6,7:b"])
    d = pkg / "datasets" / "data" / problem
    d.mkdir(parents=True)
    for split in ("TRAIN", "TEST"):
        (d / f"{problem}_{split}.ts").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


# ------------------------------------------------------------------ an explicit data_dir is exclusive

@pytest.mark.parametrize("name", ["fashion_mnist", "seq_fashion_mnist_row"])
def test_nonexistent_data_dir_is_an_error_not_the_system_copy(tmp_path, name):
    where = tmp_path / "no-such-folder"
    with pytest.raises(DatasetNotFound) as e:
        load_dataset(name, "train", where)
    msg = str(e.value)
    assert msg.startswith(f"data_dir {where} does not exist (an explicit data_dir is the only place searched)")
    assert str(where / "fashion_mnist" / "{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz") in msg
    assert "system-fashion" not in msg


def test_data_dir_without_the_data_names_only_itself(tmp_path):
    where = tmp_path / "empty"
    where.mkdir()
    for split, prefix in (("train", "train"), ("test", "t10k")):
        with pytest.raises(DatasetNotFound) as e:
            load_dataset("fashion_mnist", split, where)
        msg = str(e.value)
        assert str(where / "fashion_mnist" / f"{prefix}-images-idx3-ubyte.gz") in msg
        assert f"data_dir {where} is the only place searched" in msg and "system-fashion" not in msg


def test_data_dir_holding_the_files_directly_says_where_they_belong(tmp_path, data_files):
    data_files.mnist_like(tmp_path / "flat")
    with pytest.raises(DatasetNotFound, match=f"{tmp_path / 'flat'} itself holds train-images-idx3-ubyte.gz: "
                                              f"the files belong in {tmp_path / 'flat' / 'fashion_mnist'}"):
        load_dataset("fashion_mnist", "train", tmp_path / "flat")


def test_data_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(DatasetNotFound, match=f"data_dir {tmp_path / 'f'} is not a folder"):
        load_dataset("mnist", "test", tmp_path / "f")


def test_explicit_data_dir_does_not_fall_back_to_sktime(tmp_path, monkeypatch, data_files):
    fake_sktime(tmp_path, monkeypatch, data_files)
    (tmp_path / "root").mkdir()
    monkeypatch.setenv("EQPROP_DATA", str(tmp_path / "root"))
    assert "sktime" in load_dataset("uea_basic_motions", "train").source  # the default search finds it
    with pytest.raises(DatasetNotFound) as e:
        load_dataset("uea_basic_motions", "train", tmp_path / "root")
    msg = str(e.value)
    assert str(tmp_path / "root" / "uea" / "BasicMotions" / "BasicMotions_TRAIN.ts") in msg
    assert "sktime" not in msg and "only place searched" in msg


def test_explicit_data_dir_with_the_data_is_used(tmp_path, data_files):
    own = data_files.mnist_like(tmp_path / "mine" / "fashion_mnist", n_train=6, n_test=3)
    ds = load_dataset("fashion_mnist", "test", tmp_path / "mine")
    assert ds.source == str(tmp_path / "mine" / "fashion_mnist") and len(ds) == 3
    assert torch.equal(ds.x[:, 0], torch.from_numpy(own["t10k"][0]))


# ------------------------------------------------------------------ the default search order

def test_default_order(tmp_path, monkeypatch, data_files, system_fashion):
    home_cache = tmp_path / "home" / ".cache" / "eqprop"
    assert data_location() == data_datasets.DataLocation(home_cache, False, "default")
    assert load_dataset("fashion_mnist", "train").source == str(system_fashion)  # nothing in ~/.cache/eqprop
    data_files.mnist_like(home_cache / "fashion_mnist", n_train=5)
    assert load_dataset("fashion_mnist", "train").source == str(home_cache / "fashion_mnist")
    env = tmp_path / "env"
    env.mkdir()
    monkeypatch.setenv("EQPROP_DATA", str(env))  # replaces ~/.cache/eqprop; the system copy stays the fallback
    assert data_location() == data_datasets.DataLocation(env, False, "EQPROP_DATA")
    assert load_dataset("fashion_mnist", "train").source == str(system_fashion)
    with pytest.raises(DatasetNotFound, match="mnist/train-images"):  # no fallback for other sets
        load_dataset("mnist", "train")


def test_default_search_never_mixes_folders(tmp_path, monkeypatch, data_files, system_fashion):
    """Both splits (and the test split's train statistics) come from the first folder holding the set."""
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.setenv("EQPROP_DATA", str(root))
    from_system = load_dataset("fashion_mnist", "train")  # cached: the system copy's train statistics
    own = data_files.mnist_like(root / "fashion_mnist", n_train=7, n_test=3)
    test = load_dataset("fashion_mnist", "test")
    assert test.source == str(root / "fashion_mnist") and len(test) == 3
    assert test.mean == load_dataset("fashion_mnist", "train").mean != from_system.mean
    np_mean = own["train"][0].astype("float64").mean() / 255
    assert abs(test.mean[0] - np_mean) < 1e-12
    (root / "fashion_mnist" / "train-images-idx3-ubyte.gz").unlink()  # only the test images are left there
    with pytest.raises(DatasetNotFound) as e:
        load_dataset("fashion_mnist", "train")
    assert str(root / "fashion_mnist" / "train-images-idx3-ubyte.gz") in str(e.value)
    assert "system-fashion" not in str(e.value)


def test_eqprop_data_naming_a_missing_folder_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("EQPROP_DATA", str(tmp_path / "typo"))
    with pytest.raises(DatasetNotFound, match=f"EQPROP_DATA={tmp_path / 'typo'} does not exist; fashion_mnist "
                                              "expects the files"):
        load_dataset("fashion_mnist", "train")


# ------------------------------------------------------------------ the files read

def head_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()[:65536]).hexdigest()


def test_sources_list_the_files_read(tmp_path, data_files):
    d = tmp_path / "mnist"
    data_files.mnist_like(d, n_train=100, gz=False)  # 78,416-byte image file: the hash covers its first 64 KiB
    train = load_dataset("mnist", "train", tmp_path)
    test = load_dataset("mnist", "test", tmp_path)
    files = [d / "train-images-idx3-ubyte", d / "train-labels-idx1-ubyte"]
    assert train.sources == [{"path": str(p), "size": p.stat().st_size, "head_sha256": head_sha256(p)}
                             for p in files]
    assert train.sources[0]["size"] == 16 + 100 * 784 > 65536
    assert train.sources[0]["head_sha256"] != hashlib.sha256(files[0].read_bytes()).hexdigest()
    assert [f["path"] for f in test.sources] == [str(d / "t10k-images-idx3-ubyte"), str(d / "t10k-labels-idx1-ubyte")]


def test_sources_of_the_system_copy_cifar_and_ts(tmp_path, monkeypatch, data_files, system_fashion):
    (tmp_path / "root").mkdir()
    monkeypatch.setenv("EQPROP_DATA", str(tmp_path / "root"))
    seq = load_dataset("seq_fashion_mnist_pixel", "test")
    assert [Path(f["path"]).name for f in seq.sources] == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    assert all(Path(f["path"]).parent == system_fashion for f in seq.sources)
    data_files.cifar10(tmp_path / "root")
    cifar = load_dataset("cifar10", "train")
    assert [Path(f["path"]).name for f in cifar.sources] == [f"data_batch_{i}" for i in range(1, 6)]
    d = data_files.uea(tmp_path / "root", "Toy", data_files.ts(["1,2:3,4:a"]), data_files.ts(["5,6:7,8:b"]))
    toy = load_dataset("uea:Toy", "test")
    assert toy.sources == [{"path": str(d / "Toy_TEST.ts"), "size": (d / "Toy_TEST.ts").stat().st_size,
                            "head_sha256": head_sha256(d / "Toy_TEST.ts")}]


def test_data_record_is_written_atomically(tmp_path, data_files):
    data_files.mnist_like(tmp_path / "mnist")
    train, test = load_dataset("mnist", "train", tmp_path), load_dataset("mnist", "test", tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    path = write_data_record(run / "data_files.json", train, test)
    assert path == run / "data_files.json" and sorted(p.name for p in run.iterdir()) == ["data_files.json"]
    record = json.loads(path.read_text())
    assert record == data_record(train, test)
    assert [(d["name"], d["split"], d["examples"]) for d in record["datasets"]] == [("mnist", "train", 12),
                                                                                    ("mnist", "test", 5)]
    assert record["datasets"][1]["files"] == test.sources


def test_changed_train_files_are_reread(tmp_path, data_files):
    """The test split's normalisation comes from the train split; a cached one is checked against the files."""
    data_files.mnist_like(tmp_path / "mnist", n_train=8)
    first = load_dataset("mnist", "test", tmp_path)
    data_files.mnist_like(tmp_path / "mnist", n_train=8)  # new random train images, same sizes
    second = load_dataset("mnist", "test", tmp_path)
    assert second.mean == load_dataset("mnist", "train", tmp_path).mean != first.mean


def test_cli_info_prints_the_files_and_refuses_a_missing_data_dir(tmp_path, capsys, data_files):
    from eqprop.cli import main

    data_files.mnist_like(tmp_path / "mnist")
    assert main(["data", "info", "mnist", "--split", "test", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"file      {tmp_path / 'mnist' / 't10k-images-idx3-ubyte.gz'}" in out
    assert main(["data", "info", "fashion_mnist", "--data-dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"eqprop data info: data_dir {tmp_path / 'nope'} does not exist")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_train_cli_with_a_data_dir_without_the_data(tmp_path, capsys):
    """`eqprop train --data-dir EMPTY` stops naming the folder instead of training on the system copy."""
    from eqprop.cli import main

    (tmp_path / "empty").mkdir()
    rc = main(["train", "fmnist_cpu", "epochs=1", "progress=false", "tensorboard=false",
               "--data-dir", str(tmp_path / "empty"), "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc != 0 and str(tmp_path / "empty" / "fashion_mnist" / "train-images-idx3-ubyte.gz") in err
    assert "only place searched" in err and "Traceback" not in err
