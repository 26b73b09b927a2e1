#!/usr/bin/env python
"""eqprop benchmark suite: one command, JSON + markdown.

Parts (select with --parts):
  peak     the device's achievable dense FLOP/s: a large matmul and a 3x3 convolution
           (float32 and bfloat16); the reference for the relaxation's efficiency
  step     time of one training step (free phase + gradient + Adam step) for ep, id, bptt
  memory   peak memory of one training step, ep vs bptt (and id) at several T2
  relax    relaxation throughput: sweeps/s and achieved FLOP/s of the free phase, sync vs
           async, float32 vs bfloat16, NCHW vs channels_last (+ torch.compile with
           --compile, + CUDA graphs on a GPU)
  data     the data pipeline's share of a training step (eqprop.data.DeviceLoader)
  proposals (not in the default set) changes proposed for the core library, each timed
           against the current code on the first model: BPTT's unrolled steps with the
           stepper's cache, a hard sigmoid without the multiply at slope 1, un-pooling by one
           scatter, EP's two nudged phases as one stacked batch

Models (SPEC §6): L6 = the 2-block split of the L = 6 DHN (T1 = 60, T2 = 20, slope 1,
GOE V = 8.351e-5); L12 = the 6-block L = 12 scaling chain (T1 = 15, T2 = 5, slope 0.5,
V = 4.9e-5). Centered EP with beta = 0.2 throughout. Inputs are a fixed random batch.

Memory on a CPU: each case runs in a fresh subprocess with glibc's malloc told to serve
every allocation above 64 KiB by mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the
resident set at once; after a warm-up step at T1 = T2 = 1 (Adam state, kernel caches) the
kernel's peak-RSS counter is reset (/proc/self/clear_refs) and the step's peak is VmHWM
minus the resident set before the step. On a GPU: torch.cuda.max_memory_allocated.

    .venv/bin/python benchmarks/run.py                      # everything, default sizes
    .venv/bin/python benchmarks/run.py --parts step,memory  # the core library's benchmark
    .venv/bin/python benchmarks/run.py --quick              # tiny sizes, a smoke test
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))  # run from a checkout without installing

from eqprop.analysis.splitting import sweep_flops  # noqa: E402
from eqprop.blocks import EnergyBlock  # noqa: E402
from eqprop.chain import FFEBM, conv_ffebm  # noqa: E402

MODELS = {
    "L6": dict(blocks=[{"channels": [3, 128, 256, 256], "pools": "mmm"},
                       {"channels": [256, 512, 512], "pools": "m-", "fc": [256]}],
               slope=1.0, variance=8.351e-5, alpha=0.5, T1=60, T2=20),
    "L12": dict(blocks=[{"channels": [3, 128, 128], "pools": "m-"},
                        {"channels": [128, 128, 128], "pools": "--"},
                        {"channels": [128, 256, 256], "pools": "m-"},
                        {"channels": [256, 256, 256], "pools": "--"},
                        {"channels": [256, 512, 512], "pools": "m-"},
                        {"channels": [512, 512, 512], "pools": "--"}],
                slope=0.5, variance=4.9e-5, alpha=0.99, T1=15, T2=5),
}
BETA = 0.2
ESTIMATORS = ("ep", "id", "bptt")


# --- models and timing -----------------------------------------------------------------

def scaled_blocks(blocks: list[dict], div: int) -> list[dict]:
    out = []
    for b in blocks:
        ch = [b["channels"][0] if i == 0 and b is blocks[0] else max(1, c // div) for i, c in enumerate(b["channels"])]
        spec = {"channels": ch, "pools": b["pools"]}
        if b.get("fc"):
            spec["fc"] = [max(1, c // div) for c in b["fc"]]
        out.append(spec)
    return out


def build(name: str, div: int, device, estimator: str = "ep", T2: int | None = None, seed: int = 0) -> FFEBM:
    cfg = MODELS[name]
    T2 = cfg["T2"] if T2 is None else T2
    torch.manual_seed(seed)
    model = conv_ffebm(scaled_blocks(cfg["blocks"], div), slope=cfg["slope"], variance=cfg["variance"],
                       alpha=cfg["alpha"], T1=cfg["T1"], update="async")
    set_estimator(model, estimator, T2)
    return model.to(device).train()


def set_estimator(model: FFEBM, estimator: str, T2: int) -> None:
    kw = {"ep": {"beta": BETA, "T2": T2}, "bptt": {"T2": T2}, "id": {}}[estimator]
    model.set_estimator(estimator, **kw)


def batch(n: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    """Wall seconds of fn() (device synchronised)."""
    return timed2(fn, device)[0]


def timed2(fn, device) -> tuple[float, float]:
    """(wall, process CPU) seconds of fn(). CPU time counts only this process' threads, so
    on a shared machine it moves less with other programs' load than wall time does."""
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - w0, time.process_time() - c0


def train_step(model, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def block_inputs(model: FFEBM, x) -> list[torch.Tensor]:
    """The input current of every block at this batch (feedforward maps only, T1 = 1)."""
    us, hooks = [], [b.register_forward_pre_hook(lambda m, a: us.append(a[0].detach())) for b in model.blocks]
    saved = [b.T1 for b in model.blocks]
    try:
        for b in model.blocks:
            b.T1 = 1
        with torch.no_grad():
            model(x)
    finally:
        for b, t in zip(model.blocks, saved):
            b.T1 = t
        for h in hooks:
            h.remove()
    return us


def coupling_flops(block: EnergyBlock, u: torch.Tensor) -> int:
    """FLOPs of one sweep of `block` at input current u: every coupling's map and its
    adjoint (2 per multiply-add). With the stepper's memoisation each runs once per sweep,
    in sync and async mode alike; pooling, activations and additions are not counted."""
    return sweep_flops(block, tuple(u.shape[1:]), u.shape[0])


# --- parts -------------------------------------------------------------------------------

def part_peak(device, repeats: int) -> dict:
    """Achievable dense FLOP/s: matmul 4096^2 (2048^2 on CPU) and a 3x3 conv 128->256 at 16x16."""
    out = {}
    cpu = torch.device(device).type == "cpu"
    n = 2048 if cpu else 8192
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        ts = [timed2(lambda: a @ b, device) for _ in range(repeats + 2)]
        t, c = min(w for w, _ in ts), min(c for _, c in ts)
        out[f"matmul_{str(dtype)[6:]}"] = {"size": n, "seconds": t, "gflops": 2 * n ** 3 / t / 1e9,
                                          "gflop_per_cpu_s": 2 * n ** 3 / c / 1e9}
        nb = 64 if cpu else 256
        x = torch.randn(nb, 128, 16, 16, device=device, dtype=dtype)
        w = torch.randn(256, 128, 3, 3, device=device, dtype=dtype)
        for layout in ("nchw", "channels_last"):
            xx, ww = (x, w) if layout == "nchw" else (x.to(memory_format=torch.channels_last),
                                                      w.to(memory_format=torch.channels_last))
            F.conv2d(xx, ww, padding=1)
            ts = [timed2(lambda: F.conv2d(xx, ww, padding=1), device) for _ in range(repeats + 2)]
            t, c = min(w for w, _ in ts), min(c for _, c in ts)
            flops = 2 * nb * 128 * 256 * 9 * 16 * 16
            out[f"conv_{str(dtype)[6:]}_{layout}"] = {"batch": nb, "seconds": t, "gflops": flops / t / 1e9,
                                                      "gflop_per_cpu_s": flops / c / 1e9}
    return out


def part_step(models, batches, div, device, repeats: int) -> list[dict]:
    rows = []
    for name in models:
        for n in batches:
            x, y = batch(n, device)
            model = build(name, div, device)
            opt = torch.optim.Adam(model.parameters(), lr=1e-5)
            times = {e: [] for e in ESTIMATORS}
            cpu = {e: [] for e in ESTIMATORS}
            info = {}
            model.configure_blocks(T1=1)
            for e in ESTIMATORS:  # a cheap warm-up at T1 = T2 = 1: allocations, Adam state, kernels
                set_estimator(model, e, 1)
                train_step(model, opt, x, y)
            model.configure_blocks(T1=MODELS[name]["T1"])
            for _ in range(repeats):  # interleaved, so load changes hit all three alike
                for e in ESTIMATORS:
                    set_estimator(model, e, MODELS[name]["T2"])
                    wall, c = timed2(lambda: train_step(model, opt, x, y), device)
                    times[e].append(wall)
                    cpu[e].append(c)
                    info[e] = model.relax_stats()
            for e in ESTIMATORS:
                rows.append({"model": name, "batch": n, "estimator": e, "min_s": min(times[e]),
                             "median_s": statistics.median(times[e]), "times_s": times[e],
                             "cpu_min_s": min(cpu[e]), "cpu_s": cpu[e],
                             "T1": MODELS[name]["T1"], "T2": MODELS[name]["T2"],
                             "iters": [{k: v["iters"] for k, v in b.items()} for b in info[e]]})
                print(f"step {name} b={n} {e}: {min(times[e]):.3f}s wall, {min(cpu[e]):.3f}s CPU", flush=True)
    return rows


def memory_case(spec: dict) -> dict:
    """One memory measurement (run in a fresh process)."""
    device = spec["device"]
    model = build(spec["model"], spec["div"], device, spec["estimator"], spec["T2"])
    x, y = batch(spec["batch"], device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    cfg = MODELS[spec["model"]]
    # Warm-up at T1 = T2 = 1: Adam state and kernel caches exist before the measured step.
    model.configure_blocks(T1=1)
    set_estimator(model, spec["estimator"], 1)
    train_step(model, opt, x, y)
    model.configure_blocks(T1=cfg["T1"])
    set_estimator(model, spec["estimator"], spec["T2"])
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = timed(lambda: train_step(model, opt, x, y), device)
        peak = torch.cuda.max_memory_allocated()
        return {"peak_mib": (peak - base) / 2 ** 20, "total_peak_mib": peak / 2 ** 20, "seconds": t,
                "method": "torch.cuda.max_memory_allocated"}
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    t = timed(lambda: train_step(model, opt, x, y), device)
    hwm = _status_kib("VmHWM")
    return {"peak_mib": (hwm - base) / 1024, "total_peak_mib": hwm / 1024, "seconds": t,
            "method": "VmHWM - VmRSS around the step (fresh process, MALLOC_MMAP_THRESHOLD_=65536)"}


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def part_memory(models, batches, div, device, t2s, estimators) -> list[dict]:
    rows = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    for name in models:
        for n in batches:
            for e in estimators:
                for T2 in (t2s if e != "id" else [None]):
                    spec = {"model": name, "batch": n, "estimator": e, "T2": T2 or MODELS[name]["T2"],
                            "div": div, "device": device, "threads": torch.get_num_threads()}
                    cmd = [sys.executable, os.path.abspath(__file__), "--memory-case", json.dumps(spec)]
                    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
                    if res.returncode != 0:
                        raise RuntimeError(f"memory case {spec} failed:\n{res.stderr[-2000:]}")
                    out = json.loads(res.stdout.strip().splitlines()[-1])
                    rows.append({**spec, **out, "T2": T2})
                    print(f"memory {name} b={n} {e} T2={T2}: {out['peak_mib']:.1f} MiB", flush=True)
    return rows


def relax_variants(device, compile_: bool) -> list[dict]:
    cuda = torch.device(device).type == "cuda"
    out = []
    for update in ("sync", "async"):
        for dtype in ("float32", "bfloat16"):
            for layout in ("nchw", "channels_last"):
                out.append({"update": update, "dtype": dtype, "layout": layout, "mode": "eager"})
    if compile_:
        out += [{"update": u, "dtype": d, "layout": "nchw", "mode": "compile"}
                for u in ("sync", "async") for d in ("float32", "bfloat16")]
    if cuda:
        out += [{"update": u, "dtype": d, "layout": "nchw", "mode": "cuda_graph"}
                for u in ("sync", "async") for d in ("float32", "bfloat16")]
    return out


def _graph_relax(block: EnergyBlock, u: torch.Tensor, T: int):
    """Capture T sweeps of `block` from zeros in a CUDA graph; returns a replay function."""
    static_u = u.clone() if block.relax_dtype is None else u.to(block.relax_dtype)
    s0 = block.init_state(static_u)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad(), _autocast(block, static_u):
        cur, cache = s0, {}
        for _ in range(3):
            cur = block.step(cur, static_u, None, cache)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), _autocast(block, static_u), torch.cuda.graph(graph):
        cur, cache = s0, {}
        for _ in range(T):
            cur = block.step(cur, static_u, None, cache)
    return graph.replay


def _autocast(block: EnergyBlock, u):
    if block.relax_dtype is None:
        return torch.autocast(u.device.type, enabled=False)
    return torch.autocast(u.device.type, dtype=block.relax_dtype)


def _configure(model: FFEBM, us: list[torch.Tensor], v: dict) -> list[torch.Tensor]:
    """Put the model in variant v (layout, update, relaxation dtype); returns the inputs."""
    fmt = torch.channels_last if v["layout"] == "channels_last" else torch.contiguous_format
    model.to(memory_format=fmt)
    for b in model.blocks:
        b.update = v["update"]
        b.relax_dtype = torch.bfloat16 if v["dtype"] == "bfloat16" else None
    return [u.contiguous(memory_format=fmt) for u in us]


def part_relax(models, batches, div, device, repeats: int, compile_: bool, sweeps: int | None) -> list[dict]:
    """Free-phase throughput per variant; the variants are timed in turn within each repeat."""
    rows = []
    for name in models:
        T = sweeps or MODELS[name]["T1"]
        for n in batches:
            x, _ = batch(n, device)
            model = build(name, div, device)
            us = block_inputs(model, x)
            flops = sum(coupling_flops(b, u) for b, u in zip(model.blocks, us)) * T
            variants = relax_variants(device, compile_)
            fns, firsts = [], []
            for v in variants:  # prepare (compile, capture) and warm up every variant once
                uu = _configure(model, us, v)
                if v["mode"] == "compile":
                    steps = [torch.compile(b.step, dynamic=False) for b in model.blocks]
                else:
                    steps = [None] * len(model.blocks)
                if v["mode"] == "cuda_graph":
                    replays = [_graph_relax(b, u, T) for b, u in zip(model.blocks, uu)]
                    fn = (lambda r=replays: [f() for f in r])
                else:
                    fn = (lambda uu=uu: [b.relax(u, T=T, tol=None) for b, u in zip(model.blocks, uu)])
                fns.append((v, steps, fn))
                firsts.append(timed(lambda: _with_steps(model, steps, fn), device))
            times = [[] for _ in variants]
            for _ in range(repeats):
                for i, (v, steps, fn) in enumerate(fns):
                    _configure(model, us, v)
                    times[i].append(timed2(lambda: _with_steps(model, steps, fn), device))
            _configure(model, us, {"layout": "nchw", "update": "async", "dtype": "float32"})
            for (v, _, _), ts, t_first in zip(fns, times, firsts):
                t, c = min(w for w, _ in ts), min(c for _, c in ts)
                rows.append({"model": name, "batch": n, **v, "sweeps": T, "seconds": t, "cpu_s": c,
                             "first_call_s": t_first, "sweeps_per_s": T / t, "gflops": flops / t / 1e9,
                             "gflop_per_cpu_s": flops / c / 1e9, "flop_per_relax": flops})
                print(f"relax {name} b={n} {v}: {T / t:.1f} sweeps/s, {flops / t / 1e9:.1f} GFLOP/s wall, "
                      f"{flops / c / 1e9:.1f} GFLOP per CPU-s", flush=True)
    return rows


def _with_steps(model: FFEBM, steps: list, fn):
    """Run fn with each block's `step` replaced by the given callable (None: the method)."""
    try:
        for b, st in zip(model.blocks, steps):
            if st is not None:
                b.step = st
        return fn()
    finally:
        for b, st in zip(model.blocks, steps):
            if st is not None:
                del b.step


def part_data(models, batches, div, device, repeats: int) -> list[dict]:
    try:
        from eqprop.data import Dataset, DeviceLoader, default_std_factor
    except ImportError as e:
        print(f"data: skipped, eqprop.data.DeviceLoader is not available ({e})")
        return []
    rows = []
    for name in models:
        for n in batches:
            g = torch.Generator().manual_seed(0)
            num = max(64 * n, 2048)
            ds = Dataset(x=torch.randint(0, 256, (num, 3, 32, 32), dtype=torch.uint8, generator=g),
                         y=torch.randint(0, 10, (num,), generator=g), num_classes=10,
                         mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), name="cifar10", kind="image",
                         source="synthetic CIFAR-shaped uint8")
            loader = DeviceLoader(ds, n, train=True, device=device, std_factor=default_std_factor("cifar10"))
            k = min(len(loader), 50)

            def draw():
                it = iter(loader)
                for _ in range(k):
                    next(it)
            t_data = min(timed(draw, device) for _ in range(repeats + 1)) / k
            model = build(name, div, device)
            opt = torch.optim.Adam(model.parameters(), lr=1e-5)
            xb, yb = next(iter(loader))
            train_step(model, opt, xb, yb)
            t_step = min(timed(lambda: train_step(model, opt, xb, yb), device) for _ in range(repeats))
            rows.append({"model": name, "batch": n, "batch_s": t_data, "step_s": t_step,
                         "share": t_data / (t_data + t_step), "augment": loader.augment})
            print(f"data {name} b={n}: {t_data * 1e3:.2f} ms per batch, {100 * t_data / (t_data + t_step):.3f}% "
                  f"of a step", flush=True)
    return rows


# --- proposed core changes, measured against the current code -----------------------------

def _bptt_attach_cached(self, block, u, s):
    """BPTT.attach with the stepper's memoisation cache passed to every step."""
    self.validate()
    if not torch.is_grad_enabled():
        return s[-1]
    s = [x.detach() for x in s]
    cache: dict = {}
    for _ in range(self.T2):
        s = block.step(s, u, None, cache)
    return s[-1]


def _hardsigmoid_skip_unit_slope(self, z):
    """HardSigmoid without the multiplication when the slope is 1."""
    return z.clamp(0.0, 1.0) if self.slope == 1.0 else (z * self.slope).clamp_(0.0, 1.0)


def _adjoint_scatter_unpool(self, y, aux, x_shape):
    """ConvCoupling.adjoint with the un-pooling done by one scatter into zeros."""
    if self.pool:
        idx, z_shape = aux
        n, c, h, w = z_shape
        y = y.new_zeros((n, c, h * w)).scatter_(2, idx.flatten(2), y.flatten(2)).view(z_shape)
    return F.conv_transpose2d(y, self.conv.weight, None, padding=self.conv.padding)


class _Switch:
    """A flag the proposals part patches like any attribute."""

    on = False


def part_proposals(name: str, n: int, div: int, device, repeats: int) -> list[dict]:
    """Each proposed change against the current code, timed in turn (wall and CPU), with the
    largest difference of the results (0 means identical)."""
    from eqprop import activations, couplings, estimators

    rows = []
    x, y = batch(n, device)
    model = build(name, div, device)
    us = block_inputs(model, x)

    def compare(label: str, cases: list[tuple[str, dict]], fn, outputs):
        """cases: (name, {(owner, attr): replacement}); fn() runs one case."""
        times = {c: [] for c, _ in cases}
        results = {}
        for r in range(repeats + 1):
            for case, patches in cases:
                saved = {k: getattr(*k) for k in patches}
                try:
                    for (owner, attr), new in patches.items():
                        setattr(owner, attr, new)
                    if r == 0:  # warm-up, and the result to compare
                        results[case] = outputs(fn())
                    else:
                        times[case].append(timed2(fn, device))
                finally:
                    for (owner, attr), old in saved.items():
                        setattr(owner, attr, old)
        base = cases[0][0]
        for case, _ in cases:
            diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(results[base], results[case]))
            w, c = min(t[0] for t in times[case]), min(t[1] for t in times[case])
            rows.append({"model": name, "batch": n, "what": label, "case": case, "wall_s": w, "cpu_s": c,
                         "max_abs_diff_vs_current": diff})
            print(f"proposals {label} / {case}: {w:.3f}s wall, {c:.3f}s CPU, max diff {diff:.2e}", flush=True)

    # 1. BPTT's unrolled steps without / with the memoisation cache (one training step).
    set_estimator(model, "bptt", MODELS[name]["T2"])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def grads():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        return [p.grad.detach().clone() for p in model.parameters()]
    compare("bptt step", [("current", {}),
                          ("stepper cache", {(estimators.BPTT, "attach"): _bptt_attach_cached})],
            grads, lambda g: g)
    # 2. The free phase (10 sweeps, async) with cheaper activation and un-pooling.
    for dtype in (None, torch.bfloat16):
        for b in model.blocks:
            b.relax_dtype = dtype

        def relax():
            return [t for b, u in zip(model.blocks, us) for t in b.relax(u, T=10, tol=None)[0]]
        compare(f"relax {'bfloat16' if dtype else 'float32'}", [
            ("current", {}),
            ("slope-1 skip", {(activations.HardSigmoid, "__call__"): _hardsigmoid_skip_unit_slope}),
            ("scatter unpool", {(couplings.ConvCoupling, "adjoint"): _adjoint_scatter_unpool}),
            ("both", {(activations.HardSigmoid, "__call__"): _hardsigmoid_skip_unit_slope,
                      (couplings.ConvCoupling, "adjoint"): _adjoint_scatter_unpool})], relax, lambda o: o)
    for b in model.blocks:
        b.relax_dtype = None
    # 3. EP's two nudged phases: two relaxations of the batch, or one of the batch stacked twice.
    from eqprop.estimators import _like, error_scale
    frees = [b.relax(u, T=MODELS[name]["T1"], tol=None)[0] for b, u in zip(model.blocks, us)]
    g = torch.Generator().manual_seed(1)
    deltas = []
    for s in frees:
        d = torch.randn(s[-1].shape, generator=g).to(device)
        deltas.append(d / _like(error_scale(d, "sample"), d))
    T2 = MODELS[name]["T2"]
    beta = BETA
    stacked = _Switch()

    def nudged():
        out = []
        for b, u, s, d in zip(model.blocks, us, frees, deltas):
            if stacked.on:
                st, _ = b.relax(torch.cat([u, u]), [torch.cat([t, t]) for t in s], T=T2, tol=None,
                                nudge=torch.cat([-beta * d, beta * d]))
                out += [t for t in st]
            else:
                p, _ = b.relax(u, s, T=T2, tol=None, nudge=-beta * d)
                q, _ = b.relax(u, s, T=T2, tol=None, nudge=beta * d)
                out += [torch.cat([a, c]) for a, c in zip(p, q)]
        return out
    compare("ep nudged phases", [("current (two relaxations)", {}),
                                 ("stacked batch", {(stacked, "on"): True})], nudged, lambda o: o)
    return rows


# --- report --------------------------------------------------------------------------------

def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"# eqprop benchmarks: {m['device_name']}", "",
             f"{m['date']}; torch {m['torch']}; {m['threads']} threads; width divisor {m['width_div']}; "
             f"load average {m['load_before']} before, {m['load_after']} after; `{m['command']}`", ""]
    if res.get("peak"):
        lines += ["## Achievable dense FLOP/s (reference peak)", "", "| kernel | GFLOP/s (wall) | GFLOP per CPU-s |",
                  "|---|---|---|"]
        lines += [f"| {k} | {v['gflops']:.1f} | {v['gflop_per_cpu_s']:.1f} |" for k, v in res["peak"].items()]
        ref, refc = res["peak_ref_gflops"], res["peak_ref_gflop_per_cpu_s"]
        lines += ["", f"Reference peak, the best kernel above: {ref['float32']:.1f} GFLOP/s float32, "
                      f"{ref['bfloat16']:.1f} GFLOP/s bfloat16 (per CPU-second: {refc['float32']:.1f} and "
                      f"{refc['bfloat16']:.1f}).", ""]
    if res.get("step"):
        lines += ["## Training step (free phase + gradient + Adam step)", "",
                  "| model | batch | estimator | T1 | T2 | wall min (s) | wall median (s) | CPU min (s) | "
                  "wall vs bptt | CPU vs bptt |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["step"]:
            ref = next(q for q in res["step"] if q["model"] == r["model"] and q["batch"] == r["batch"]
                       and q["estimator"] == "bptt")
            lines.append(f"| {r['model']} | {r['batch']} | {r['estimator']} | {r['T1']} | {r['T2']} | "
                         f"{r['min_s']:.3f} | {r['median_s']:.3f} | {r['cpu_min_s']:.3f} | "
                         f"{r['min_s'] / ref['min_s']:.2f} | {r['cpu_min_s'] / ref['cpu_min_s']:.2f} |")
        lines.append("")
    if res.get("memory"):
        lines += ["## Peak memory of one training step", "", "| model | batch | estimator | T2 | step peak (MiB) | "
                  "process peak (MiB) | step time (s) |", "|---|---|---|---|---|---|---|"]
        for r in res["memory"]:
            lines.append(f"| {r['model']} | {r['batch']} | {r['estimator']} | {r['T2'] if r['T2'] else '-'} | "
                         f"{r['peak_mib']:.1f} | {r['total_peak_mib']:.1f} | {r['seconds']:.2f} |")
        lines += ["", f"Method: {res['memory'][0]['method']}.", ""]
    if res.get("relax"):
        lines += ["## Relaxation throughput (free phase of every block, a fixed number of sweeps)", "",
                  "| model | batch | update | dtype | layout | mode | sweeps/s | GFLOP/s | % of peak | "
                  "GFLOP per CPU-s | % of peak per CPU-s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["relax"]:
            peak = res.get("peak_ref_gflops", {}).get(r["dtype"])
            peakc = res.get("peak_ref_gflop_per_cpu_s", {}).get(r["dtype"])
            pct = f"{100 * r['gflops'] / peak:.1f}" if peak else "n/a"
            pctc = f"{100 * r['gflop_per_cpu_s'] / peakc:.1f}" if peakc else "n/a"
            lines.append(f"| {r['model']} | {r['batch']} | {r['update']} | {r['dtype']} | {r['layout']} | {r['mode']} | "
                         f"{r['sweeps_per_s']:.2f} | {r['gflops']:.1f} | {pct} | {r['gflop_per_cpu_s']:.1f} | {pctc} |")
        lines.append("")
    if res.get("proposals"):
        lines += ["## Proposed core changes against the current code", "",
                  "| model | batch | what | case | wall (s) | CPU (s) | CPU vs current | max abs. difference |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in res["proposals"]:
            cur = next(q for q in res["proposals"] if q["what"] == r["what"])
            lines.append(f"| {r['model']} | {r['batch']} | {r['what']} | {r['case']} | {r['wall_s']:.3f} | "
                         f"{r['cpu_s']:.3f} | {r['cpu_s'] / cur['cpu_s']:.2f} | {r['max_abs_diff_vs_current']:.1e} |")
        lines.append("")
    if res.get("data"):
        lines += ["## Data pipeline share of a step (DeviceLoader, augmentation on)", "",
                  "| model | batch | batch time (ms) | ep step (s) | share |", "|---|---|---|---|---|"]
        for r in res["data"]:
            lines.append(f"| {r['model']} | {r['batch']} | {1e3 * r['batch_s']:.3f} | {r['step_s']:.3f} | "
                         f"{100 * r['share']:.3f}% |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="peak,step,memory,relax,data")
    p.add_argument("--models", default="L6,L12")
    p.add_argument("--batch", default=None, help="comma-separated batch sizes (default 16 on CPU, 128,256 on GPU)")
    p.add_argument("--width-div", type=int, default=1, help="divide every width by this (1: the published widths)")
    p.add_argument("--repeats", type=int, default=2, help="timed repeats per case (the minimum is reported)")
    p.add_argument("--memory-T2", default="5,20,40", help="T2 values of the memory part")
    p.add_argument("--memory-models", default="L6", help="models of the memory part")
    p.add_argument("--compile", action="store_true", help="add torch.compile variants to the relax part")
    p.add_argument("--relax-sweeps", type=int, default=10,
                   help="sweeps per timed relaxation in the relax part (0: the model's T1)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: torch's)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: width /16, batch 4, 1 repeat (a smoke test)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder")
    p.add_argument("--tag", default=None, help="file stem (default: cpu or the GPU's name)")
    p.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_case:
        spec = json.loads(args.memory_case)
        torch.set_num_threads(spec["threads"])
        print(json.dumps(memory_case(spec)))
        return 0
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    div, repeats = (16, 1) if args.quick else (args.width_div, args.repeats)
    batches = [int(b) for b in (args.batch or ("4" if args.quick else "128,256" if cuda else "16")).split(",")]
    models = args.models.split(",")
    for m in models + args.memory_models.split(","):
        if m not in MODELS:
            raise SystemExit(f"benchmarks: unknown model {m!r}, expected one of {sorted(MODELS)}")
    parts = args.parts.split(",")
    unknown = set(parts) - {"peak", "step", "memory", "relax", "data", "proposals"}
    if unknown:
        raise SystemExit(f"benchmarks: unknown part(s) {sorted(unknown)}")
    name = torch.cuda.get_device_name() if cuda else (_cpu_name() or platform.processor() or "cpu")
    meta = {"device": device, "device_name": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "width_div": div, "batches": batches, "repeats": repeats, "python": platform.python_version(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "load_before": _load(),
            "command": " ".join(["benchmarks/run.py"] + (sys.argv[1:] if argv is None else list(argv)))}
    t0 = time.time()
    res: dict = {"meta": meta}
    if "peak" in parts:
        res["peak"] = part_peak(device, repeats)
        res["peak_ref_gflops"] = {d: max(v["gflops"] for k, v in res["peak"].items() if d in k)
                                  for d in ("float32", "bfloat16")}
        res["peak_ref_gflop_per_cpu_s"] = {d: max(v["gflop_per_cpu_s"] for k, v in res["peak"].items() if d in k)
                                           for d in ("float32", "bfloat16")}
    if "step" in parts:
        res["step"] = part_step(models, batches, div, device, repeats)
    if "memory" in parts:
        t2s = [int(v) for v in args.memory_T2.split(",")]
        res["memory"] = part_memory(args.memory_models.split(","), batches[:1], div, device, t2s, ("ep", "bptt", "id"))
    if "relax" in parts:
        res["relax"] = part_relax(models, batches, div, device, repeats, args.compile, args.relax_sweeps)
    if "data" in parts:
        res["data"] = part_data(models[:1], batches, div, device, repeats)
    if "proposals" in parts:
        res["proposals"] = part_proposals(models[0], batches[0], div, device, max(repeats, 2))
    meta["load_after"] = _load()
    meta["wall_s"] = time.time() - t0
    tag = args.tag or ("cpu" if not cuda else name.replace(" ", "_"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{tag}.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, f"{tag}.md"), "w") as f:
        f.write(markdown(res) + "\n")
    print(markdown(res))
    print(f"wrote {os.path.join(args.out, tag)}.json/.md in {meta['wall_s']:.0f}s")
    return 0


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        return None
    return None


def _load() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


if __name__ == "__main__":
    sys.exit(main())
