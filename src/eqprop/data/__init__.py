"""Datasets from their published file formats, and a device-resident batch loader.

    ds = load_dataset("cifar10", "train", root)          # uint8 (N, 3, 32, 32) + train mean/std
    loader = DeviceLoader(ds, 128, train=True, device="cuda", std_factor=default_std_factor("cifar10"))
    write_data_record(run_dir / "data_files.json", ds)    # the files read: path, size, head sha256
    for epoch in range(E):
        loader.set_epoch(epoch)
        for x, y in loader: ...
"""
from .datasets import (
    NAMES,
    DataLocation,
    Dataset,
    data_location,
    data_record,
    load_dataset,
    resolve_data_dir,
    write_data_record,
)
from .formats import DatasetError, DatasetNotFound
from .loader import DeviceLoader, crop_flip, default_std_factor
from .sequences import read_ts

__all__ = ["NAMES", "DataLocation", "Dataset", "DatasetError", "DatasetNotFound", "DeviceLoader", "crop_flip",
           "data_location", "data_record", "default_std_factor", "load_dataset", "read_ts", "resolve_data_dir",
           "write_data_record"]
