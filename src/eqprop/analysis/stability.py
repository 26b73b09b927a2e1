"""`eqprop analyze stability`: how strongly each block's sweep contracts at its free state.

Near a fixed point s* the sweep s <- F(s) behaves like its Jacobian J = dF/ds(s*): the error
shrinks by rho(J) per sweep, so a free phase needs about log(tol) / log(rho) sweeps, and
with rho >= 1 the fixed point does not attract at all. For a layered block with async sweeps
(Gauss-Seidel on a two-cyclic system) the eigenvalues of J are real and non-negative, so a
power iteration on Jacobian-vector products (forward-mode AD through `block.step`) gives
rho per sample. Hard-sigmoid units that sit at 0 or 1 have zero derivative and drop out of
J: rho is set by the couplings among the units in their linear range (`active`).

For training checkpoints, on a few training batches in file order, per block: the free
phase from zero to a tight tolerance (sweeps, converged), then rho of the block's sweep
(its own omega) at the state reached, and the fraction of units in their linear range.

    eqprop analyze stability --checkpoints runs/demo --batches 2 --out benchmarks/results/stability
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor

from ..blocks import EnergyBlock, State
from .common import block_inputs, trained_model, training_batches

__all__ = ["sweep_rate", "active_fraction", "add_arguments", "run"]


def _per_sample_norm(xs: State) -> Tensor:
    return torch.stack([x.flatten(1).pow(2).sum(1) for x in xs]).sum(0).sqrt()


def sweep_rate(block: EnergyBlock, u: Tensor, s: State, iters: int = 60, seed: int = 0) -> Tensor:
    """Per sample, the spectral radius of the Jacobian of one sweep (`block.step`, with the
    block's update order and omega) at the state s: a power iteration of `iters`
    Jacobian-vector products; the estimate is the geometric mean of the last 5 norm ratios."""
    if iters < 6:
        raise ValueError(f"sweep_rate: iters must be >= 6, got {iters}")
    gen = torch.Generator(device=u.device).manual_seed(seed)
    v = [torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device) for x in s]
    primals = tuple(x.detach() for x in s)
    u = u.detach()

    def sweep(*xs: Tensor) -> tuple[Tensor, ...]:
        return tuple(block.step(list(xs), u, None, None))

    def scale(xs: State, c: Tensor) -> State:  # each sample's tensors times its factor
        return [x * c.view(-1, *([1] * (x.dim() - 1))) for x in xs]

    logs = []
    v = scale(v, 1 / _per_sample_norm(v).clamp_min(1e-30))
    for k in range(iters):
        _, w = torch.func.jvp(sweep, primals, tuple(v))
        n = _per_sample_norm(list(w))
        if k >= iters - 5:
            logs.append(n.clamp_min(1e-30).log())
        v = scale(list(w), 1 / n.clamp_min(1e-30))
    return torch.stack(logs).mean(0).exp()


def active_fraction(block: EnergyBlock, u: Tensor, s: State) -> Tensor:
    """Per sample, the fraction of units whose activation has a non-zero derivative at the
    pre-activation s produces (units in their linear range)."""
    pre = block.preactivations(list(s), u, list(range(len(s))))
    counts, total = 0, 0
    for l, z in pre.items():
        _, d = torch.func.jvp(block.activations[l], (z,), (torch.ones_like(z),))
        counts = counts + (d != 0).flatten(1).sum(1)
        total += z[0].numel()
    return counts / total


# ---- checkpoints --------------------------------------------------------------------------

def _bad(message: str) -> ValueError:
    from ..training.config import ConfigError  # imported here: training imports analysis modules
    return ConfigError(message)


def measure_checkpoint(path: Path, batches: int, batch: int, T: int, tol: float, iters: int,
                       data_dir: str | None, omega: float | None = None) -> dict:
    model, cfg, train, pos = trained_model(path, data_dir)
    if omega is not None:
        model.configure_blocks(omega=omega)
    rows = []
    for i, (x, _) in enumerate(training_batches(cfg, train, batch, batches)):
        # each block's input current of a training forward (batch norm in training mode)
        for b, u in zip(model.blocks, block_inputs(model, x, relaxed=True)):
            s, st = b.relax(u, T=T, tol=tol)
            with torch.no_grad():
                rate = sweep_rate(b, u, s, iters)
                act = active_fraction(b, u, s)
            rows.append({"batch": i, "block": b.block_name, "omega": b.omega, "sweeps": st.iters,
                         "converged": bool(st.converged), "residual": st.residual,
                         "rate": rate.tolist(), "active": act.tolist()})
    return {"checkpoint": str(path), "algorithm": cfg["algorithm"], "slope": cfg["model"].get("slope"),
            "epoch": pos["epoch"], "step_in_epoch": pos["step"], "rows": rows}


def _quantile(xs: list[float], q: float) -> float:
    return float(torch.tensor(xs).quantile(q))


def markdown(result: dict) -> str:
    lines = ["| checkpoint | algorithm | slope | block | free sweeps (mean, max) | converged | rho median | "
             "rho 90% | rho max | samples rho >= 0.99 | units in linear range |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        by_block: dict[str, list[dict]] = {}
        for r in run["rows"]:
            by_block.setdefault(r["block"], []).append(r)
        for name, rs in by_block.items():
            rates = [v for r in rs for v in r["rate"]]
            act = [v for r in rs for v in r["active"]]
            sweeps = [r["sweeps"] for r in rs]
            lines.append(f"| {run['label']} | {run['algorithm']} | {run['slope']} | {name} | "
                         f"{sum(sweeps) / len(sweeps):.1f}, {max(sweeps)} | "
                         f"{sum(r['converged'] for r in rs)}/{len(rs)} | {_quantile(rates, 0.5):.3f} | "
                         f"{_quantile(rates, 0.9):.3f} | {max(rates):.3f} | "
                         f"{sum(v >= 0.99 for v in rates)}/{len(rates)} | {sum(act) / len(act):.1%} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="PATH",
                        help="training checkpoints (files, or run folders: their checkpoint.pt)")
    parser.add_argument("--labels", nargs="*", default=None, help="a name per checkpoint (default: its path)")
    parser.add_argument("--batches", type=int, default=2, help="training batches (in file order) per checkpoint")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--T", type=int, default=1000, help="cap of each free phase")
    parser.add_argument("--tol", type=float, default=1e-6, help="free phases stop at this relative change")
    parser.add_argument("--iters", type=int, default=60, help="power-iteration steps per estimate")
    parser.add_argument("--omega", type=float, default=None,
                        help="over-relaxation of the free phases and of the analysed sweep (default: each "
                             "checkpoint's own; 1: the plain sweep, whose rate compares across checkpoints)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", required=True, help="output prefix: writes OUT.json and OUT.md")


def run(args: argparse.Namespace) -> int:
    for key in ("batches", "batch", "T", "iters"):
        if getattr(args, key) < 1:
            raise _bad(f"stability: --{key} must be >= 1, got {getattr(args, key)}")
    if not args.tol > 0:
        raise _bad(f"stability: --tol must be > 0, got {args.tol}")
    if args.iters < 6:
        raise _bad(f"stability: --iters must be >= 6 (the estimate averages the last 5 steps), got {args.iters}")
    paths = []
    for p in map(Path, args.checkpoints):
        f = p / "checkpoint.pt" if p.is_dir() else p
        if not f.is_file():
            raise _bad(f"stability: --checkpoints {p}: no checkpoint file there")
        paths.append(f)
    labels = args.labels or [str(p) for p in paths]
    if len(labels) != len(paths):
        raise _bad(f"stability: {len(labels)} --labels for {len(paths)} checkpoints")
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = []
    for path, label in zip(paths, labels):
        res = measure_checkpoint(path, args.batches, args.batch, args.T, args.tol, args.iters, args.data_dir,
                                 args.omega)
        runs.append({"label": label, **res})
        print(markdown({"runs": [runs[-1]]}), flush=True)
    result = {"settings": {k: getattr(args, k) for k in ("batches", "batch", "T", "tol", "iters", "omega")},
              "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(markdown(result))
    return 0
