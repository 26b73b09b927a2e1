"""Part `relax`: relaxation throughput, sweeps/s and achieved FLOP/s of the free phase of every
block, sync vs async, float32 vs bfloat16, NCHW vs channels_last (eager `block.relax`), plus
torch.compile'd sweeps with --compile and CUDA graphs on a GPU. FLOPs per sweep come from
the couplings (`eqprop.analysis.splitting.sweep_flops`)."""
from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from eqprop.analysis.splitting import sweep_flops
from eqprop.blocks import EnergyBlock, State
from eqprop.chain import FFEBM

from .common import MODELS, batch, block_inputs, build, timed, wall


def relax_variants(device, compile_: bool) -> list[dict]:
    """The variants timed: every update x dtype x layout eagerly, then compiled and CUDA-graph ones."""
    out = [{"update": u, "dtype": d, "layout": layout, "mode": "eager"}
           for u in ("sync", "async") for d in ("float32", "bfloat16") for layout in ("nchw", "channels_last")]
    if compile_:
        out += [{"update": u, "dtype": d, "layout": "nchw", "mode": "compile"}
                for u in ("sync", "async") for d in ("float32", "bfloat16")]
    if torch.device(device).type == "cuda":
        out += [{"update": u, "dtype": d, "layout": "nchw", "mode": "cuda_graph"}
                for u in ("sync", "async") for d in ("float32", "bfloat16")]
    return out


def sweeps(block: EnergyBlock, u: torch.Tensor, T: int, step: Callable) -> State:
    """T sweeps of `block` from zeros by `step` (the block's `step`), in the block's relaxation
    dtype and without tolerance checks: the loop of `block.relax` as the CUDA-graph variant
    captures it."""
    low = block.relax_dtype
    with torch.no_grad(), torch.autocast(u.device.type, dtype=low, enabled=low is not None):
        uu = u if low is None else u.to(low)
        s, cache = block.init_state(uu), {}
        for _ in range(T):
            s = step(s, uu, None, cache)
    return s


def graph_relax(block: EnergyBlock, u: torch.Tensor, T: int) -> tuple[Callable[[], None], State]:
    """Capture `sweeps(block, u, T)` in a CUDA graph: (its replay, the states it writes).
    The graph reads `block`'s parameters and `u` where they are now: neither may be moved,
    re-laid-out or freed afterwards (the caller captures on a private copy of the model)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sweeps(block, u, 3, block.step)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sweeps(block, u, T, block.step)
    return graph.replay, out


def check_replay(replay: Callable[[], None], out: State, block: EnergyBlock, u: torch.Tensor, T: int) -> float:
    """Replay once and compare the states with the same sweeps run eagerly; returns the largest
    relative difference and raises if the replay disagrees (it read memory it no longer owns)."""
    replay()
    torch.cuda.synchronize()
    eager = sweeps(block, u, T, block.step)
    gap = max(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
              for a, b in zip(out, eager))
    if not gap <= 1e-2:  # bfloat16 sweeps may differ in their last bits between kernels
        raise RuntimeError(f"CUDA graph replay of {block.block_name} differs from eager sweeps (relative gap "
                           f"{gap:.3g})")
    return gap


def configure(model: FFEBM, us: list[torch.Tensor], v: dict) -> list[torch.Tensor]:
    """Put the model in variant v (layout, update, relaxation dtype); returns the inputs."""
    fmt = torch.channels_last if v["layout"] == "channels_last" else torch.contiguous_format
    model.to(memory_format=fmt)
    model.configure_blocks(update=v["update"], relax_dtype=torch.bfloat16 if v["dtype"] == "bfloat16" else None)
    return [u.contiguous(memory_format=fmt) for u in us]


def relax_fn(model: FFEBM, us: list[torch.Tensor], mode: str, T: int) -> Callable[[], object]:
    """One free phase of every block (T sweeps) in the given mode (eager, compile, cuda_graph)."""
    blocks = model.blocks
    if mode == "compile":
        # the library's own compiled path (compile_sweep) on a copy, so later variants stay eager
        twin = copy.deepcopy(model).configure_blocks(compile_sweep=True)
        return lambda: [b.relax(u, T=T, tol=None) for b, u in zip(twin.blocks, us)]
    if mode == "cuda_graph":
        # a private copy: the graphs keep reading its parameters, which later `configure` calls on
        # `model` (memory-format changes reallocate them) would otherwise free under them
        twin = copy.deepcopy(model)
        inputs = [u.clone() for u in us]
        captured = [graph_relax(b, u, T) for b, u in zip(twin.blocks, inputs)]
        gaps = [check_replay(r, out, b, u, T) for (r, out), b, u in zip(captured, twin.blocks, inputs)]
        print(f"cuda_graph: replays equal eager sweeps (largest relative gap {max(gaps):.2g})", flush=True)
        replays = [r for r, _ in captured]
        return lambda keep=(twin, inputs, captured): [r() for r in replays]  # `keep` holds what the graphs read
    return lambda: [b.relax(u, T=T, tol=None) for b, u in zip(blocks, us)]


def part_relax(models, batches, div, device, repeats: int, compile_: bool, sweeps_: int | None) -> list[dict]:
    """Free-phase throughput per variant; the variants are timed in turn within each repeat.
    `sweeps_`: sweeps per timed relaxation (None or 0: the model's T1)."""
    rows = []
    for name in models:
        T = sweeps_ or MODELS[name]["T1"]
        for n in batches:
            x, _ = batch(n, device)
            model = build(name, div, device)
            us = block_inputs(model, x)
            flops = sum(sweep_flops(b, tuple(u.shape[1:]), u.shape[0]) for b, u in zip(model.blocks, us)) * T
            variants = relax_variants(device, compile_)
            fns, firsts = [], []
            for v in variants:  # prepare (compile, capture) and warm up every variant once
                fn = relax_fn(model, configure(model, us, v), v["mode"], T)
                fns.append((v, fn))
                firsts.append(wall(fn, device=device))
            times = [[] for _ in variants]
            for _ in range(repeats):
                for i, (v, fn) in enumerate(fns):
                    configure(model, us, v)
                    times[i].append(timed(fn, device=device))
            configure(model, us, {"layout": "nchw", "update": "async", "dtype": "float32"})
            for (v, _), ts, t_first in zip(fns, times, firsts):
                t, c = min(w for w, _ in ts), min(c for _, c in ts)
                rows.append({"model": name, "batch": n, **v, "sweeps": T, "seconds": t, "cpu_s": c,
                             "first_call_s": t_first, "sweeps_per_s": T / t, "gflops": flops / t / 1e9,
                             "gflop_per_cpu_s": flops / c / 1e9, "flop_per_relax": flops})
                print(f"relax {name} b={n} {v}: {T / t:.1f} sweeps/s, {flops / t / 1e9:.1f} GFLOP/s wall, "
                      f"{flops / c / 1e9:.1f} GFLOP per CPU-s", flush=True)
    return rows
