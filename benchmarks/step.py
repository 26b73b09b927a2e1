"""Part `step`: time of one training step (free phase + gradient + Adam step) per estimator."""
from __future__ import annotations

import statistics

import torch

from .common import ESTIMATORS, MODELS, batch, build, timed, train_step, use_estimator


def part_step(models, batches, div, device, repeats: int) -> list[dict]:
    """Per model and batch size, every estimator's step time (wall and CPU; the estimators are
    timed in turn within each repeat, so load changes hit all alike) and iteration counts."""
    rows = []
    for name in models:
        T1, T2 = MODELS[name]["T1"], MODELS[name]["T2"]
        for n in batches:
            x, y = batch(n, device)
            model = build(name, div, device)
            opt = torch.optim.Adam(model.parameters(), lr=1e-5)
            times = {e: [] for e in ESTIMATORS}
            cpu = {e: [] for e in ESTIMATORS}
            info = {}
            model.configure_blocks(T1=1)
            for e in ESTIMATORS:  # a cheap warm-up at T1 = T2 = 1: allocations, Adam state, kernels
                use_estimator(model, e, 1)
                train_step(model, opt, x, y)
            model.configure_blocks(T1=T1)
            for _ in range(repeats):
                for e in ESTIMATORS:
                    use_estimator(model, e, T2)
                    w, c = timed(train_step, model, opt, x, y, device=device)
                    times[e].append(w)
                    cpu[e].append(c)
                    info[e] = model.relax_stats()
            for e in ESTIMATORS:
                rows.append({"model": name, "batch": n, "estimator": e, "min_s": min(times[e]),
                             "median_s": statistics.median(times[e]), "times_s": times[e],
                             "cpu_min_s": min(cpu[e]), "cpu_s": cpu[e], "T1": T1, "T2": T2,
                             "iters": [{k: v["iters"] for k, v in b.items()} for b in info[e]]})
                print(f"step {name} b={n} {e}: {min(times[e]):.3f}s wall, {min(cpu[e]):.3f}s CPU", flush=True)
    return rows
