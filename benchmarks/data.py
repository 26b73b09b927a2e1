"""Part `data`: the data pipeline's share of a training step (eqprop.data.DeviceLoader with
augmentation, on a synthetic CIFAR-shaped uint8 data set)."""
from __future__ import annotations

import torch

from .common import build, train_step, wall


def draw(loader, k: int) -> None:
    """Draw the first k batches of an epoch."""
    it = iter(loader)
    for _ in range(k):
        next(it)


def part_data(models, batches, div, device, repeats: int) -> list[dict]:
    """Per model and batch size: time to draw one batch, time of an ep step, and the share."""
    try:
        from eqprop.data import Dataset, DeviceLoader, default_std_factor
    except ImportError as e:
        print(f"data: skipped, eqprop.data.DeviceLoader is not available ({e})")
        return []
    rows = []
    for name in models:
        for n in batches:
            g = torch.Generator().manual_seed(0)
            num = max(64 * n, 2048)
            ds = Dataset(x=torch.randint(0, 256, (num, 3, 32, 32), dtype=torch.uint8, generator=g),
                         y=torch.randint(0, 10, (num,), generator=g), num_classes=10,
                         mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), name="cifar10", kind="image",
                         source="synthetic CIFAR-shaped uint8")
            loader = DeviceLoader(ds, n, train=True, device=device, std_factor=default_std_factor("cifar10"))
            k = min(len(loader), 50)
            t_data = min(wall(draw, loader, k, device=device) for _ in range(repeats + 1)) / k
            model = build(name, div, device)
            opt = torch.optim.Adam(model.parameters(), lr=1e-5)
            xb, yb = next(iter(loader))
            train_step(model, opt, xb, yb)
            t_step = min(wall(train_step, model, opt, xb, yb, device=device) for _ in range(repeats))
            rows.append({"model": name, "batch": n, "batch_s": t_data, "step_s": t_step,
                         "share": t_data / (t_data + t_step), "augment": loader.augment})
            print(f"data {name} b={n}: {t_data * 1e3:.2f} ms per batch, {100 * t_data / (t_data + t_step):.3f}% "
                  f"of a step", flush=True)
    return rows
