"""Faster free phases: over-relaxation and Anderson acceleration against the plain sweep.

For each trained checkpoint given (the model of a training run) and a few training
batches, every energy block's free phase is relaxed from zero with the plain asynchronous
sweep and with each accelerated setting (`omega`, `anderson`: relaxation settings of the
block), to the same tolerance. Reports the sweeps each needs (a sweep costs the same in
all settings, up to Anderson's per-sample inner products) and how far each reached state
is from a tight reference equilibrium (plain sweeps to tol 1e-7). Sweep counts do not depend
on the machine's load. Writes a JSON and a markdown table.

    python benchmarks/solver.py --checkpoints runs/demo/checkpoint.pt --out benchmarks/results/solver
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from eqprop.analysis.common import block_inputs, trained_model, training_batches
from eqprop.blocks import relative_change

SETTINGS = [
    {"name": "plain", "omega": 1.0, "anderson": 0},
    {"name": "omega1.2", "omega": 1.2, "anderson": 0},
    {"name": "omega1.4", "omega": 1.4, "anderson": 0},
    {"name": "omega1.6", "omega": 1.6, "anderson": 0},
    {"name": "anderson3", "omega": 1.0, "anderson": 3},
    {"name": "anderson5", "omega": 1.0, "anderson": 5},
    {"name": "anderson8", "omega": 1.0, "anderson": 8},
    {"name": "anderson5_omega1.2", "omega": 1.2, "anderson": 5},
]


def measure(block, u: torch.Tensor, tols: list[float], T: int) -> list[dict]:
    saved = (block.omega, block.anderson)
    rows = []
    try:
        block.configure(omega=1.0, anderson=0)
        ref, ref_stats = block.relax(u, T=20 * T, tol=1e-7)
        for setting in SETTINGS:
            block.configure(omega=setting["omega"], anderson=setting["anderson"])
            for tol in tols:
                c0 = time.process_time()
                s, stats = block.relax(u, T=T, tol=tol)
                rows.append({**setting, "tol": tol, "iters": stats.iters, "converged": stats.converged,
                             "residual": stats.residual, "cpu_s": time.process_time() - c0,
                             "distance_to_reference": float(relative_change(s, ref)),
                             "reference_iters": ref_stats.iters})
    finally:
        block.configure(omega=saved[0], anderson=saved[1])
    return rows


def markdown(result: dict) -> str:
    """One row per checkpoint, block and tolerance; per setting the mean sweeps over the batches
    and, in parentheses, plain / setting; then the largest distance to the reference of any
    setting and whether every relaxation met its tolerance."""
    names = [s["name"] for s in result["settings"]]
    lines = ["| checkpoint | block | tol | " + " | ".join(names) + " | max distance to reference | all converged |",
             "|---|---|---|" + "---|" * len(names) + "---|---|"]
    for run in result["runs"]:
        groups: dict = {}
        for r in run["rows"]:
            groups.setdefault((r["block"], r["tol"]), {}).setdefault(r["name"], []).append(r)
        for (block, tol), by_name in groups.items():
            mean = {n: sum(r["iters"] for r in rs) / len(rs) for n, rs in by_name.items()}
            cells = [f"{mean[n]:.1f} ({mean['plain'] / mean[n]:.2f}x)" for n in names]
            rows = [r for rs in by_name.values() for r in rs]
            dist = max(r["distance_to_reference"] for r in rows)
            conv = all(r["converged"] for r in rows)
            lines.append(f"| {run['label']} | {block} | {tol:g} | " + " | ".join(cells) + f" | {dist:.1e} | "
                         f"{'yes' if conv else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoints", nargs="+", default=[], help="training checkpoint files")
    p.add_argument("--labels", nargs="*", default=None, help="a name per checkpoint (default: its path)")
    p.add_argument("--batches", type=int, default=3, help="training batches (in file order) per checkpoint")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--tols", type=float, nargs="+", default=[1e-4, 1e-5])
    p.add_argument("--T", type=int, default=200, help="iteration cap of every measured relaxation")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True, help="output prefix: writes OUT.json and OUT.md")
    p.add_argument("--replot", action="store_true", help="measure nothing: rewrite OUT.md from OUT.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.replot:
        out.with_suffix(".md").write_text(markdown(json.loads(out.with_suffix(".json").read_text())))
        print(out.with_suffix(".md").read_text())
        return 0
    torch.set_num_threads(args.threads)
    if not args.checkpoints:
        p.error("--checkpoints: give at least one training checkpoint (or --replot)")
    labels = args.labels or args.checkpoints
    if len(labels) != len(args.checkpoints):
        p.error(f"--labels: {len(labels)} names for {len(args.checkpoints)} checkpoints")
    result = {"settings": SETTINGS, "tols": args.tols, "T": args.T, "batch": args.batch, "runs": []}
    for path, label in zip(args.checkpoints, labels):
        model, cfg, train, _ = trained_model(path, args.data_dir)
        rows = []
        for i, (x, _) in enumerate(training_batches(cfg, train, args.batch, args.batches)):
            for block, u in zip(model.blocks, block_inputs(model, x, relaxed=True)):
                rows += [{"batch": i, "block": block.block_name, **r} for r in measure(block, u, args.tols, args.T)]
        result["runs"].append({"label": label, "checkpoint": str(path), "rows": rows})
        print(f"{label}: {len(rows)} relaxations")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
