"""Write a synthetic dataset in a real on-disk format, for runs on a machine without the data.

    python benchmarks/synthetic_data.py cifar10 DIR [--per-batch 1000] [--seed 0]

cifar10: DIR/cifar-10-batches-py/data_batch_1..5 and test_batch, the pickled batches of the
CIFAR-10 python release (dicts with b'data' (N, 3072) uint8 and b'labels'). Class k brightens
the k-th horizontal band of noisy images, so a few steps of training lower the loss.
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np

BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_cifar10(root: str | Path, per_batch: int, seed: int = 0) -> Path:
    """The six CIFAR-10 batch files under root/cifar-10-batches-py; returns that folder."""
    if per_batch < 1:
        raise ValueError(f"write_cifar10: per_batch must be >= 1, got {per_batch}")
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for name in BATCHES:
        labels = rng.integers(0, 10, per_batch)
        images = rng.integers(0, 120, (per_batch, 3, 32, 32), dtype=np.uint8)
        for k in range(10):
            rows = slice(3 * k, 3 * k + 3)
            images[labels == k, :, rows, :] += 120
        record = {b"batch_label": name.encode(), b"data": images.reshape(per_batch, 3072),
                  b"labels": [int(v) for v in labels]}
        (folder / name).write_bytes(pickle.dumps(record, protocol=2))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", choices=["cifar10"])
    ap.add_argument("root")
    ap.add_argument("--per-batch", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"wrote {write_cifar10(args.root, args.per_batch, args.seed)}")


if __name__ == "__main__":
    main()
