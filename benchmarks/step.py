"""Part `step`: time of one training step (free phase + gradient + Adam step) per estimator.

`python -m benchmarks.step` times settings side by side instead (layout, tolerances, estimator,
relaxation dtype): every variant of one model in the same process, in turn, with the cosine of
its gradient to the first variant's (docs/performance.md, "Recommended settings").
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from eqprop.training.runinfo import cpu_model

from .common import BETA, ESTIMATORS, MODELS, batch, build, timed, train_step, use_estimator


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


# ---- settings side by side: one model, several variants of the same training step -----------

# Each variant: layout ('nchw' or 'channels_last': parameters and input), tol (the free phase's,
# block.tol), ep_tol (EP's nudged phases), estimator ('ep' or 'id'), relax_dtype, and the
# relaxation solver (block.anderson, block.omega: every relaxation of the block, nudged ones too);
# compile: block.compile_sweep (compiled during the untimed gradient pass of each variant).
VARIANTS = {
    "f32": {},
    "f32_cl": {"layout": "channels_last"},
    "f32_cl_tol1e-5": {"layout": "channels_last", "tol": 1e-5, "ep_tol": 1e-5},
    "f32_cl_tol1e-6": {"layout": "channels_last", "tol": 1e-6, "ep_tol": 1e-6},
    "f32_tol1e-5": {"tol": 1e-5, "ep_tol": 1e-5},
    "id": {"estimator": "id"},
    "id_cl": {"layout": "channels_last", "estimator": "id"},
    "id_cl_tol1e-5": {"layout": "channels_last", "tol": 1e-5, "estimator": "id"},
    "bf16_cl": {"layout": "channels_last", "relax_dtype": "bfloat16"},
    "f32_cl_tol1e-5_aa5": {"layout": "channels_last", "tol": 1e-5, "ep_tol": 1e-5, "anderson": 5},
    "f32_cl_tol1e-5_sor1.2": {"layout": "channels_last", "tol": 1e-5, "ep_tol": 1e-5, "omega": 1.2},
    "id_cl_tol1e-5_aa5": {"layout": "channels_last", "tol": 1e-5, "estimator": "id", "anderson": 5},
    "f32_cl_tol1e-5_mirror": {"layout": "channels_last", "tol": 1e-5, "ep_tol": 1e-5, "mirror": True},
    "f32_cl_tol1e-5_sor1.2_mirror": {"layout": "channels_last", "tol": 1e-5, "ep_tol": 1e-5, "omega": 1.2,
                                     "mirror": True},
    "f32_cl_tol1e-5_ep1e-4": {"layout": "channels_last", "tol": 1e-5, "ep_tol": 1e-4},
    "f32_cl_tol1e-5_ep1e-4_sor1.2": {"layout": "channels_last", "tol": 1e-5, "ep_tol": 1e-4, "omega": 1.2},
    "f32_cl_tol1e-5_ep1e-4_mirror": {"layout": "channels_last", "tol": 1e-5, "ep_tol": 1e-4, "mirror": True},
    "f32_cl_tol1e-5_sor1.4": {"layout": "channels_last", "tol": 1e-5, "ep_tol": 1e-5, "omega": 1.4},
    "id_cl_tol1e-5_sor1.2": {"layout": "channels_last", "tol": 1e-5, "estimator": "id", "omega": 1.2},
    "id_cl_tol1e-5_sor1.4": {"layout": "channels_last", "tol": 1e-5, "estimator": "id", "omega": 1.4},
    "f32_cl_tol1e-5_sor1.2_mirror_compile": {"layout": "channels_last", "tol": 1e-5, "ep_tol": 1e-5, "omega": 1.2,
                                             "mirror": True, "compile": True},
    "f32_cl_tol1e-5_ep1e-4_sor1.2_compile": {"layout": "channels_last", "tol": 1e-5, "ep_tol": 1e-4, "omega": 1.2,
                                             "compile": True},
    "f32_cl_tol1e-5_ep1e-4_sor1.2_mirror": {"layout": "channels_last", "tol": 1e-5, "ep_tol": 1e-4, "omega": 1.2,
                                            "mirror": True},
    "f32_cl_tol1e-5_ep1e-3_sor1.2": {"layout": "channels_last", "tol": 1e-5, "ep_tol": 1e-3, "omega": 1.2},
    "f32_cl_tol1e-4_ep1e-4_sor1.2": {"layout": "channels_last", "tol": 1e-4, "ep_tol": 1e-4, "omega": 1.2},
    "f32_cl_tol1e-5_ep1e-4_sor1.4": {"layout": "channels_last", "tol": 1e-5, "ep_tol": 1e-4, "omega": 1.4},
    "bf16_cl_tol1e-5_ep1e-4_mirror": {"layout": "channels_last", "relax_dtype": "bfloat16", "tol": 1e-5,
                                      "ep_tol": 1e-4, "mirror": True},
    "bf16_cl_tol1e-5_ep1e-4_sor1.2": {"layout": "channels_last", "relax_dtype": "bfloat16", "tol": 1e-5,
                                      "ep_tol": 1e-4, "omega": 1.2},
    "f32_cl_tol1e-5_mirror_compile": {"layout": "channels_last", "tol": 1e-5, "ep_tol": 1e-5, "mirror": True,
                                      "compile": True},
}


def apply_variant(model, x: torch.Tensor, v: dict, T2: int) -> torch.Tensor:
    """Put `model` in variant v (in place); returns the input in the variant's layout."""
    fmt = torch.channels_last if v.get("layout") == "channels_last" else torch.contiguous_format
    model.to(memory_format=fmt)
    dtype = v.get("relax_dtype")
    model.configure_blocks(tol=v.get("tol"), relax_dtype=None if dtype is None else getattr(torch, dtype),
                           anderson=v.get("anderson", 0), omega=v.get("omega", 1.0),
                           compile_sweep=v.get("compile", False))
    if v.get("estimator", "ep") == "ep":
        model.set_estimator("ep", beta=BETA, T2=T2, tol=v.get("ep_tol"), mirror=v.get("mirror", False))
    else:
        model.set_estimator("id")
    return x.contiguous(memory_format=fmt)


def flat_gradient(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Every parameter's gradient of one forward/backward, concatenated (no optimiser step)."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def part_variants(models, variants, n: int, repeats: int, device="cpu", seed: int = 0, div: int = 1) -> list[dict]:
    """Per model (widths divided by `div`), the training step of every variant (process CPU and
    wall seconds; the variants are timed in turn within each repeat, so load changes hit all
    alike) and the cosine of its gradient, at the initial parameters, to the first variant's."""
    rows = []
    for name in models:
        T1, T2 = MODELS[name]["T1"], MODELS[name]["T2"]
        x, y = batch(n, device, seed)
        model = build(name, div, device, seed=seed)
        start = copy.deepcopy(model.state_dict())
        grads, stats = {}, {}
        for v in variants:  # gradients at the same parameters (and a warm-up of each variant)
            model.load_state_dict(start)
            xv = apply_variant(model, x, VARIANTS[v], T2)
            grads[v] = flat_gradient(model, xv, y).double()
            stats[v] = model.relax_stats()
        model.load_state_dict(start)
        opt = torch.optim.Adam(model.parameters(), lr=1e-5)
        cpu = {v: [] for v in variants}
        wall_s = {v: [] for v in variants}
        timed_iters = {v: [] for v in variants}
        for _ in range(repeats):
            for v in variants:
                xv = apply_variant(model, x, VARIANTS[v], T2)
                w, c = timed(train_step, model, opt, xv, y, device=device)
                wall_s[v].append(w)
                cpu[v].append(c)
                timed_iters[v].append([{k: s["iters"] for k, s in b.items()} for b in model.relax_stats()])
        ref = grads[variants[0]]
        for v in variants:
            cos = float(torch.dot(grads[v], ref) / (grads[v].norm() * ref.norm()).clamp_min(1e-300))
            rows.append({"model": name, "batch": n, "variant": v, **VARIANTS[v], "T1": T1, "T2": T2,
                         "cpu_median_s": statistics.median(cpu[v]), "cpu_s": cpu[v],
                         "wall_median_s": statistics.median(wall_s[v]), "wall_s": wall_s[v],
                         "cos_to_first": cos, "iters": [{k: s["iters"] for k, s in b.items()} for b in stats[v]],
                         "iters_timed": timed_iters[v]})
            print(f"{name} {v}: {statistics.median(cpu[v]):.2f} s CPU (median of {repeats}), cos {cos:.6f}, "
                  f"iters {rows[-1]['iters']}", flush=True)
    return rows


def markdown_variants(rows: list[dict]) -> str:
    """The side-by-side table: CPU seconds per step, ratio to the first variant, cosine."""
    out = ["| model | variant | CPU s (median) | wall s (median) | / first | gradient cos to first | "
           "iterations (per block) |", "|---|---|---|---|---|---|---|"]
    first = {}
    for r in rows:
        first.setdefault(r["model"], r["cpu_median_s"])
        its = "; ".join(", ".join(f"{k} {v}" for k, v in b.items()) for b in r["iters"])
        out.append(f"| {r['model']} | {r['variant']} | {r['cpu_median_s']:.2f} | {r['wall_median_s']:.2f} | "
                   f"{r['cpu_median_s'] / first[r['model']]:.2f} | {r['cos_to_first']:.6f} | {its} |")
    return "\n".join(out)


def kernel_times(n: int = 16, repeats: int = 5) -> list[dict]:
    """Milliseconds (process CPU, median of `repeats`) of the kernels of one sweep of the 3-block
    L6's first block (3x3 convolution 128 -> 256 at 16x16, its transpose, the 2x2 max-pool with
    indices and the un-pooling), per layout and dtype."""
    from eqprop.couplings import unpool

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for layout in ("nchw", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            g = torch.Generator().manual_seed(0)
            x = torch.randn(n, 128, 16, 16, generator=g).to(dtype).contiguous(memory_format=fmt)
            w = (torch.randn(256, 128, 3, 3, generator=g) * 0.01).to(dtype).contiguous(memory_format=fmt)
            z = F.conv2d(x, w, padding=1)
            p, idx = F.max_pool2d(z, 2, 2, return_indices=True)
            kernels = [("conv", F.conv2d, (x, w, None, 1, 1)),
                       ("conv_transpose", F.conv_transpose2d, (z, w, None, 1, 1)),
                       ("max_pool_indices", F.max_pool2d, (z, 2, 2, 0, 1, False, True)),
                       ("unpool", unpool, (p, idx, z.shape))]
            for k, fn, args in kernels:
                fn(*args)
                ts = []
                for _ in range(repeats):
                    c0 = time.process_time()
                    fn(*args)
                    ts.append((time.process_time() - c0) * 1e3)
                rows.append({"kernel": k, "dtype": str(dtype).replace("torch.", ""), "layout": layout,
                             "cpu_ms": statistics.median(ts)})
                print(f"kernel {k} {dtype} {layout}: {rows[-1]['cpu_ms']:.2f} ms", flush=True)
    return rows


def cpu_info() -> dict:
    """The CPU's model name and whether it has bfloat16 instructions (Linux /proc/cpuinfo)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        text = ""
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return {"cpu_model": cpu_model(), "cpu_bf16": "avx512_bf16" in flags or "amx_bf16" in flags}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="EP training-step settings side by side (one process, CPU time)")
    p.add_argument("--models", default="L6x3,L6x1")
    p.add_argument("--variants", default="f32,f32_cl,f32_cl_tol1e-5,id,id_cl",
                   help=f"comma-separated, the first is the reference; among {', '.join(VARIANTS)}")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON file for the rows (and a .md beside it)")
    p.add_argument("--kernels", action="store_true",
                   help="time the kernels of one sweep per layout and dtype instead (kernel_times)")
    args = p.parse_args(argv)
    if args.kernels:
        torch.set_num_threads(args.threads)
        rows = kernel_times(args.batch)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"meta": {"command": "python -m benchmarks.step " + " ".join(sys.argv[1:] if argv is None
                                                                                        else argv),
                                    "threads": args.threads, "torch": torch.__version__}, "rows": rows}, f, indent=1)
        return 0
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS] + [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        raise SystemExit(f"benchmarks.step: unknown variant(s)/model(s) {unknown}")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    meta = {"command": "python -m benchmarks.step " + " ".join(sys.argv[1:] if argv is None else argv),
            "threads": args.threads, "torch": torch.__version__, "load_before": os.getloadavg(), **cpu_info()}
    rows = part_variants(args.models.split(","), variants, args.batch, args.repeats)
    meta.update(load_after=os.getloadavg(), wall_s=time.time() - t0,
                date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
    table = markdown_variants(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(f"`{meta['command']}` ({meta['date']}, load {meta['load_before']} -> {meta['load_after']})\n\n"
                    + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
