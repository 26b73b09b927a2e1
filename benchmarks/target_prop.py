"""DTP, DTP with learned backprop targets (L-DRL) and backprop on the same perceptron, trained
by the Trainer on a Fashion-MNIST subset: test accuracy, time per epoch, and the per-layer angle
between each rule's update and backprop's along training (docs/target_propagation.md).

    .venv/bin/python benchmarks/target_prop.py --data-dir DIR [--limit-train 6000] [--epochs 2]

Writes benchmarks/results/target_prop.json. Angles are measured on a fixed probe batch (the first
training batch) every `--every` steps, at the parameters the run has reached (the probe
forward/backward changes no parameter). Threads: 1.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from eqprop.data import load_dataset
from eqprop.target_prop import update_angles
from eqprop.training.config import load_config
from eqprop.training.metrics import read_metrics
from eqprop.training.trainer import Trainer

RESULTS = Path(__file__).resolve().parent / "results" / "target_prop.json"


def run(learning: str, args: argparse.Namespace, train, test, out: Path) -> dict:
    overrides = [f"model.learning={learning}", f"epochs={args.epochs}", f"limit_train={args.limit_train}",
                 "threads=1", "progress=false", "tensorboard=false", f"out_dir={out / learning}",
                 f"seed={args.seed}", *args.set, *(args.set_dtp if learning == "dtp" else [])]
    cfg = load_config(args.config, overrides)
    curve: list[dict] = []
    probe: dict = {}

    def on_step(t: Trainer) -> None:
        step = t.epoch * len(t.train_loader) + t.step
        if learning == "bp" or (step % args.every and step != 1):
            return
        if not probe:
            x, y = next(iter(t.train_loader))  # the loader's first batch of this epoch order (own generator)
            probe.update(x=x, y=y)
        t0 = time.perf_counter()
        curve.append({"step": step, "angles_deg": [round(a, 2) for a in update_angles(t.model, probe["x"],
                                                                                      probe["y"])]})
        probe["cost_s"] = probe.get("cost_s", 0.0) + time.perf_counter() - t0

    trainer = Trainer(cfg, train, test, echo=lambda _m: None, on_step=on_step)
    trainer.fit()
    records = read_metrics(out / learning / "metrics.jsonl")
    angles = [c["angles_deg"] for c in curve]
    return {
        "learning": learning,
        "overrides": [*args.set, *(args.set_dtp if learning == "dtp" else [])],
        "test_top1": [r["test_top1"] for r in records],
        "train_loss": [r["train_loss"] for r in records],
        # the epoch time includes the probe measurements, which are subtracted here
        "epoch_time_s": [round(r["epoch_time_s"] - probe.get("cost_s", 0.0) / len(records), 2) for r in records],
        "angle_curve": curve,
        "max_angle_deg": [max(a[k] for a in angles) for k in range(len(angles[0]))] if angles else None,
        "final_angle_deg": angles[-1] if angles else None,
    }


def table(result: dict) -> str:
    """The results as the Markdown table of docs/target_propagation.md."""
    rows = ["| learning | overrides | test top-1 per epoch (%) | train loss per epoch | s per epoch | "
            "max angle per layer (deg) | last angle per layer (deg) |", "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        def fmt(v: list | None, d: int = 1) -> str:
            return "-" if v is None else ", ".join(f"{x:.{d}f}" for x in v)
        rows.append(f"| {r['learning']} | {' '.join(r['overrides']) or '-'} | {fmt(r['test_top1'], 2)} | "
                    f"{fmt(r['train_loss'], 3)} | {fmt(r['epoch_time_s'])} | {fmt(r['max_angle_deg'])} | "
                    f"{fmt(r['final_angle_deg'])} |")
    return "\n".join(rows)


def curve_table(result: dict, every: int = 3) -> str:
    """Angle curves (every `every`-th measurement) as a Markdown table: step, then per rule the
    per-layer angles."""
    runs = [r for r in result["runs"] if r["angle_curve"]]
    head = "| step | " + " | ".join(f"{r['learning']} (deg)" for r in runs) + " |"
    rows = [head, "|---" * (len(runs) + 1) + "|"]
    n = min(len(r["angle_curve"]) for r in runs)
    for i in [*range(0, n - 1, every), n - 1]:
        cells = [", ".join(f"{a:.1f}" for a in r["angle_curve"][i]["angles_deg"]) for r in runs]
        rows.append(f"| {runs[0]['angle_curve'][i]['step']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir")
    p.add_argument("--config", default="fmnist_mlp_dtp")
    p.add_argument("--limit-train", type=int, default=6000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--learning", nargs="+", default=["bp", "dtp", "dtp-ldrl"])
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides, e.g. model.feedback_lr=0.1")
    p.add_argument("--set-dtp", nargs="*", default=["model.feedback_lr=0.001"],
                   help="overrides for the plain-DTP run only (its reconstruction loss needs a smaller feedback_lr)")
    p.add_argument("--out", default="/tmp/eqprop_target_prop_runs")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--show", action="store_true", help="print the tables of an existing results file and stop")
    args = p.parse_args()
    if args.show:
        result = json.loads(Path(args.results).read_text())
        print(f"{result['command']}\n\n{table(result)}\n\n{curve_table(result)}")
        return
    if not args.data_dir:
        p.error("--data-dir is needed to run (not with --show)")
    torch.set_num_threads(1)
    train = load_dataset("fashion_mnist", "train", args.data_dir)
    test = load_dataset("fashion_mnist", "test", args.data_dir)
    runs = [run(name, args, train, test, Path(args.out)) for name in args.learning]
    result = {
        "command": f"benchmarks/target_prop.py --limit-train {args.limit_train} --epochs {args.epochs} "
                   f"--every {args.every} --seed {args.seed} --config {args.config}"
                   + (f" --set {' '.join(args.set)}" if args.set else "") + f" --set-dtp {' '.join(args.set_dtp)}",
        "config": load_config(args.config, [])["model"],
        "settings": {"limit_train": args.limit_train, "epochs": args.epochs, "threads": 1, "test_examples": 10000,
                     "probe_batch": load_config(args.config, [])["batch_size"], "every_steps": args.every},
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor()},
        "runs": runs,
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=1) + "\n")
    for r in runs:
        print(f"{r['learning']:9s} top-1 {r['test_top1'][-1]:.2f}%  epoch {r['epoch_time_s'][-1]:.1f} s  "
              f"max angle {r['max_angle_deg']}  final {r['final_angle_deg']}")


if __name__ == "__main__":
    main()
