"""Compiled sweeps (`compile_sweep`, config key `compile`) against eager ones.

For each model, every energy block's free phase runs a fixed number of sweeps (no tolerance)
from zero on a fixed random input, eagerly and through the block's torch.compile'd sweep,
in turn, `--repeats` times; reports the median process CPU and wall seconds of each, their
ratio, the one-off compile time and the largest state difference. Models: the demo
(`fmnist_cpu`'s two conv blocks, batch 64) and the published L = 6 DHN split in 3 blocks and
unsplit (batch 16). Writes OUT.json and OUT.md.

    python benchmarks/compile_sweep.py --out benchmarks/results/compile_sweep
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch

from eqprop.training.config import load_config
from eqprop.training.models import build_model

from .common import batch, block_inputs, build


def demo_model() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """The demo's network (config fmnist_cpu) and its blocks' input currents for batch 64."""
    torch.manual_seed(0)
    model = build_model(load_config("fmnist_cpu"), {"shape": (1, 28, 28), "num_classes": 10, "kind": "image"})
    x = torch.randn(64, 1, 28, 28)
    return model, block_inputs(model, x)


def published(name: str) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    model = build(name, 1, torch.device("cpu"))
    x, _ = batch(16, torch.device("cpu"))
    return model, block_inputs(model, x)


def clocked(fn) -> tuple[float, float]:
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - c0, time.perf_counter() - w0


def measure(label: str, model: torch.nn.Module, us: list[torch.Tensor], sweeps: int, repeats: int) -> dict:
    eager_blocks = [m for m in model.modules() if hasattr(m, "compile_sweep")]
    twin = copy.deepcopy(model)
    comp_blocks = [m for m in twin.modules() if hasattr(m, "compile_sweep")]
    for b in comp_blocks:
        b.configure(compile_sweep=True)

    def run(blocks):
        return [b.relax(u, T=sweeps, tol=None)[0] for b, u in zip(blocks, us)]

    eager_out = run(eager_blocks)
    t0 = time.perf_counter()
    comp_out = run(comp_blocks)  # compiles one graph per block
    compile_s = time.perf_counter() - t0
    gap = max((a - b).abs().max().item() for sa, sb in zip(eager_out, comp_out) for a, b in zip(sa, sb))
    rows = {"eager": [], "compiled": []}
    for _ in range(repeats):
        rows["eager"].append(clocked(lambda: run(eager_blocks)))
        rows["compiled"].append(clocked(lambda: run(comp_blocks)))
    med = {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v)) for k, v in rows.items()}
    return {"model": label, "batch": us[0].shape[0], "blocks": len(us), "sweeps": sweeps,
            "eager_cpu_s": med["eager"][0], "eager_wall_s": med["eager"][1],
            "compiled_cpu_s": med["compiled"][0], "compiled_wall_s": med["compiled"][1],
            "speedup_cpu": med["eager"][0] / med["compiled"][0], "compile_s": compile_s, "max_state_gap": gap,
            "repeats": repeats}


def table(rows: list[dict]) -> str:
    lines = ["| model | batch | sweeps per block | eager CPU (s) | compiled CPU (s) | eager / compiled | "
             "compile once (s) | max state gap |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['sweeps']} | {r['eager_cpu_s']:.3f} | "
                     f"{r['compiled_cpu_s']:.3f} | {r['speedup_cpu']:.2f}x | {r['compile_s']:.1f} | "
                     f"{r['max_state_gap']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="demo,L6x3,L6x1", help="comma-separated: demo, L6x3, L6x1, L6")
    p.add_argument("--sweeps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True, help="output prefix: writes OUT.json and OUT.md")
    args = p.parse_args()
    if args.sweeps < 1 or args.repeats < 1 or args.threads < 1:
        p.error("--sweeps, --repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        model, us = demo_model() if name == "demo" else published(name)
        with torch.no_grad():
            row = measure(name, model, us, args.sweeps, args.repeats)
        print(json.dumps(row), flush=True)
        rows.append(row)
    info = {"torch": torch.__version__, "threads": args.threads,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_avg_1min": os.getloadavg()[0]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(f"# Compiled against eager sweeps\n\n`python -m benchmarks.compile_sweep "
                                      f"--models {args.models} --sweeps {args.sweeps} --repeats {args.repeats} "
                                      f"--out {args.out}` ({info['date']}, torch {info['torch']}, "
                                      f"{args.threads} thread(s), load {info['load_avg_1min']:.1f}); process CPU "
                                      f"seconds of one free phase of every block, median of {args.repeats}.\n\n"
                                      + table(rows) + "\n")


if __name__ == "__main__":
    main()
