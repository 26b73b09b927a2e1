"""Robustness to analog non-idealities: accuracy against the strength of each device setting.

A small dense network is trained on a Fashion-MNIST subset, once per (non-ideality,
strength, rule): with EP, whose gradient comes from the same non-ideal circuit as the
forward, and with BPTT, which unrolls the same non-ideal steps with autograd (weights and
DACs straight-through). By default (`--model block`) one energy-based block is the whole
network (the image is its input current, its last layer the outputs); `--model hybrid`
puts a linear input map and a linear readout around the block. Every other setting is off
in a run; the ideal circuit is the reference. Writes hardware.json, hardware.md and
hardware.png (test accuracy against strength, one panel per setting).

    eqprop study hardware                         # the default sweep below (1 thread)
    eqprop study hardware --only read_noise,adc_bits --epochs 2 --limit-train 10000
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..blocks import DenseHopfield
from ..chain import FFEBM, dense_ffebm
from ..devices import Device, attach_device_writes
from ..estimators import EP
from ..training.config import ConfigError

__all__ = ["SWEEPS", "FIXED", "STUDY_DEFAULTS", "MODELS", "load_subset", "train_one", "run_study", "plot", "markdown",
           "add_arguments", "run"]

# the strengths swept per setting (other settings off); FIXED: what a setting needs alongside
SWEEPS: dict[str, list] = {
    "read_noise": [0.05, 0.1, 0.2, 0.4],
    "program_noise": [0.01, 0.03, 0.1],
    "g_max": [1.0, 0.5, 0.25],
    "levels": [64, 16, 4],
    "asymmetry": [0.2, 0.5, 0.8],
    "drift": [0.001, 0.01, 0.05],
    "adc_bits": [8, 4, 3, 2],
    "dac_bits": [8, 4, 3, 2],
}
FIXED: dict[str, dict] = {"levels": {"g_max": 2.0}, "dac_bits": {"dac_range": 2.0}}

STUDY_DEFAULTS = dict(model="block", T1=20, T2=6, slope=0.5, lr=2e-3, batch=50, epochs=1, limit_train=4000,
                      limit_test=2000, rules=["ep", "bptt"], seeds=[0])
# 'block': the energy-based block is the whole network (input current = the image, its last
# layer = the 10 outputs, squared error against the one-hot target): the analog circuit does
# all the learning. 'hybrid': a linear input map, the block, a linear readout (cross-entropy):
# digital parts around the circuit that can compensate for it.
MODELS = {"block": dict(widths=[784, 128, 10], beta=0.5), "hybrid": dict(widths=[128, 64], beta=0.25)}


def load_subset(data_dir: str | None, limit_train: int, limit_test: int) -> tuple:
    """((x_train, y_train), (x_test, y_test)): the first examples of Fashion-MNIST, flattened and
    normalised with the training split's mean and std."""
    from ..data import load_dataset

    out = []
    for split, n in (("train", limit_train), ("test", limit_test)):
        ds = load_dataset("fashion_mnist", split, data_dir)
        x = ds.x[:n].float().div(255).flatten(1)
        x = (x - ds.mean[0]) / ds.std[0]
        out.append((x, ds.y[:n]))
    return tuple(out)


def _model(dev: Device | None, rule: str, seed: int, s: dict):
    torch.manual_seed(seed)
    ep = EP(beta=s["beta"], T2=s["T2"])
    if s["model"] == "block":
        model = FFEBM(DenseHopfield(s["widths"], slope=s["slope"], T1=s["T1"], estimator=ep))
    else:
        model = dense_ffebm(784, [s["widths"]], num_classes=10, slope=s["slope"], T1=s["T1"], estimator=ep)
    if rule != "ep":
        model.set_estimator(rule)
    model.configure_blocks(device=dev)
    return model


def train_one(dev: Device | None, rule: str, seed: int, data: tuple, s: dict) -> dict:
    """Train one model; its final test accuracy (%), train loss, the fraction of the block's
    weights that the training changed (after their first programming) and time."""
    (xt, yt), (xe, ye) = data
    model = _model(dev, rule, seed, s)
    opt = torch.optim.Adam(model.parameters(), lr=s["lr"])
    attach_device_writes(opt, model)
    start = [w.detach().clone() for b in model.blocks for w in b.device_weights()]
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    losses = []
    for _ in range(s["epochs"]):
        order = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt) - s["batch"] + 1, s["batch"]):
            idx = order[i:i + s["batch"]]
            opt.zero_grad(set_to_none=True)
            if s["model"] == "block":  # the block holds the output layer: the cost nudges it directly
                out = model(xt[idx], target=yt[idx])
                loss = 0.5 * ((out - F.one_hot(yt[idx], 10).to(out.dtype)) ** 2).sum(1).mean()
            else:
                loss = F.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
    correct = 0
    with torch.no_grad():
        for i in range(0, len(xe), 500):
            correct += (model(xe[i:i + 500]).argmax(1) == ye[i:i + 500]).sum().item()
    tail = losses[-max(len(losses) // 5, 1):]
    end = [w.detach() for b in model.blocks for w in b.device_weights()]
    moved = sum(int((a != b).sum()) for a, b in zip(start, end)) / max(sum(a.numel() for a in start), 1)
    return {"test_acc": 100.0 * correct / len(xe), "train_loss_end": sum(tail) / len(tail),
            "block_weights_moved": moved, "time_s": time.perf_counter() - t0}


def run_study(data: tuple, s: dict, only: list[str] | None = None, log=print) -> dict:
    """Every (setting, strength, rule, seed) run and the ideal reference per rule and seed."""
    names = only or list(SWEEPS)
    unknown = set(names) - set(SWEEPS)
    if unknown:
        raise ConfigError(f"study hardware: unknown setting(s) {sorted(unknown)}; valid: {', '.join(SWEEPS)}")
    runs = []
    for rule in s["rules"]:
        for seed in s["seeds"]:
            r = train_one(None, rule, seed, data, s)
            runs.append({"setting": "ideal", "strength": None, "rule": rule, "seed": seed, **r})
            log(f"ideal {rule} seed {seed}: test {r['test_acc']:.2f}% ({r['time_s']:.0f} s)")
            for name in names:
                for v in SWEEPS[name]:
                    dev = Device(**{**FIXED.get(name, {}), name: v})
                    r = train_one(dev, rule, seed, data, s)
                    runs.append({"setting": name, "strength": v, "rule": rule, "seed": seed, "device": repr(dev),
                                 **r})
                    log(f"{name}={v} {rule} seed {seed}: test {r['test_acc']:.2f}% ({r['time_s']:.0f} s)")
    return {"settings": s, "fixed": FIXED, "sweeps": {n: SWEEPS[n] for n in names}, "threads": torch.get_num_threads(),
            "runs": runs}


def _mean(runs: list[dict], key: str = "test_acc", **match) -> float | None:
    """Mean of `key` over the runs matching every (field, value) of `match` (None if none)."""
    vals = [r[key] for r in runs if key in r and all(r[k] == v for k, v in match.items())]
    return sum(vals) / len(vals) if vals else None


def markdown(result: dict) -> str:
    """Mean test accuracy per setting and strength (min-max over seeds when several), one column
    per rule, and the fraction of the block's weights the training moved."""
    rules = result["settings"]["rules"]
    lines = ["| setting | strength | " + " | ".join(f"{r} test acc. (%)" for r in rules) + " | "
             + " | ".join(f"{r} block weights moved" for r in rules) + " |",
             "|---|---|" + "---|" * (2 * len(rules))]

    def acc(**match) -> str:
        vals = [r["test_acc"] for r in result["runs"] if all(r[k] == v for k, v in match.items())]
        if not vals:
            return "-"
        mean = sum(vals) / len(vals)
        return f"{mean:.2f}" if len(vals) == 1 else f"{mean:.2f} ({min(vals):.2f}-{max(vals):.2f})"

    def cells(**match) -> str:
        moved = [_mean(result["runs"], rule=r, key="block_weights_moved", **match) for r in rules]
        return " | ".join(acc(rule=r, **match) for r in rules) + " | " + " | ".join(
            "-" if c is None else f"{c:.3f}" for c in moved)

    lines.append(f"| ideal | - | {cells(setting='ideal')} |")
    for name, values in result["sweeps"].items():
        extra = ", ".join(f"{k}={v}" for k, v in FIXED.get(name, {}).items())
        for v in values:
            lines.append(f"| {name}{f' ({extra})' if extra else ''} | {v} | {cells(setting=name, strength=v)} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    from ..analysis.common import pyplot

    plt = pyplot()
    names = list(result["sweeps"])
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        values = result["sweeps"][name]
        for j, rule in enumerate(result["settings"]["rules"]):
            accs = [_mean(result["runs"], setting=name, strength=v, rule=rule) for v in values]
            ax.plot(range(len(values)), accs, "o-", color=f"C{j}", label=rule)
            ideal = _mean(result["runs"], setting="ideal", rule=rule)
            ax.axhline(ideal, color=f"C{j}", ls="--", lw=0.8)
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels([str(v) for v in values], fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("test accuracy (%)", fontsize=8)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    s = result["settings"]
    fig.suptitle(f"Fashion-MNIST {s['limit_train']} train / {s['limit_test']} test, {s['epochs']} epoch(s), "
                 f"{s['model']} model, dense block {s['widths']}; dashed: ideal circuit", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `eqprop study hardware` (added to the study command's parser)."""
    parser.add_argument("--only", default=None,
                        help="hardware: comma-separated device settings to sweep (default: all: " + ",".join(SWEEPS)
                             + ")")
    parser.add_argument("--model", default="block", choices=sorted(MODELS),
                        help="hardware: 'block' (default): the energy-based block is the whole network "
                             f"{MODELS['block']['widths']}; 'hybrid': linear input map, block "
                             f"{MODELS['hybrid']['widths']}, linear readout")
    parser.add_argument("--epochs", type=int, default=None, help="hardware, local: epochs per run (default 1)")
    parser.add_argument("--limit-train", type=int, default=None,
                        help="hardware, local: training examples (default: hardware 4000, local all)")
    parser.add_argument("--limit-test", type=int, default=None,
                        help="hardware, local: test examples (default: hardware 2000, local all)")


def run(args: argparse.Namespace) -> int:
    """`eqprop study hardware`: the sweep, then hardware.json/.md/.png in --out."""
    s = {**STUDY_DEFAULTS, "model": args.model, **MODELS[args.model]}
    for key in ("epochs", "limit_train", "limit_test"):
        v = getattr(args, key, None)
        if v is not None:
            if v < 1:
                raise ConfigError(f"study hardware: --{key.replace('_', '-')} must be a positive integer, got {v}")
            s[key] = v
    if getattr(args, "rules_given", False):
        s["rules"] = [r.strip() for r in args.rules.split(",") if r.strip()]
    s["seeds"] = list(args.seeds)
    torch.set_num_threads(args.threads or 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_subset(args.data_dir, s["limit_train"], s["limit_test"])
    only = [n.strip() for n in args.only.split(",")] if args.only else None
    result = run_study(data, s, only, log=lambda m: print(m, flush=True))
    result["load_average"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    (out / "hardware.json").write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    (out / "hardware.md").write_text(table + "\n")
    plot(result, out / "hardware.png")
    print(table)
    print(f"wrote {out / 'hardware.json'}, {out / 'hardware.md'}, {out / 'hardware.png'}")
    return 0
