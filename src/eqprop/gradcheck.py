"""Gradient checking: ep / id / bptt against central finite differences (`eqprop gradcheck`).

A comparison only means something when the free phase has converged and the loss is
smooth at the equilibrium, so the report carries the free-phase residual of every block
and whether finite differences agree across two step sizes.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import ConvHopfield, DenseHopfield
from .chain import FFEBM
from .testing import cosine, finite_differences, flatten, gradients, rel_error

__all__ = ["DTYPES", "build_check_model", "run_gradcheck", "format_report", "add_arguments", "run"]

DTYPES = {"float64": torch.float64, "float32": torch.float32}


def build_check_model(kind: str = "conv", n_blocks: int = 3, activation: str = "sigmoid",
                      pool_in_blocks: bool = False, seed: int = 0, dtype: torch.dtype = torch.float64,
                      T1: int = 1000, tol: float | None = 1e-13, update: str = "sync") -> tuple[FFEBM, Tensor, Tensor]:
    """A small ff-EBM with non-trivial feedforward parts (conv + max-pool + batch-norm in
    train mode between blocks), plus one batch (x, y). Returns (model, x, y)."""
    if kind not in ("conv", "dense"):
        raise ValueError(f"gradcheck: kind must be 'conv' or 'dense', got {kind!r}")
    if not 1 <= n_blocks <= 4:
        raise ValueError(f"gradcheck: blocks must be between 1 and 4, got {n_blocks}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    relax = dict(T1=T1, tol=tol, update=update)
    modules: list[nn.Module] = []
    # Convolutions and dense maps that feed a batch-norm carry no bias (it would have no gradient).
    if kind == "conv":
        size = 16 if pool_in_blocks else 8
        x = torch.randn(4 if pool_in_blocks else 3, 1, size, size, generator=g)
        c = 1
        for k in range(n_blocks):
            last = k == n_blocks - 1
            pool_ff = size >= 4 and not (pool_in_blocks and k > 0)
            modules += [nn.Conv2d(c, 2, 3, padding=1, bias=False)] + ([nn.MaxPool2d(2)] if pool_ff else [])
            modules.append(nn.BatchNorm2d(2))
            size = size // 2 if pool_ff else size
            pools = "m" if pool_in_blocks and size >= 2 else "-"
            modules.append(ConvHopfield([2, 3], pools, fc=[4] if last else [], in_size=size, activation=activation,
                                        init="kaiming", alpha=0.6, name=f"block{k + 1}", **relax))
            size = size // 2 if pools == "m" else size
            c = 3
        modules += [nn.Flatten(), nn.Linear(4, 3)]
    else:
        x = torch.randn(4, 6, generator=g)
        n = 6
        for k in range(n_blocks):
            modules += [nn.Linear(n, 5, bias=False), nn.BatchNorm1d(5)]
            modules.append(DenseHopfield([5, 4, 3], activation=activation, alpha=0.8, name=f"block{k + 1}", **relax))
            n = 3
        modules.append(nn.Linear(3, 3))
    if activation == "hardsigmoid":  # centre the input currents inside the clamp's linear range
        for m in modules:
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.constant_(m.bias, 0.5)
    model = FFEBM(*modules).to(dtype)
    y = torch.randint(0, 3, (x.shape[0],), generator=g)
    return model, x.to(dtype), y


def run_gradcheck(kind: str = "conv", n_blocks: int = 3, dtype: str = "float64", beta: float = 1e-4,
                  variant: str = "centered", seed: int = 0, activation: str = "sigmoid", pool_in_blocks: bool = False,
                  T1: int = 1000, T2: int = 1000, tol: float | None = 1e-13, bptt_T2: int = 200,
                  fd_eps: tuple[float, float] | None = None, skip_fd: bool = False) -> dict:
    """Compute ep / id / bptt (and finite-difference) gradients of a small ff-EBM; return a report."""
    if dtype not in DTYPES:
        raise ValueError(f"gradcheck: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model, x, y = build_check_model(kind, n_blocks, activation, pool_in_blocks, seed, DTYPES[dtype], T1, tol)
    model.train()

    def loss_fn() -> Tensor:
        return F.cross_entropy(model(x), y)

    params = list(model.parameters())
    grads = {}
    settings = {"ep": dict(beta=beta, variant=variant, T2=T2, tol=tol), "id": dict(tol=min(tol or 1e-10, 1e-10),
                                                                                 max_iter=5000),
                "bptt": dict(T2=bptt_T2)}
    free = None
    for name, kw in settings.items():
        model.set_estimator(name, **kw)
        grads[name] = gradients(loss_fn, params)
        free = free or [phases["free"] for phases in model.relax_stats()]
    names = [n for n, _ in model.named_parameters()]
    report: dict = {"settings": dict(kind=kind, blocks=n_blocks, dtype=dtype, beta=beta, variant=variant, seed=seed,
                                     activation=activation, pool_in_blocks=pool_in_blocks, T1=T1, T2=T2, tol=tol,
                                     bptt_T2=bptt_T2),
                    "free_phase": free, "converged": all(f["converged"] is not False for f in free)}
    if not skip_fd:
        fd_eps = fd_eps or ((1e-5, 1e-4) if dtype == "float64" else (1e-2, 3e-2))
        fd = finite_differences(loss_fn, params, fd_eps[0])
        fd2 = finite_differences(loss_fn, params, fd_eps[1])
        grads["fd"] = fd
        fd_gap = rel_error(fd2, fd)
        report["fd"] = {"eps": list(fd_eps), "rel_gap_between_step_sizes": fd_gap,
                        "consistent": fd_gap < (1e-3 if dtype == "float64" else 5e-2)}
    ref = "fd" if "fd" in grads else "id"
    rows = []
    for i, n in enumerate(names):
        row = {"param": n, "shape": list(grads["ep"][i].shape), "reference": ref}
        for est in ("ep", "id", "bptt"):
            if est != ref:
                row[f"{est}_rel"] = rel_error(grads[est][i], grads[ref][i])
                row[f"{est}_cos"] = cosine(grads[est][i], grads[ref][i])
        row["ep_id_cos"] = cosine(grads["ep"][i], grads["id"][i])
        rows.append(row)
    flat = {k: flatten(v) for k, v in grads.items()}
    total = {"param": "ALL", "shape": [int(flat["ep"].numel())], "reference": ref}
    for est in ("ep", "id", "bptt"):
        if est != ref:
            total[f"{est}_rel"] = rel_error(flat[est], flat[ref])
            total[f"{est}_cos"] = cosine(flat[est], flat[ref])
    total["ep_id_cos"] = cosine(flat["ep"], flat["id"])
    report["params"], report["total"] = rows, total
    return report


def format_report(report: dict) -> str:
    """A plain-text table of the report."""
    s = report["settings"]
    lines = [f"gradcheck: {s['blocks']}-block {s['kind']} ff-EBM, {s['dtype']}, {s['activation']}, "
             f"EP {s['variant']} beta={s['beta']}, T1={s['T1']}, T2={s['T2']}, tol={s['tol']}"]
    for k, f in enumerate(report["free_phase"]):
        lines.append(f"  block{k + 1} free phase: {f['iters']} iterations, residual {f['residual']:.2e}, "
                     f"converged={f['converged']}")
    if "fd" in report:
        fd = report["fd"]
        verdict = "consistent" if fd["consistent"] else "INCONSISTENT"
        lines.append(f"  finite differences: eps={fd['eps']}, gap between step sizes "
                     f"{fd['rel_gap_between_step_sizes']:.2e} -> {verdict}")
    if not report["converged"]:
        lines.append("  WARNING: a free phase did not reach its tolerance; the comparison is not meaningful")
    ref = report["total"]["reference"]
    cols = [c for c in ("ep_rel", "ep_cos", "id_rel", "id_cos", "bptt_rel", "bptt_cos", "ep_id_cos")
            if c in report["total"]]
    titles = ["ep vs id cos" if c == "ep_id_cos" else c.replace("_", f" vs {ref} ", 1) for c in cols]
    lines.append(f"{'parameter':<28}{'shape':<16}" + "".join(f"{t:>18}" for t in titles))
    for row in report["params"] + [report["total"]]:
        lines.append(f"{row['param']:<28}{str(tuple(row['shape'])):<16}" + "".join(f"{row[c]:>18.3e}" for c in cols))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=["conv", "dense"], default="conv")
    p.add_argument("--blocks", type=int, default=3, help="number of energy-based blocks (1-4)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float64")
    p.add_argument("--beta", type=float, default=1e-4)
    p.add_argument("--variant", choices=["centered", "positive", "negative"], default="centered")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--activation", choices=["sigmoid", "hardsigmoid"], default="sigmoid")
    p.add_argument("--pool-in-blocks", action="store_true", help="2x2 max-pooling inside the blocks")
    p.add_argument("--T1", type=int, default=1000, help="free-phase iteration cap")
    p.add_argument("--T2", type=int, default=1000, help="nudged-phase iteration cap")
    p.add_argument("--tol", type=float, default=1e-13, help="relaxation tolerance (use <=0 for fixed T1/T2)")
    p.add_argument("--bptt-T2", type=int, default=200)
    p.add_argument("--no-fd", action="store_true", help="skip finite differences (compare with id)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny models run fastest on one)")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    report = run_gradcheck(kind=args.kind, n_blocks=args.blocks, dtype=args.dtype, beta=args.beta,
                           variant=args.variant, seed=args.seed, activation=args.activation,
                           pool_in_blocks=args.pool_in_blocks, T1=args.T1, T2=args.T2,
                           tol=args.tol if args.tol > 0 else None, bptt_T2=args.bptt_T2, skip_fd=args.no_fd)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0
