"""Hamiltonian units: the step loop, the parallel scan and RHEL's echo against their previous
formulation, in one run (docs/sequences.md, "Speed of the Hamiltonian units").

    .venv/bin/python benchmarks/hamiltonian.py [--lengths 128 784] [--batch 64] [--repeats 5]
    .venv/bin/python benchmarks/hamiltonian.py --table benchmarks/results/hamiltonian.json

"before" is the formulation the units had until this benchmark was written, kept below as
plain functions on the same unit objects: the input drive u_t @ B^T multiplied inside the time
loop, the readout and the echo's parameter sums formed step by step, and the parallel scan as
a Hillis-Steele scan (log2(L) rounds over the whole sequence). "after" is the library's code.
Every case checks that both give the same outputs and gradients (max relative difference in
the json) and times both alternately in the same process: process CPU seconds, one thread,
median of `--repeats`. Sizes: batch 64, hidden = state size = 64 (the seq_fmnist configs).
Writes benchmarks/results/hamiltonian.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor

from eqprop import RHEL
from eqprop.hamiltonian import make_hru
from eqprop.hamiltonian.rhel import EchoResult, echo_error_scale, natural_to_raw

RESULTS = Path(__file__).resolve().parent / "results" / "hamiltonian.json"


# --- the previous formulation ---------------------------------------------------------------
def before_leapfrog(unit, y: Tensor, z: Tensor, bu: Tensor, nat: dict) -> tuple[Tensor, Tensor, Tensor]:
    dt = nat["dt"]
    yh = y + 0.5 * dt * z
    z = z - dt * unit.force(yh, bu, nat)
    return yh + 0.5 * dt * z, z, yh


def before_parallel(unit, u: Tensor, y0: Tensor, z0: Tensor, nat: dict) -> tuple[Tensor, Tensor, Tensor]:
    (m11, m12, m21, m22), (gy, gz) = unit.transition(nat)
    bu = u @ nat["B"].T
    fy, fz = gy * bu, gz * bu
    fy = torch.cat([fy[:, :1] + (m11 * y0 + m12 * z0).unsqueeze(1), fy[:, 1:]], 1)
    fz = torch.cat([fz[:, :1] + (m21 * y0 + m22 * z0).unsqueeze(1), fz[:, 1:]], 1)
    L, d = u.shape[1], 1
    while d < L:
        py, pz = fy[:, :-d], fz[:, :-d]
        fy = torch.cat([fy[:, :d], fy[:, d:] + m11 * py + m12 * pz], 1)
        fz = torch.cat([fz[:, :d], fz[:, d:] + m21 * py + m22 * pz], 1)
        m11, m12, m21, m22 = (m11 * m11 + m12 * m21, m11 * m12 + m12 * m22,
                              m21 * m11 + m22 * m21, m21 * m12 + m22 * m22)
        d *= 2
    return fy, fy[:, -1], fz[:, -1]


def before_trajectory(unit, u: Tensor, y0: Tensor | None = None, z0: Tensor | None = None,
                      readout: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    nat = unit.natural()
    y0 = u.new_zeros(u.shape[0], unit.state_size) if y0 is None else y0
    z0 = torch.zeros_like(y0) if z0 is None else z0
    if unit.scan == "parallel" or torch.is_grad_enabled():
        if unit.scan == "parallel":
            ys, y, z = before_parallel(unit, u, y0, z0, nat)
        else:
            y, z, ys = y0, z0, []
            for ut in u.unbind(1):
                y, z, _ = before_leapfrog(unit, y, z, ut @ nat["B"].T, nat)
                ys.append(y)
            ys = torch.stack(ys, 1)
        return (ys @ unit.C.T + u * unit.D if readout else ys), y, z
    y, z = y0, z0
    seq = u.new_empty(u.shape[0], u.shape[1], unit.in_features if readout else unit.state_size)
    for t in range(u.shape[1]):
        y, z, _ = before_leapfrog(unit, y, z, u[:, t] @ nat["B"].T, nat)
        seq[:, t] = y @ unit.C.T + u[:, t] * unit.D if readout else y
    return seq, y, z


def before_echo(unit, u: Tensor, yL: Tensor, zL: Tensor, g_out: Tensor, eps: float, normalize: str = "sample",
                need_u: bool = True) -> EchoResult:
    with torch.no_grad():
        nat = {k: v.detach() for k, v in unit.natural().items()}
        dt, B, C, D = nat["dt"], nat["B"], unit.C.detach(), unit.D.detach()
        scale = echo_error_scale(g_out, C, normalize)
        col = scale.view(-1, 1) if scale.dim() else scale
        denom = col.clamp_min(torch.finfo(g_out.dtype).tiny)
        sign = torch.tensor([1.0, -1.0], dtype=u.dtype, device=u.device).view(2, 1, 1)
        kick = sign * eps
        weight = sign * col
        y = yL + torch.zeros_like(sign)
        z = -zL + torch.zeros_like(sign)
        s_dt, s_B, s_C = torch.zeros_like(dt), torch.zeros_like(B), torch.zeros_like(C)
        s_p: dict[str, Tensor] = {}
        grad_u = g_out * D if need_u else None
        for t in reversed(range(u.shape[1])):
            go = g_out[:, t]
            s_C += go.T @ y.mean(0)
            z = z + kick * ((go @ C) / denom)
            ut = u[:, t]
            bu = ut @ B.T
            z_in = z
            y, z, yh = before_leapfrog(unit, y, z, bu, nat)
            s_dt += (weight * (0.25 * (z_in * z_in + z * z) + unit.potential(yh, bu, nat))).sum((0, 1))
            parts, dbu = unit.partials(yh, bu, nat)
            for name, v in parts.items():
                s_p[name] = s_p.get(name, 0) + (weight * v).sum((0, 1))
            wd = (weight * dbu).sum(0)
            s_B += wd.T @ ut
            if need_u:
                grad_u[:, t] -= ((wd * dt) @ B) / (2 * eps)
        k = -1.0 / (2 * eps)
        grads = {"dt": k * s_dt, "B": k * dt[:, None] * s_B}
        grads.update({name: k * dt * v for name, v in s_p.items()})
        sc = col / (2 * eps)
        return EchoResult(grad_u, (z[0] - z[1]) * sc, (y[0] - y[1]) * sc, grads, s_C, (g_out * u).sum((0, 1)))


class BeforeRHEL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, unit, est, *params):
        with torch.no_grad():
            out, yL, zL = before_trajectory(unit, u)
        ctx.unit, ctx.est = unit, est
        ctx.save_for_backward(u, yL, zL)
        return out

    @staticmethod
    def backward(ctx, g_out):
        u, yL, zL = ctx.saved_tensors
        res = before_echo(ctx.unit, u, yL, zL, g_out, ctx.est.eps, ctx.est.normalize)
        raw = natural_to_raw(ctx.unit, res.natural_grads)
        return (res.grad_u, None, None, *raw, res.grad_C, res.grad_D)


def before_forward(unit, u: Tensor) -> Tensor:
    """The unit's forward as it was (RHEL or BPTT by the unit's estimator; no input checks)."""
    if isinstance(unit.estimator, RHEL) and torch.is_grad_enabled():
        return BeforeRHEL.apply(u, unit, unit.estimator, *unit.hamiltonian_parameters(), unit.C, unit.D)
    return before_trajectory(unit, u)[0]


# --- the measurements -------------------------------------------------------------------------
def outputs_and_grads(forward, unit, u: Tensor, train: bool) -> list[Tensor]:
    if not train:
        with torch.no_grad():
            return [forward(unit, u)]
    x = u.detach().requires_grad_(True)
    out = forward(unit, x)
    loss = out.square().mean()
    return [out.detach(), *torch.autograd.grad(loss, [x, *unit.parameters()])]


def max_rel_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max(((p - q).norm() / q.norm().clamp_min(1e-30)).item() for p, q in zip(a, b))


def case(kind: str, estimator: str, scan: str, L: int, args: argparse.Namespace) -> dict:
    """Before and after for one unit setting: forward (eval, no autograd) or a training step
    (forward, a squared-output loss, backward)."""
    torch.manual_seed(args.seed)
    extra = {} if args.chunk is None else {"chunk": args.chunk}
    unit = make_hru(kind, args.hidden, args.state_size, scan=scan,
                    estimator=estimator if estimator != "eval" else "rhel", **extra)
    u = torch.randn(args.batch, L, args.hidden)
    train = estimator != "eval"

    def after(unit, x):
        return unit(x)

    ref = outputs_and_grads(before_forward, unit, u, train)
    new = outputs_and_grads(after, unit, u, train)
    times = {"before": [], "after": []}
    for _ in range(args.repeats):
        for name, fn in (("before", before_forward), ("after", after)):
            t0 = time.process_time()
            outputs_and_grads(fn, unit, u, train)
            times[name].append(time.process_time() - t0)
    before, after_s = statistics.median(times["before"]), statistics.median(times["after"])
    return {"unit": kind, "estimator": estimator, "scan": scan, "length": L, "before_s": before,
            "after_s": after_s, "speedup": before / after_s, "max_rel_diff": max_rel_diff(new, ref),
            "times_s": times}


def table(result: dict) -> str:
    """The markdown table of docs/sequences.md from a result of this benchmark."""
    lines = ["| L | unit | pass | scan | before s | after s | before / after | parallel: loop / parallel | "
             "max rel. diff |", "|---|---|---|---|---|---|---|---|---|"]
    names = {"eval": "forward (no autograd)", "rhel": "RHEL step", "bptt": "BPTT step"}
    for r in result["rows"]:
        par = f"{r['parallel_over_loop']:.2f}" if "parallel_over_loop" in r else ""
        lines.append(f"| {r['length']} | {r['unit']} | {names[r['estimator']]} | {r['scan']} | {r['before_s']:.3f} | "
                     f"{r['after_s']:.3f} | {r['speedup']:.2f} | {par} | {r['max_rel_diff']:.1e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 784])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--state-size", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=None, help="the units' chunk setting (default: theirs)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--table", type=Path, default=None, help="print the markdown table of a result file and exit")
    args = parser.parse_args(argv)
    if args.table is not None:
        print(table(json.loads(args.table.read_text())))
        return 0
    torch.set_num_threads(1)
    cases = [("linear", est, "loop") for est in ("eval", "rhel", "bptt")]
    cases += [("nonlinear", est, "loop") for est in ("eval", "rhel", "bptt")]
    cases += [("linear", est, "parallel") for est in ("eval", "rhel", "bptt")]
    rows = []
    for L in args.lengths:
        for kind, est, scan in cases:
            row = case(kind, est, scan, L, args)
            rows.append(row)
            print(f"L={L:5d} {kind:9s} {est:4s} {scan:8s} before {row['before_s']:.4f} s  after "
                  f"{row['after_s']:.4f} s  x{row['speedup']:.2f}  max rel diff {row['max_rel_diff']:.1e}", flush=True)
    # the parallel scan against the step loop, both "after" (same process, same sizes)
    for L in args.lengths:
        for est in ("eval", "rhel", "bptt"):
            loop = next(r for r in rows if r["length"] == L and r["estimator"] == est and r["scan"] == "loop"
                        and r["unit"] == "linear")
            par = next(r for r in rows if r["length"] == L and r["estimator"] == est and r["scan"] == "parallel")
            par["parallel_over_loop"] = loop["after_s"] / par["after_s"]
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "table")}
    settings["chunk"] = make_hru("linear", 1, 1, **({} if args.chunk is None else {"chunk": args.chunk})).chunk
    result = {"settings": settings,
              "threads": 1, "clock": "process CPU seconds, median of repeats, before/after alternated",
              "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
