"""`eqprop data info NAME` and `eqprop data fetch NAME`.

``fetch`` downloads only when asked, from the datasets' official addresses, and keeps a file
only if its MD5 matches the published checksum. ImageNet32 needs an account on the ImageNet
site and the UEA sets come with the optional ``sktime`` extra; for those ``fetch`` says where
to put the files.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from .datasets import MISSING_OPTIONS, NAMES, load_dataset, resolve_data_dir
from .formats import DatasetError

__all__ = ["MANUAL", "SOURCES", "add_arguments", "download", "fetch", "file_digest", "run", "verify_checksum"]

_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_CIFAR = "https://www.cs.toronto.edu/~kriz/"
_SVHN = "http://ufldl.stanford.edu/housenumbers/"

IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz")


def _idx_sources(base: str, md5s: list[str]) -> list[tuple[str, str, str]]:
    """(url, file name, md5) of the four idx files of an MNIST-like set."""
    return [(base + f, f, md5) for f, md5 in zip(IDX_FILES, md5s)]


# name -> (subdirectory of the data dir, [(url, file name, md5)], archive to unpack into the data dir)
SOURCES: dict[str, tuple[str, list[tuple[str, str, str]], bool]] = {
    "mnist": ("mnist", _idx_sources(_MNIST, ["f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                                             "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"]),
              False),
    "fashion_mnist": ("fashion_mnist", _idx_sources(_FASHION, [
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
        "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"]), False),
    "cifar10": (".", [(_CIFAR + "cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
                       "c58f30108f718f92721af3b95e74349a")], True),
    "cifar100": (".", [(_CIFAR + "cifar-100-python.tar.gz", "cifar-100-python.tar.gz",
                        "eb9058c3a382ffc7106e4002c42a8d85")], True),
    "svhn": ("svhn", [(_SVHN + "train_32x32.mat", "train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
                      (_SVHN + "test_32x32.mat", "test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3")], False),
}
SOURCES["seq_fashion_mnist_row"] = SOURCES["seq_fashion_mnist_pixel"] = SOURCES["fashion_mnist"]

MANUAL = {
    "imagenet32": "ImageNet32 needs an account on the ImageNet site (download 'Imagenet32_train' and "
                  "'Imagenet32_val', pickle version); unpack train_data_batch_1..10 and val_data "
                  "into {root}/imagenet32/",
    "uea": "UEA sets: install the optional extra eqprop[uea] (sktime ships JapaneseVowels and BasicMotions), "
           "or put <Name>_TRAIN.ts and <Name>_TEST.ts from the UEA archive into {root}/uea/<Name>/",
}


def file_digest(path: Path, algorithm: str = "md5") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_checksum(path: Path, expected: str, algorithm: str = "md5") -> None:
    """Raise DatasetError unless ``path``'s digest (md5 or sha256) equals ``expected``."""
    got = file_digest(path, algorithm)
    if got != expected.lower():
        raise DatasetError(f"{path}: {algorithm} is {got}, expected {expected}; the download is corrupt")


def download(url: str, dest: Path, md5: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (via ``dest.part``), keep it only if its MD5 is ``md5``."""
    if dest.is_file():
        verify_checksum(dest, md5)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(part, "wb") as f:
            for block in iter(lambda: r.read(1 << 20), b""):
                f.write(block)
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        raise DatasetError(f"could not download {url} ({e}); offline? "
                           f"Download it by hand and put it at {dest}") from None
    try:
        verify_checksum(part, md5)
    except DatasetError:
        part.unlink()
        raise
    os.replace(part, dest)
    return dest


def fetch(name: str, root: Path) -> list[Path]:
    """Download and verify dataset ``name`` into ``root``; returns the files written."""
    if name not in SOURCES:
        key = "uea" if name.startswith("uea") else name
        if key in MANUAL:
            raise DatasetError(MANUAL[key].format(root=root))
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(NAMES)}")
    sub, files, unpack = SOURCES[name]
    out = []
    for url, fname, md5 in files:
        path = download(url, root / sub / fname, md5)
        if unpack:
            with tarfile.open(path) as tar:
                tar.extractall(root, filter="data")
        out.append(path)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    for action, help_text in (("info", "load a dataset and print its shape, classes, mean/std and the files read"),
                              ("fetch", "download a dataset from its official address, verifying checksums")):
        p = sub.add_parser(action, help=help_text, description=help_text)
        p.add_argument("name", help=f"dataset: {', '.join(NAMES)}, or uea:<Name>")
        p.add_argument("--data-dir", default=None,
                       help="data directory, the only place searched when given (default: $EQPROP_DATA, else "
                            "~/.cache/eqprop, then the system Fashion-MNIST / sktime's UEA files)")
        if action == "info":
            p.add_argument("--split", default="train", choices=("train", "test"))
            p.add_argument("--permute-seed", type=int, default=None,
                           help="sequential Fashion-MNIST: permute time steps")
            p.add_argument("--missing", default=None, choices=MISSING_OPTIONS,
                           help="UEA sets: refuse missing/non-finite values (error, the default) or impute them")
            p.add_argument("--pad", default=None, choices=("edge", "zero"),
                           help="UEA sets: how series of unequal length are padded (default edge)")


def run(args: argparse.Namespace) -> int:
    """``eqprop data ...``; a data error is one line on stderr and exit status 2."""
    try:
        if args.action == "fetch":
            for path in fetch(args.name, resolve_data_dir(args.data_dir)):
                print(f"ok  {path}")
            return 0
        options = {k: v for k, v in (("permute_seed", args.permute_seed), ("missing", args.missing),
                                     ("pad", args.pad)) if v is not None}
        ds = load_dataset(args.name, args.split, args.data_dir, **options)
    except (DatasetError, ValueError) as e:
        print(f"eqprop data {args.action}: {e}", file=sys.stderr)
        return 2
    fmt = lambda v: "(" + ", ".join(f"{a:.4f}" for a in v) + ")"  # noqa: E731
    print(f"dataset   {ds.name} [{ds.split}] ({ds.kind})")
    print(f"x         {tuple(ds.x.shape)} {str(ds.x.dtype).replace('torch.', '')}")
    print(f"y         {tuple(ds.y.shape)} {str(ds.y.dtype).replace('torch.', '')}, {ds.num_classes} classes")
    if ds.lengths is not None:
        print(f"lengths   {int(ds.lengths.min())}..{int(ds.lengths.max())} (padded to {ds.x.shape[1]})")
    if ds.imputed:
        print(f"imputed   {ds.imputed} missing or non-finite value(s) (missing={options['missing']})")
    print(f"mean      {fmt(ds.mean)}  (train split{', 0..1 units' if ds.kind == 'image' else ''})")
    print(f"std       {fmt(ds.std)}")
    print(f"source    {ds.source}")
    for f in ds.sources:
        print(f"file      {f['path']}  {f['size']} bytes  sha256(first 64 KiB) {f['head_sha256'][:16]}")
    return 0
