"""ID's adjoint: the fixed-point iteration against MINRES on the demo architecture.

Trains the demo config (fmnist_cpu) for a few hundred EP steps at each slope, then, on one
test batch, relaxes every block with the config's settings and solves each block's adjoint
both ways from the same equilibrium and error current: iterations, final residual, whether
tol was met, and the cosine between the two gradients. Writes benchmarks/results/adjoint.json.

    python benchmarks/adjoint.py [--steps 200] [--slopes 0.35 0.5]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from eqprop import ID
from eqprop.estimators import block_parameters
from eqprop.testing import cosine
from eqprop.training.config import load_config
from eqprop.training.trainer import Trainer

OUT = Path(__file__).resolve().parent / "results" / "adjoint.json"


def adjoints(trainer: Trainer, tol: float, max_iter: int) -> list[dict]:
    """Per block: both adjoint solvers from the block's free equilibrium on one test batch."""
    model = trainer.model.eval()
    x, y = next(iter(trainer.test_loader))
    inputs: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach())) for b in model.blocks]
    try:
        with torch.no_grad():
            model(x[:64])
    finally:
        for h in hooks:
            h.remove()
    rows = []
    g = torch.Generator().manual_seed(0)
    for k, (block, u) in enumerate(zip(model.blocks, inputs)):
        s, free = block.relax(u)
        delta = torch.randn(s[-1].shape, generator=g, dtype=s[-1].dtype) / s[-1].shape[0]
        row = {"block": k, "free_iters": free.iters, "free_residual": free.residual, "free_converged": free.converged,
               "params": sum(p.numel() for p in block_parameters(block))}
        grads = {}
        for solver in ("fixed-point", "minres"):
            record: dict = {}
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                gu, gp = ID(solver=solver, tol=tol, max_iter=max_iter).gradients(block, u, s, delta, None, record, True)
                grads[solver] = torch.cat([t.flatten() for t in [gu] + gp if t is not None])
                st = record["adjoint"]
                row[solver] = {"iters": st.iters, "residual": st.residual, "converged": st.converged,
                               "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
            except RuntimeError as e:
                row[solver] = {"error": str(e)}
        if len(grads) == 2:
            row["cosine"] = cosine(grads["fixed-point"], grads["minres"])
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200, help="EP training steps before the measurement")
    ap.add_argument("--slopes", type=float, nargs="+", default=[0.35, 0.5])
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--max-iter", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    flags = " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in vars(args).items())
    results = {"command": f"python benchmarks/adjoint.py {flags}", "threads": 1, "runs": []}
    for slope in args.slopes:
        cfg = load_config("fmnist_cpu", [f"model.slope={slope}", "epochs=1", f"limit_train={64 * args.steps}",
                                         "limit_test=500", "progress=false", "tensorboard=false",
                                         f"out_dir=/tmp/eqprop-adjoint-{slope}", "threads=1"])
        trainer = Trainer(cfg, echo=lambda _m: None)
        at_init = adjoints(trainer, args.tol, args.max_iter)
        trainer.model.train()
        summary = trainer.fit()
        trained = adjoints(trainer, args.tol, args.max_iter)
        results["runs"].append({"slope": slope, "train_steps": args.steps,
                                "test_top1": summary["last"].get("test_top1"), "at_init": at_init, "trained": trained})
        print(json.dumps(results["runs"][-1], indent=1))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
