"""What backpropagation reaches on the feedforward twin of a conv config's network.

    python -m benchmarks.ff_twin fmnist_demo [KEY=VALUE ...] --out FILE.json
    python -m benchmarks.ff_twin --table FOLDER      # a markdown table of the FILE.json in FOLDER

The twin keeps every layer of the config's `model.kind: conv` network and its training recipe
(data, normalisation, optimizer, schedule, batch, epochs, seed) but replaces each energy-based
block by one feedforward pass through its layers: the first layer's units are
activation(input current), each next layer's activation(conv of the previous), which is the
first asynchronous sweep of the block from zero. Trained by plain backpropagation, it says how
much of a config's accuracy after a few epochs is the network's shape and recipe and how much is
the relaxation and its gradient estimator. It is a benchmark, not a model of the library.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from eqprop.activations import make_activation
from eqprop.data import DeviceLoader, default_std_factor, load_dataset
from eqprop.training.config import load_config
from eqprop.training.trainer import make_optimizer, make_scheduler


class Sweep(nn.Module):
    """An energy-based block's layers [c_1, ..., c_K] run once forward: s_1 = act(u),
    s_k = act(pool(conv(s_{k-1}))). Dense layers (`fc`) are not part of the twin."""

    def __init__(self, channels: list[int], pools: str, activation: str, slope: float):
        super().__init__()
        self.act = make_activation(activation, slope)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(channels, channels[1:]))
        self.pools = [p == "m" for p in pools]

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        s = self.act(u.clone())  # the activation clamps in place
        for conv, pool in zip(self.convs, self.pools):
            z = conv(s)
            s = self.act(nn.functional.max_pool2d(z, 2) if pool else z)
        return s


def twin(model_cfg: dict, in_size: int, num_classes: int) -> nn.Sequential:
    """The feedforward twin of conv_ffebm(model_cfg['blocks'], ...)."""
    if model_cfg.get("kind") != "conv":
        raise SystemExit(f"ff_twin: the config's model.kind is {model_cfg.get('kind')!r}; the twin is of kind conv")
    layers: list[nn.Module] = []
    size = in_size
    for k, spec in enumerate(model_cfg["blocks"]):
        if spec.get("fc"):
            raise SystemExit(f"ff_twin: block {k} holds dense layers (fc={spec['fc']}); the twin has convolutions only")
        ch, pools = spec["channels"], spec.get("pools", "")
        layers.append(nn.Conv2d(ch[0], ch[1], 3, padding=1))
        if pools[0] == "m":
            layers.append(nn.MaxPool2d(2))
            size //= 2
        if model_cfg.get("batchnorm", True):
            layers.append(nn.BatchNorm2d(ch[1]))
        layers.append(Sweep(ch[1:], pools[1:], model_cfg.get("activation", "hardsigmoid"), model_cfg.get("slope", 1.0)))
        size >>= pools[1:].count("m")
    layers += [nn.Flatten(), nn.Linear(model_cfg["blocks"][-1]["channels"][-1] * size * size, num_classes)]
    return nn.Sequential(*layers)


def evaluate(model: nn.Module, loader: DeviceLoader) -> float:
    model.eval()
    right = total = 0
    with torch.no_grad():
        for x, y in loader:
            right += int((model(x).argmax(1) == y).sum())
            total += len(y)
    model.train()
    return 100.0 * right / total


def run(config: str, overrides: list[str], data_dir: str | None, threads: int) -> dict:
    torch.set_num_threads(threads)
    cfg = load_config(config, overrides)
    torch.manual_seed(cfg["seed"])
    train_set = load_dataset(cfg["dataset"], "train", data_dir or cfg["data_dir"], **cfg["dataset_options"])
    test_set = load_dataset(cfg["dataset"], "test", data_dir or cfg["data_dir"], **cfg["dataset_options"])
    std = cfg["std_factor"] if cfg["std_factor"] is not None else default_std_factor(train_set.name)
    fmt = torch.channels_last if cfg["channels_last"] else None
    train = DeviceLoader(train_set, cfg["batch_size"], train=True, augment=cfg["augment"], seed=cfg["seed"],
                         limit=cfg["limit_train"], std_factor=std, pad=cfg["augment_pad"],
                         padding_mode=cfg["augment_padding"], flip=cfg["augment_flip"], memory_format=fmt)
    test = DeviceLoader(test_set, cfg["eval_batch_size"], train=False, augment=False, limit=cfg["limit_test"],
                        std_factor=std, memory_format=fmt)
    model = twin(cfg["model"], train_set.x.shape[-1], train_set.num_classes)
    if fmt is not None:
        model = model.to(memory_format=fmt)
    o = cfg["optim"]
    opt = make_optimizer(model, o)  # the trainer's optimizer and schedule for the config
    sched = make_scheduler(opt, o, cfg["epochs"], len(train))
    loss_fn = nn.CrossEntropyLoss()
    epochs = []
    for epoch in range(cfg["epochs"]):
        train.set_epoch(epoch)
        w0, c0 = time.perf_counter(), time.process_time()
        for x, y in train:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            if not math.isfinite(loss.item()):
                raise SystemExit(f"ff_twin: loss is {loss.item()} in epoch {epoch + 1}")
            loss.backward()
            opt.step()
            if o["schedule_unit"] == "step":
                sched.step()
        if o["schedule_unit"] == "epoch":
            sched.step()
        epochs.append({"epoch": epoch + 1, "test_top1": evaluate(model, test),
                       "train_s": time.perf_counter() - w0, "train_cpu_s": time.process_time() - c0})
    return {"config": config, "overrides": overrides, "threads": threads, "torch": torch.__version__,
            "parameters": sum(p.numel() for p in model.parameters()), "epochs": epochs}


def table(folder: Path) -> str:
    """One row per result file in `folder`: its config and overrides, size and test top-1 per epoch."""
    files = sorted(folder.glob("*.json"))
    if not files:
        raise SystemExit(f"ff_twin: no result files (*.json) in {folder}")
    rows = ["| run | config and overrides | parameters | test top-1 per epoch | train s (threads) |",
            "|---|---|---|---|---|"]
    for f in files:
        r = json.loads(f.read_text())
        over = ", ".join(f"`{o}`" for o in r["overrides"]) or "(none)"
        top1 = " / ".join(f"{e['test_top1']:.2f}" for e in r["epochs"])
        secs = sum(e["train_s"] for e in r["epochs"])
        rows.append(f"| {f.stem} | {r['config']}: {over} | {r['parameters']:,} | {top1} | {secs:.0f} "
                    f"({r['threads']}) |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="?")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides, as for eqprop train")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    p.add_argument("--table", type=Path, help="print the table of the result files in this folder instead")
    args = p.parse_args(argv)
    if args.table is not None:
        print(table(args.table), end="")
        return 0
    if args.config is None or args.out is None:
        p.error("a config and --out are needed (or --table FOLDER)")
    result = run(args.config, args.overrides, args.data_dir, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for e in result["epochs"]:
        print(f"epoch {e['epoch']}: test top-1 {e['test_top1']:.2f}% in {e['train_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
