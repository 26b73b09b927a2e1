"""Splitting study: one deep Hopfield network (DHN) of L layers cut into N blocks.

Splitting a DHN into N blocks with the same layers replaces the couplings at the block
boundaries by feedforward maps (convolution, pooling, batch-norm; docs/theory.md,
"Feedforward-tied EBMs"). For each split this measures, on one batch: iterations to reach
the tolerance in the free and nudged phases (per block and in total), wall time of one
relaxation (the free phase of the whole chain), time of one training step (free phase + EP
backward + Adam step) and the cosine similarity of the EP gradient with the `id` gradient.

The published DHNs and their splits are built here (`dhn_model`) for the static gradient
analysis and the benchmark suite too.
"""
from __future__ import annotations

import json
import os
import statistics

import torch
import torch.nn.functional as F

from ..blocks import EnergyBlock
from ..chain import FFEBM, conv_ffebm
from ..testing import cosine, gradients
from .common import block_inputs, pyplot, synthetic_images, timed, train_step

__all__ = [
    "DHN_L6", "DHN_L12", "GOE_V", "num_layers", "split_dhn", "scale_width", "default_splits", "dhn_model",
    "sweep_flops", "time_models", "measure_split", "aggregate", "markdown", "plot", "add_arguments", "run"
]

# The published DHNs as 1-block specs: conv layers after the input map, then fc.
DHN_L6 = {"channels": [3, 128, 256, 256, 512, 512], "pools": "mmmm-", "fc": [256]}
# The L = 12 network of the scaling chains (6 blocks of 2 layers in the published runs).
DHN_L12 = {"channels": [3, 128, 128, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512], "pools": "m---m---m---"}
GOE_V = 8.351e-5


def num_layers(dhn: dict) -> int:
    """Layers of the DHN: every conv layer after the input map, plus the dense ones."""
    return len(dhn["channels"]) - 1 + len(dhn.get("fc", []))


def split_dhn(dhn: dict, n_blocks: int) -> list[dict]:
    """Block specs (for `conv_ffebm`) of `dhn` cut into `n_blocks` contiguous blocks.

    Block sizes are as equal as possible (the first blocks take the remainder). Each
    block's first layer is fed by the coupling below it, which becomes the block's
    feedforward map. Dense layers must all fall in the last block, next to a conv layer.
    """
    ch, pools, fc = list(dhn["channels"]), dhn["pools"], list(dhn.get("fc", []))
    n_conv, L = len(ch) - 1, num_layers(dhn)
    if len(pools) != n_conv:
        raise ValueError(f"split_dhn: pools {pools!r} must have one entry per convolution ({n_conv})")
    if not (isinstance(n_blocks, int) and 1 <= n_blocks <= L):
        raise ValueError(f"split_dhn: cannot split {L} layers into {n_blocks!r} blocks")
    base, extra = divmod(L, n_blocks)
    sizes = [base + (1 if j < extra else 0) for j in range(n_blocks)]
    specs, start = [], 0
    for j, n in enumerate(sizes):
        stop = start + n  # layers [start, stop) of the L layers
        conv_stop = min(stop, n_conv)
        if conv_stop <= start:
            raise ValueError(f"split_dhn: block {j + 1} of {n_blocks} would hold only dense layers; "
                             f"the builder needs at least one conv layer per block")
        spec = {"channels": ch[start:conv_stop + 1], "pools": pools[start:conv_stop]}
        if stop > n_conv:
            if j != n_blocks - 1:
                raise ValueError(f"split_dhn: dense layers must all be in the last block (block {j + 1} of "
                                 f"{n_blocks} would hold some)")
            spec["fc"] = fc[: stop - n_conv]
        specs.append(spec)
        start = stop
    return specs


def scale_width(dhn: dict, div: int) -> dict:
    """The DHN with every width (not the image channels) divided by `div`."""
    if not (isinstance(div, int) and div >= 1):
        raise ValueError(f"scale_width: divisor must be a positive integer, got {div!r}")
    ch = [dhn["channels"][0]] + [max(1, c // div) for c in dhn["channels"][1:]]
    return {"channels": ch, "pools": dhn["pools"], "fc": [max(1, c // div) for c in dhn.get("fc", [])]}


def default_splits(L: int) -> list[int]:
    """1, 2, 3 and L/2 blocks (those that divide into at least one layer each)."""
    out = [n for n in (1, 2, 3) if n <= L]
    if L % 2 == 0 and L // 2 not in out:
        out.append(L // 2)
    return out


def dhn_model(dhn: dict, n_blocks: int, width_div: int = 1, seed: int = 0, **settings) -> FFEBM:
    """`dhn` with every width divided by `width_div`, cut into `n_blocks` blocks and built by
    `conv_ffebm(blocks, **settings)` after seeding torch with `seed` (e.g.
    `dhn_model(DHN_L6, 3)`: the published 3-block L = 6 CIFAR-10 chain)."""
    torch.manual_seed(seed)
    return conv_ffebm(split_dhn(scale_width(dhn, width_div), n_blocks), **settings)


def sweep_flops(block: EnergyBlock, in_shape: tuple[int, ...], batch: int) -> int:
    """FLOPs of one sweep of a Hopfield block (sync or async) on `batch` samples whose input
    current has shape `in_shape`: every coupling's map and its adjoint once (the stepper
    memoises the maps), 2 FLOPs per multiply-add (`Coupling.macs`); pooling, activations and
    additions are not counted."""
    couplings = getattr(block, "couplings", None)
    if couplings is None:
        raise ValueError(f"sweep_flops: {block.block_name} has no couplings (not a Hopfield block)")
    shapes = block.state_shapes(tuple(in_shape))
    return 2 * 2 * batch * sum(c.macs(shape) for c, shape in zip(couplings, shapes))


def time_models(models: list[FFEBM], x, y, repeats: int) -> list[dict]:
    """Relaxation and training-step times per model (wall and CPU): the minimum over `repeats`,
    with the models taken in turn within each repeat so that a change of load hits all alike."""
    opts = [torch.optim.Adam(m.parameters(), lr=1e-5) for m in models]
    relax = [[] for _ in models]
    steps = [[] for _ in models]
    for m, opt in zip(models, opts):  # warm-up
        train_step(m, opt, x, y)
    for _ in range(repeats):
        for i, (m, opt) in enumerate(zip(models, opts)):
            with torch.no_grad():
                relax[i].append(timed(m, x))
            steps[i].append(timed(train_step, m, opt, x, y))
    return [{"relax_time_s": min(w for w, _ in r), "relax_cpu_s": min(c for _, c in r),
             "step_time_s": min(w for w, _ in t), "step_cpu_s": min(c for _, c in t)} for r, t in zip(relax, steps)]


def measure_split(dhn: dict, n_blocks: int, x, y, seed: int, beta: float, tol: float, T1: int, T2: int,
                  update: str, slope: float, variance: float) -> tuple[dict, FFEBM]:
    """Iteration counts and EP-vs-ID agreement of one split on one batch (and its model)."""
    model = dhn_model(dhn, n_blocks, seed=seed, in_size=x.shape[-1], slope=slope, variance=variance, T1=T1,
                      tol=tol, update=update, estimator="ep", estimator_settings={"beta": beta, "T2": T2, "tol": tol})
    model = model.to(x.dtype).train()
    sizes = [b.num_layers for b in model.blocks]
    params = list(model.parameters())

    def loss_fn():
        return F.cross_entropy(model(x), y)
    # Iterations: one forward + EP backward.
    ep = gradients(loss_fn, params)
    stats = model.relax_stats()
    free = [s["free"]["iters"] for s in stats]
    nudged = [s["nudged+"]["iters"] + s["nudged-"]["iters"] for s in stats]
    converged = all(s[p]["converged"] for s in stats for p in ("free", "nudged+", "nudged-"))
    # Gradient agreement with implicit differentiation.
    model.set_estimator("id", max_iter=1000, tol=1e-7)
    ident = gradients(loss_fn, params)
    id_conv = all(s["adjoint"]["converged"] for s in model.relax_stats())
    model.set_estimator("ep", beta=beta, T2=T2, tol=tol)
    names = [n for n, _ in model.named_parameters()]
    in_block = {id(p) for b in model.blocks for p in b.parameters()}
    is_block = [id(p) in in_block for p in params]
    per_tensor = {n: cosine(a, b) for n, a, b in zip(names, ep, ident)}
    blocks_cos = cosine([g for g, k in zip(ep, is_block) if k], [g for g, k in zip(ident, is_block) if k])
    block_tensors = [v for v, k in zip(per_tensor.values(), is_block) if k]
    flops = [sweep_flops(b, tuple(u.shape[1:]), x.shape[0]) for b, u in zip(model.blocks, block_inputs(model, x))]
    L = sum(sizes)
    return {
        "blocks": n_blocks, "layers_per_block": sizes,
        "free_iters": free, "free_iters_total": sum(free),
        "free_sweeps_equiv": sum(i * n for i, n in zip(free, sizes)) / L,
        "free_gflop": sum(i * f for i, f in zip(free, flops)) / 1e9, "sweep_gflop": [f / 1e9 for f in flops],
        "nudged_iters": nudged, "nudged_iters_total": sum(nudged),
        "converged": converged, "id_converged": id_conv,
        "cos_ep_id": cosine(ep, ident), "cos_ep_id_blocks": blocks_cos,
        "min_block_tensor_cos_ep_id": min(block_tensors),
        "cos_ep_id_per_tensor": per_tensor,
    }, model


def aggregate(runs: list[dict]) -> dict:
    """Mean over seeds of the numbers (element-wise for per-block lists); the worst tensor
    cosine over seeds; the first seed's per-tensor cosines."""
    out = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "blocks":
            out[k] = statistics.mean(r[k] for r in runs)
        elif k in ("free_iters", "nudged_iters"):
            out[k] = [statistics.mean(vals) for vals in zip(*(r[k] for r in runs))]
    out["converged"] = all(r["converged"] for r in runs)
    out["id_converged"] = all(r["id_converged"] for r in runs)
    out["free_iters_per_seed"] = [r["free_iters_total"] for r in runs]
    out["min_block_tensor_cos_ep_id"] = min(r["min_block_tensor_cos_ep_id"] for r in runs)
    return out


def markdown(result: dict) -> str:
    lines = [
        "| V (GOE) | blocks | layers/block | free iters per block | free iters, sum | ratio | full-sweep equiv. | "
        "free-phase GFLOP | ratio | nudged iters (sum, +/-) | relax wall / CPU (s) | ratio (CPU) | "
        "step wall / CPU (s) | cos(EP, ID) all / blocks | min block tensor cos |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["splits"]:
        base = next(q for q in result["splits"] if q["variance"] == r["variance"] and q["blocks"] == 1) \
            if any(q["blocks"] == 1 and q["variance"] == r["variance"] for q in result["splits"]) else None

        def ratio(k: str, base=base, r=r) -> str:
            return f"{base[k] / r[k]:.2f}x" if base else "n/a"
        flag = "" if r["converged"] else " (not converged)"
        lines.append(
            f"| {r['variance']:.3g} | {r['blocks']} | {'+'.join(map(str, r['layers_per_block']))} | "
            f"{', '.join(f'{v:.1f}' for v in r['free_iters'])} | {r['free_iters_total']:.1f}{flag} | "
            f"{ratio('free_iters_total')} | {r['free_sweeps_equiv']:.1f} | {r['free_gflop']:.2f} | "
            f"{ratio('free_gflop')} | {r['nudged_iters_total']:.1f} | "
            f"{r['relax_time_s']:.3f} / {r['relax_cpu_s']:.3f} | {ratio('relax_cpu_s')} | "
            f"{r['step_time_s']:.3f} / {r['step_cpu_s']:.3f} | "
            f"{r['cos_ep_id']:.3f} / {r['cos_ep_id_blocks']:.3f} | {r['min_block_tensor_cos_ep_id']:.3f} |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    plt = pyplot()
    rows = result["splits"]
    variances = sorted({r["variance"] for r in rows})
    splits = sorted({r["blocks"] for r in rows})
    panels = [("free_iters_total", "free-phase iterations (sum over blocks)"),
              ("free_gflop", "free-phase GFLOP (iterations x block cost)"),
              ("nudged_iters_total", "nudged-phase iterations (sum, +/-)"),
              ("relax_cpu_s", "one relaxation (CPU s)"),
              ("step_cpu_s", "one training step (CPU s)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2))
    width = 0.8 / len(splits)
    for ax, (key, title) in zip(axes, panels):
        for j, n in enumerate(splits):
            vals = [next((r[key] for r in rows if r["variance"] == v and r["blocks"] == n), 0.0) for v in variances]
            ax.bar([i + j * width for i in range(len(variances))], vals, width, color=f"C{j}",
                   label=f"{n} block{'s' if n > 1 else ''}")
        ax.set_xticks([i + width * (len(splits) - 1) / 2 for i in range(len(variances))])
        ax.set_xticklabels([f"V={v:.2g}" for v in variances], fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Splitting a {result['L']}-layer DHN (width /{result['width_div']}, batch {result['batch']}, "
                 f"{result['update']} updates, tol {result['tol']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser) -> None:
    parser.add_argument("--splits", default=None, help="comma-separated block counts (default 1,2,3 and L/2)")
    parser.add_argument("--width-div", type=int, default=8, help="divide every width by this (CPU size)")
    parser.add_argument("--full-width", action="store_true", help="the published widths (same as --width-div 1)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--in-size", type=int, default=32)
    parser.add_argument("--beta", type=float, default=0.2)
    parser.add_argument("--tol", type=float, default=1e-6, help="tolerance of free and nudged phases")
    parser.add_argument("--T1", type=int, default=1580, help="free-phase iteration cap")
    parser.add_argument("--T2", type=int, default=1580, help="nudged-phase iteration cap")
    parser.add_argument("--update", default="async", choices=["sync", "async"])
    parser.add_argument("--slope", type=float, default=1.0)
    parser.add_argument("--variance", default=None,
                        help="GOE variance V, or a comma-separated list to sweep the coupling strength (default "
                             "8.351e-5 times the width divisor: the per-unit coupling strength of the published "
                             "initialisation at full width)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--seeds", type=int, default=2, help="batches/initialisations averaged over")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timing repeats (the minimum is reported; splits are timed in turn)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default="runs/analyze", help="output folder (splitting.json/.md/.png)")


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    div = 1 if args.full_width else args.width_div
    dhn = scale_width(DHN_L6, div)
    L = num_layers(dhn)
    splits = default_splits(L) if args.splits is None else [int(v) for v in args.splits.split(",")]
    variances = [GOE_V * div] if args.variance is None else [float(v) for v in args.variance.split(",")]
    if any(not v > 0 for v in variances):
        raise ValueError(f"splitting: GOE variances must be > 0, got {variances}")
    dtype = getattr(torch, args.dtype)
    for n in splits:
        split_dhn(dhn, n)  # fail early on an impossible split
    per_split = []
    for variance in variances:
        models, x0y0 = [], None
        for n in splits:
            runs = []
            for seed in range(args.seeds):
                x, y = synthetic_images(args.batch, args.in_size, 10, seed=1000 + seed, dtype=dtype)
                r, model = measure_split(dhn, n, x, y, seed, args.beta, args.tol, args.T1, args.T2, args.update,
                                         args.slope, variance)
                runs.append(r)
                if seed == 0:
                    models.append(model)
                    x0y0 = (x, y)
            per_split.append({"variance": variance, **aggregate(runs)})
            r = per_split[-1]
            print(f"V={variance:.3g} {n} block(s): free iters {r['free_iters_total']:.1f}, nudged "
                  f"{r['nudged_iters_total']:.1f}, cos(EP,ID) {r['cos_ep_id']:.4f}, blocks "
                  f"{r['cos_ep_id_blocks']:.4f}", flush=True)
        # Wall times on the first seed's batch, the splits of this V timed in turn.
        for r, times in zip(per_split[-len(splits):], time_models(models, *x0y0, args.repeats)):
            r.update(times)
            print(f"V={variance:.3g} {r['blocks']} block(s): relax {times['relax_time_s']:.3f}s wall "
                  f"({times['relax_cpu_s']:.3f}s CPU), step {times['step_time_s']:.3f}s wall "
                  f"({times['step_cpu_s']:.3f}s CPU)", flush=True)
    result = {"L": L, "dhn": dhn, "width_div": div, "batch": args.batch, "in_size": args.in_size,
              "beta": args.beta, "tol": args.tol, "T1": args.T1, "T2": args.T2, "update": args.update,
              "slope": args.slope, "variances": variances, "dtype": args.dtype, "seeds": args.seeds,
              "threads": torch.get_num_threads(), "load_average": os.getloadavg(), "splits": per_split}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "splitting")
    table = markdown(result)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(table + "\n")
    plot(result, stem + ".png")
    print(table)
    print(f"wrote {stem}.json, {stem}.md and {stem}.png")
    return 0
