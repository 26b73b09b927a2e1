"""EP with free or held in-block pooling routes against implicit differentiation.

Superseded by `eqprop analyze fidelity`, which measures the same comparison (and more: every
EP variant, BPTT as a second reference, per-tensor relative errors, regime switches, the
demo model and training checkpoints). This script runs it with the held-pool grid: the L = 6
DHN of the splitting study cut into 3 blocks (`dhn3`) and unsplit (`dhn1`), GOE V = 8.351e-5,
slope 1, async, T1 = 60, one random CIFAR-shaped batch of 4, float32, centered EP (T2 = 20)
with pool='free' and pool='held' against ID (MINRES, tol 1e-6), one thread.

    python benchmarks/held_pool.py [--seeds 0 1 2] [--betas 0.2 0.02] [--blocks 3 1] [--out DIR]

The table of docs/gradients.md ("Gradient fidelity") was made with the equivalent command
`eqprop analyze fidelity --models dhn3 dhn1 demo ...` written there.
"""
from __future__ import annotations

import argparse
import sys

from eqprop.cli import main as eqprop_main


def command(args: argparse.Namespace) -> list[str]:
    """The `eqprop analyze fidelity` arguments of the held-pool grid."""
    return ["analyze", "fidelity", "--models", *[f"dhn{b}" for b in args.blocks], "--seeds", *map(str, args.seeds),
            "--betas", *map(str, args.betas), "--pools", "free", "held", "--variants", "centered", "--batch",
            str(args.batch), "--threads", "1", "--out", args.out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--betas", type=float, nargs="+", default=[0.2, 0.02])
    ap.add_argument("--blocks", type=int, nargs="+", default=[3, 1], choices=[3, 1])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", default="runs/held_pool", help="output folder (fidelity.json, .md, .png)")
    argv = command(ap.parse_args())
    print("eqprop " + " ".join(argv), flush=True)
    sys.exit(eqprop_main(argv))


if __name__ == "__main__":
    main()
