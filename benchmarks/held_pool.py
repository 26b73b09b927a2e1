"""EP with free or held in-block pooling routes against implicit differentiation.

The L = 6 DHN of the splitting study (GOE V = 8.351e-5, slope 1, async, T1 = 60) cut into
3 blocks and unsplit, one random CIFAR-shaped batch of 4, float32: per seed and beta, the
cosine between centered EP (T2 = 20) and ID (MINRES, tol 1e-6) over all parameters and for
the worst energy-block tensor, with pool='free' and pool='held', and the number of in-block
argmax switches between the free state and the nudged states. Writes
benchmarks/results/held_pool.json.

    python benchmarks/held_pool.py [--seeds 0 1 2] [--betas 0.2 0.02] [--blocks 3 1]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from eqprop import EP, ID
from eqprop.analysis.common import synthetic_images
from eqprop.analysis.splitting import DHN_L6, dhn_model
from eqprop.blocks import EnergyBlock
from eqprop.testing import cosine

OUT = Path(__file__).resolve().parent / "results" / "held_pool.json"


def gradients(model, estimator, x, y) -> dict[str, torch.Tensor]:
    model.set_estimator(estimator)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def switches(model, x, beta: float) -> int:
    """In-block argmax switches between each block's free state and its two nudged states
    (free routing), for a random unit error current on every block's output."""
    inputs: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach())) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    n, g = 0, torch.Generator().manual_seed(0)
    for block, u in zip(model.blocks, inputs):
        s, _ = block.relax(u)
        delta = torch.randn(s[-1].shape, generator=g)
        c = EP(beta=beta, T2=20).contrast(block, u, s, delta, None)
        for l, cp in enumerate(block.couplings):
            if cp.routed:
                ref = cp(s[l])[1][0]
                n += int((cp(c.first[l])[1][0] != ref).sum()) + int((cp(c.second[l])[1][0] != ref).sum())
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--betas", type=float, nargs="+", default=[0.2, 0.02])
    ap.add_argument("--blocks", type=int, nargs="+", default=[3, 1])
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for n_blocks in args.blocks:
        for seed in args.seeds:
            model = dhn_model(DHN_L6, n_blocks, 1, seed, slope=1.0, variance=8.351e-5, T1=60, update="async")
            x, y = synthetic_images(args.batch, 32, 10, seed)
            t0 = time.process_time()
            ref = gradients(model, ID(solver="minres", tol=1e-6, max_iter=500), x, y)
            block_params = {n for n, _ in model.named_parameters()
                            if any(n.startswith(f"{i}.") for i, m in enumerate(model) if isinstance(m, EnergyBlock))}
            for beta in args.betas:
                row = {"blocks": n_blocks, "seed": seed, "beta": beta, "switches": switches(model, x, beta)}
                for pool in ("free", "held"):
                    g = gradients(model, EP(beta=beta, T2=20, pool=pool), x, y)
                    flat = cosine(torch.cat([g[n].flatten() for n in g]), torch.cat([ref[n].flatten() for n in g]))
                    worst = min(cosine(g[n], ref[n]) for n in block_params)
                    row[pool] = {"flat_cos": flat, "worst_tensor_cos": worst}
                row["cpu_s"] = time.process_time() - t0
                rows.append(row)
                print(json.dumps(row), flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    flags = " ".join(f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items())
    OUT.write_text(json.dumps({"command": f"python benchmarks/held_pool.py {flags}", "threads": 1, "rows": rows},
                              indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
