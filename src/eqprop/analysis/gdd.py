"""Static gradient analysis (docs/theory.md, "Static gradient analysis"): EP's nudged
transient against truncated BPTT.

For every block of an ff-EBM, from its free equilibrium s*, the centered EP quantity

    EP_l(t)     = -(s_l^+(t) - s_l^-(t)) / (2 beta)            (layer l, nudged step t)
    EP_theta(t) = -(dPhi/dtheta(s^+(t)) - dPhi/dtheta(s^-(t))) / (2 beta)

is compared with the gradient that BPTT assigns when it backpropagates through only
the last t of T2 steps unrolled from s*. Both use the synchronous map
f(s) = sigma(dPhi/ds(s)) (the theory is for that map, whose Jacobian at s* is
J = D H with D = diag(sigma'), H = d2Phi/ds2 symmetric).

Which BPTT quantity matches the neurons: linearising the nudged dynamics,
s^beta(t) - s* = -beta * sum_{k<t} J^k D e (e = error current on the top layer), and
J^k D = D (J^T)^k. With z_j the pre-activation of step j (s_j = sigma(z_j)),
dl/dz_{T2-k} = D (J^T)^k e. Hence

    EP_l(t)  ->  sum_{k=0}^{t-1} dl/dz_{l, T2-k}      as beta -> 0,

i.e. the increment of EP at nudged step k matches BPTT's gradient with respect to the
(pre-activation of the) state k steps before the end, and the cumulative EP quantity is
the truncated-BPTT gradient of an input current added to layer l at each of the last t
steps (dPhi/db_l = s_l, so this is also the gradient of a bias of layer l). The parameter
curves match the same way: BPTT_theta(t) = sum_{k=0}^{t-1} (df/dtheta)^T dl/ds_{T2-k}.
Using dl/ds instead of dl/dz would differ by D, which matters for saturated units of a
hard sigmoid.

Error current of block k: the top block's comes from autograd through the readout and
the loss. For a lower block, the input gradient dl/du^{k+1} of the block above (from
BPTT at t = T2 by default, `delta_source='bptt'`, or EP's estimate, 'ep') is
backpropagated through the feedforward map F^{k+1}. With 'bptt' every block is driven
by exactly the error current the `bptt` estimator's backward gives it, so the curves at
t = T2 are that estimator's gradients; with 'ep' they are what EP training sees.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..activations import HardSigmoid
from ..blocks import EnergyBlock, State, relative_change
from ..chain import FFEBM
from ..estimators import normalized_current, per_sample
from ..testing import cosine, rel_error
from .common import pyplot, synthetic_images
from .splitting import DHN_L6, GOE_V, dhn_model

__all__ = [
    "MODELS", "gdd_model", "split_chain", "synchronous", "fixed_point_residual", "Curves", "BlockGDD", "switches",
    "block_gdd", "analyze", "summarize", "plot", "add_arguments", "run", "format_table"
]

# Named models: a DHN cut into blocks (splitting.dhn_model), data size and analysis defaults.
MODELS: dict[str, dict] = {
    # CPU-sized 3-block split of the L = 6 conv DHN, widths / 8.
    "cpu": dict(dhn=DHN_L6, n_blocks=3, width_div=8, in_size=32, num_classes=10, init="goe", variance=GOE_V,
                alpha=0.5, slope=1.0, batch=8, beta=0.02, T2=20),
    # The published analysis model: 3-block L = 6 CIFAR-10 chain, beta = 0.02.
    "published": dict(dhn=DHN_L6, n_blocks=3, width_div=1, in_size=32, num_classes=10, init="goe", variance=GOE_V,
                      alpha=0.5, slope=1.0, batch=4, beta=0.02, T2=20),
}


def gdd_model(name: str, activation: str = "hardsigmoid", slope: float | None = None, seed: int = 0,
              dtype: torch.dtype = torch.float32, variance: float | None = None) -> tuple[FFEBM, dict]:
    """The named analysis model (see MODELS) with synchronous updates, in `dtype`; returns
    (model, its MODELS entry with the variance used)."""
    if name not in MODELS:
        raise ValueError(f"gdd: unknown model {name!r}, expected one of {sorted(MODELS)}")
    cfg = dict(MODELS[name])
    if variance is not None:
        if not variance > 0:
            raise ValueError(f"gdd: the GOE variance must be > 0, got {variance}")
        cfg["variance"] = variance
    model = dhn_model(cfg["dhn"], cfg["n_blocks"], cfg["width_div"], seed, num_classes=cfg["num_classes"],
                      in_size=cfg["in_size"], activation=activation, slope=cfg["slope"] if slope is None else slope,
                      init=cfg["init"], variance=cfg["variance"], alpha=cfg["alpha"], update="sync")
    return model.to(dtype), cfg


def split_chain(model: nn.Sequential) -> tuple[list[nn.Sequential], list[EnergyBlock], nn.Sequential]:
    """(feedforward map before each block, blocks, readout after the last block)."""
    ffs, blocks, cur = [], [], []
    for m in model:
        if isinstance(m, EnergyBlock):
            ffs.append(nn.Sequential(*cur))
            blocks.append(m)
            cur = []
        else:
            cur.append(m)
    if not blocks:
        raise ValueError("gdd: the model holds no energy-based block")
    return ffs, blocks, nn.Sequential(*cur)


@contextlib.contextmanager
def synchronous(blocks: list[EnergyBlock]):
    """Run the blocks with synchronous updates inside the context."""
    saved = [b.update for b in blocks]
    try:
        for b in blocks:
            b.configure(update="sync")
        yield
    finally:
        for b, u in zip(blocks, saved):
            b.configure(update=u)


def _with_currents(block: EnergyBlock, s: State, u: Tensor, currents: list[Tensor]) -> State:
    """The synchronous map with an extra input current on every layer: sigma(dPhi/ds + c)."""
    L = len(s)
    pre = block.preactivations(s, u, list(range(L)))
    return [block.activations[l](pre[l] + currents[l]) for l in range(L)]


def fixed_point_residual(block: EnergyBlock, s: State, u: Tensor) -> float:
    """||f(s) - s|| / ||s|| (mean over layers) for the synchronous map f."""
    with torch.no_grad():
        return float(relative_change(block.fixed_point_map(s, u), s))


def _json_number(v: float) -> float | None:
    """v, or None where it is not finite (JSON has no inf): a relative error against a
    reference that vanishes while the estimate does not."""
    return v if math.isfinite(v) else None


@dataclass
class Curves:
    """Per-quantity results of one block: metrics per t and a few units' curves."""

    name: str
    shape: tuple[int, ...]
    cosine: list = field(default_factory=list)
    rel_error: list = field(default_factory=list)
    ep_norm: list = field(default_factory=list)
    bptt_norm: list = field(default_factory=list)
    units: list = field(default_factory=list)      # flat indices (sample 0) of the plotted units
    ep: list = field(default_factory=list)          # [t][unit]
    bptt: list = field(default_factory=list)

    def add(self, ep: Tensor, bptt: Tensor) -> None:
        self.cosine.append(cosine(ep, bptt))
        self.rel_error.append(_json_number(rel_error(ep, bptt)))
        self.ep_norm.append(float(ep.norm()))
        self.bptt_norm.append(float(bptt.norm()))
        if self.units:
            self.ep.append([float(v) for v in ep.reshape(-1)[self.units]])
            self.bptt.append([float(v) for v in bptt.reshape(-1)[self.units]])

    def as_dict(self, curves: bool = True) -> dict:
        d = {"name": self.name, "shape": list(self.shape), "cosine": self.cosine, "rel_error": self.rel_error,
             "ep_norm": self.ep_norm, "bptt_norm": self.bptt_norm,
             "final_cosine": self.cosine[-1], "final_rel_error": self.rel_error[-1]}
        if curves and self.units:
            d.update(units=self.units, ep=self.ep, bptt=self.bptt)
        return d


@dataclass
class BlockGDD:
    """One block's curves, its final (t = T2) input and parameter gradients, and how many
    discrete switches separate the two nudged states at T2 (what finite beta can break)."""

    layers: list[Curves]
    params: list[Curves]
    grad_u_bptt: Tensor
    grad_u_ep: Tensor
    params_bptt: dict[str, Tensor]
    params_ep: dict[str, Tensor]
    switches: dict


@torch.no_grad()
def switches(block: EnergyBlock, a: State, b: State) -> dict:
    """Discrete differences between states a and b: max-pool argmax positions per pooled
    coupling, and hard-sigmoid units in a different regime (0, linear, 1) per layer.

    EP's finite differences and BPTT's linearisation agree only while both nudged states
    keep the free state's argmaxes and regimes; each switch adds a term of the size of the
    states, not of beta."""
    pools = {}
    for l, c in enumerate(getattr(block, "couplings", [])):
        if c.routed:  # the routing (max-pool argmax) chosen by each state
            ra, rb = c.route(c.linear_map(a[l]))[1], c.route(c.linear_map(b[l]))[1]
            pools[f"coupling{l + 1}"] = int((ra != rb).sum())
    regimes = {}
    for l, act in enumerate(block.activations):
        if isinstance(act, HardSigmoid):
            ra = (a[l] > 0).to(torch.int8) + (a[l] >= 1).to(torch.int8)
            rb = (b[l] > 0).to(torch.int8) + (b[l] >= 1).to(torch.int8)
            regimes[f"layer{l + 1}"] = int((ra != rb).sum())
    return {"pool_argmax": pools, "hardsigmoid_regime": regimes}


def _pick_units(x: Tensor, n: int) -> list[int]:
    """Flat indices (sample 0) of the n units of largest magnitude."""
    flat = x[0].reshape(-1).abs()
    n = min(n, flat.numel())
    idx = torch.topk(flat, n).indices.tolist() if n > 0 else []
    return sorted(idx)


def block_gdd(block: EnergyBlock, u: Tensor, s: State, delta: Tensor, beta: float, T2: int, name: str,
              normalize: str = "sample", units: int = 4) -> BlockGDD:
    """EP transient vs truncated BPTT for one block, from its free equilibrium `s`."""
    L = len(s)
    u = u.detach()
    s = [x.detach() for x in s]
    pnames, params = zip(*[(n, p) for n, p in block.named_parameters() if p.requires_grad]) \
        if any(p.requires_grad for p in block.parameters()) else ((), ())

    # --- BPTT: T2 steps of the sync map with an input current on every layer at every step.
    with torch.enable_grad():
        currents = [[torch.zeros_like(x, requires_grad=True) for x in s] for _ in range(T2)]
        traj = [s]
        cur = s
        for k in range(T2):
            cur = _with_currents(block, cur, u, currents[k])
            traj.append(cur)
        flat = [c for step in currents for c in step]
        g = torch.autograd.grad((cur[-1] * delta).sum(), flat, allow_unused=True)
    zgrad = [[(g[k * L + l] if g[k * L + l] is not None else torch.zeros_like(s[l])) for l in range(L)]
             for k in range(T2)]  # zgrad[k][l] = dl/dz_l at step k + 1 (producing traj[k + 1])
    traj = [[x.detach() for x in st] for st in traj]

    def step_param_grads(k: int) -> list[Tensor]:
        """(df/dtheta at traj[k])^T dl/ds_{k+1}: BPTT's contribution of step k + 1."""
        if not params:
            return []
        with torch.enable_grad():
            pre = block.preactivations(traj[k], u, list(range(L)))
            obj = sum((pre[l] * zgrad[k][l]).sum() for l in range(L))
            gr = torch.autograd.grad(obj, params, allow_unused=True)
        return [x if x is not None else torch.zeros_like(p) for x, p in zip(gr, params)]

    # --- EP: the two nudged phases, recorded step by step.
    delta_hat, scale = normalized_current(delta, normalize)
    plus: list[State] = [s]
    block.relax(u, s, T=T2, tol=None, nudge=-beta * delta_hat,
                callback=lambda t, st: plus.append([x.clone() for x in st]))
    minus: list[State] = [s]
    block.relax(u, s, T=T2, tol=None, nudge=beta * delta_hat,
                callback=lambda t, st: minus.append([x.clone() for x in st]))
    cu = per_sample(scale, u)
    weights = (-scale / (2 * beta)).expand(u.shape[0])

    def ep_layers(t: int) -> list[Tensor]:
        return [-(plus[t][l] - minus[t][l]) * (per_sample(scale, s[l]) / (2 * beta)) for l in range(L)]

    def ep_params(t: int) -> list[Tensor]:
        if not params:
            return []
        if t == 0:
            return [torch.zeros_like(p) for p in params]
        with torch.enable_grad():
            diff = block.phi(plus[t], u) - block.phi(minus[t], u)
            gr = torch.autograd.grad(diff, params, grad_outputs=weights, allow_unused=True)
        return [x if x is not None else torch.zeros_like(p) for x, p in zip(gr, params)]

    # Final values first, to choose the plotted units.
    bptt_layers = [sum(zgrad[k][l] for k in range(T2)) for l in range(L)]
    lay = [Curves(f"{name}.layer{l + 1}", tuple(s[l].shape[1:]), units=_pick_units(bptt_layers[l], units))
           for l in range(L)]
    par = [Curves(f"{name}.{n}", tuple(p.shape)) for n, p in zip(pnames, params)]

    zero_l = [torch.zeros_like(x) for x in s]
    acc_l = [z.clone() for z in zero_l]
    acc_p = [torch.zeros_like(p) for p in params]
    for t in range(T2 + 1):
        if t > 0:
            k = T2 - t  # the step added when truncating to the last t steps produces traj[k + 1]
            acc_l = [a + zgrad[k][l] for l, a in enumerate(acc_l)]
            acc_p = [a + gp for a, gp in zip(acc_p, step_param_grads(k))]
        for cv, e, b in zip(lay, ep_layers(t), acc_l):
            cv.add(e, b)
        for cv, e, b in zip(par, ep_params(t), acc_p):
            cv.add(e, b)
    final_ep = ep_params(T2)
    return BlockGDD(lay, par, grad_u_bptt=acc_l[0], grad_u_ep=-(plus[T2][0] - minus[T2][0]) * (cu / (2 * beta)),
                    params_bptt=dict(zip(pnames, acc_p)), params_ep=dict(zip(pnames, final_ep)),
                    switches=switches(block, plus[T2], minus[T2]))


def analyze(model: nn.Sequential, x: Tensor, y: Tensor, beta: float, T2: int, delta_source: str = "bptt",
            normalize: str = "sample", units: int = 4, keep_tensors: bool = False, reduction: str = "mean") -> dict:
    """Run the static gradient analysis on one batch; returns a JSON-ready dict.

    `normalize` is EP's error-current normalisation ('sample': the nudge of every sample has
    norm beta; 'none': the nudge is beta * dl/ds, as in the published code with a summed
    loss, `reduction='sum'`). With keep_tensors, result['tensors'][block name] holds the
    BlockGDD (final gradients).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"gdd: reduction must be 'mean' or 'sum', got {reduction!r}")
    if delta_source not in ("bptt", "ep"):
        raise ValueError(f"gdd: delta_source must be 'bptt' or 'ep', got {delta_source!r}")
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"gdd: beta must be a positive number, got {beta!r}")
    if not (isinstance(T2, int) and T2 > 0):
        raise ValueError(f"gdd: T2 must be a positive integer, got {T2!r}")
    ffs, blocks, readout = split_chain(model)
    result: dict = {"beta": beta, "T2": T2, "delta_source": delta_source, "normalize": normalize,
                    "reduction": reduction,
                    "dtype": str(x.dtype).replace("torch.", ""), "batch": int(x.shape[0]), "blocks": []}
    with synchronous(blocks):
        # Free phase, keeping each feedforward map's graph to carry error currents down.
        h, leaves, us, frees, free_info = x, [], [], [], []
        for k, (ff, block) in enumerate(zip(ffs, blocks)):
            leaf = h.detach().requires_grad_(k > 0)
            with torch.enable_grad():
                u = ff(leaf)
            block.check_input(u)
            s, stats = block.relax(u.detach())
            leaves.append(leaf)
            us.append(u)
            frees.append(s)
            free_info.append({**stats.as_dict(), "fixed_point_residual": fixed_point_residual(block, s, u.detach())})
            h = s[-1]
        with torch.enable_grad():
            top = h.detach().requires_grad_(True)
            loss = F.cross_entropy(readout(top), y, reduction=reduction)
            delta = torch.autograd.grad(loss, top)[0]
        result["loss"] = float(loss.detach())
        per_block: list[dict] = [None] * len(blocks)  # type: ignore[list-item]
        tensors: dict[str, BlockGDD] = {}
        for k in reversed(range(len(blocks))):
            name = blocks[k].block_name
            g = block_gdd(blocks[k], us[k], frees[k], delta, beta, T2, name, normalize, units)
            if keep_tensors:
                tensors[name] = g
            per_block[k] = {"name": name, "free": free_info[k],
                            "error_current_norm": float(delta.flatten(1).norm(dim=1).mean()),
                            "layers": [c.as_dict() for c in g.layers],
                            "params": [c.as_dict(curves=False) for c in g.params],
                            "input_grad_cosine": cosine(g.grad_u_ep, g.grad_u_bptt),
                            "input_grad_rel_error": _json_number(rel_error(g.grad_u_ep, g.grad_u_bptt)),
                            "switches_at_T2": g.switches}
            if k > 0:
                gu = g.grad_u_bptt if delta_source == "bptt" else g.grad_u_ep
                with torch.enable_grad():
                    delta = torch.autograd.grad(us[k], leaves[k], gu)[0]
        result["blocks"] = per_block
    result["summary"] = summarize(result)
    if keep_tensors:
        result["tensors"] = tensors
    return result


def summarize(result: dict) -> dict:
    """Worst final-step cosine and relative error over layers and over parameters."""
    def worst(key: str, what: str, fn):
        vals = [q[what] for b in result["blocks"] for q in b[key] if q[what] is not None]
        return fn(vals) if vals else None
    return {"min_layer_cosine": worst("layers", "final_cosine", min),
            "max_layer_rel_error": worst("layers", "final_rel_error", max),
            "min_param_cosine": worst("params", "final_cosine", min),
            "max_param_rel_error": worst("params", "final_rel_error", max)}


def plot(result: dict, path: str) -> None:
    """One panel per layer of every block: a few units, BPTT solid and EP dashed, against t."""
    plt = pyplot()
    blocks = result["blocks"]
    rows, cols = len(blocks), max(len(b["layers"]) for b in blocks)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    ts = list(range(result["T2"] + 1))
    for i, b in enumerate(blocks):
        for j in range(cols):
            ax = axes[i][j]
            if j >= len(b["layers"]):
                ax.axis("off")
                continue
            lay = b["layers"][j]
            for n in range(len(lay.get("units", []))):
                color = f"C{n}"
                ax.plot(ts, [row[n] for row in lay["bptt"]], "-", color=color, lw=1.5)
                ax.plot(ts, [row[n] for row in lay["ep"]], "--", color=color, lw=1.5)
            cos = lay["final_cosine"]
            ax.set_title(f"{lay['name']}  cos(T2)={cos:.4f}" if cos is not None else lay["name"], fontsize=8)
            ax.tick_params(labelsize=7)
            if i == rows - 1:
                ax.set_xlabel("t", fontsize=8)
    fig.suptitle(f"EP (dashed) vs truncated BPTT (solid), beta={result['beta']}, {result['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="cpu", choices=sorted(MODELS),
                        help="cpu: 3-block split conv ff-EBM at 1/8 width; published: 3-block L=6 CIFAR model")
    parser.add_argument("--batch", type=int, default=None, help="batch size (model default)")
    parser.add_argument("--beta", type=float, default=None, help="nudging strength (model default 0.02)")
    parser.add_argument("--T2", type=int, default=None, help="nudged steps (model default)")
    parser.add_argument("--T1", type=int, default=1000, help="free-phase iteration cap")
    parser.add_argument("--tol", type=float, default=None,
                        help="free-phase tolerance (default 1e-6 in float32, 1e-12 in float64)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--activation", default="hardsigmoid", choices=["hardsigmoid", "sigmoid"])
    parser.add_argument("--slope", type=float, default=None, help="activation slope (model default)")
    parser.add_argument("--variance", type=float, default=None,
                        help="GOE variance V of the blocks' couplings (model default; larger V: stronger "
                             "coupling, longer transients)")
    parser.add_argument("--delta", default="bptt", choices=["bptt", "ep"],
                        help="where a lower block's error current comes from (see docs/gradients.md)")
    parser.add_argument("--normalize", default="sample", choices=["sample", "batch", "none"],
                        help="EP's error-current normalisation (sample: every sample's nudge has norm beta)")
    parser.add_argument("--loss-reduction", default="mean", choices=["mean", "sum"],
                        help="cross-entropy reduction; 'sum' with --normalize none nudges as the published code")
    parser.add_argument("--units", type=int, default=4, help="units plotted per layer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/analyze",
                        help="output folder (gdd_<model>_<activation>_<dtype>_beta<beta>.png/.json)")


def run(args) -> int:
    import json
    import os

    dtype = getattr(torch, args.dtype)
    model, cfg = gdd_model(args.model, args.activation, args.slope, args.seed, dtype, args.variance)
    tol = args.tol if args.tol is not None else (1e-12 if dtype == torch.float64 else 1e-6)
    model.configure_blocks(T1=args.T1, tol=tol)
    beta = cfg["beta"] if args.beta is None else args.beta
    T2 = cfg["T2"] if args.T2 is None else args.T2
    batch = cfg["batch"] if args.batch is None else args.batch
    x, y = synthetic_images(batch, cfg["in_size"], cfg["num_classes"], seed=args.seed + 1, dtype=dtype)
    model.train()
    result = analyze(model, x, y, beta, T2, args.delta, normalize=args.normalize, units=args.units,
                     reduction=args.loss_reduction)
    result.update(model_name=args.model, activation=args.activation, seed=args.seed, T1=args.T1, tol=tol,
                  variance=cfg["variance"])
    os.makedirs(args.out, exist_ok=True)
    tag = "" if args.variance is None else f"_V{args.variance:g}"
    if args.normalize != "sample" or args.loss_reduction != "mean":
        tag += f"_{args.normalize}_{args.loss_reduction}"
    stem = os.path.join(args.out, f"gdd_{args.model}{tag}_{args.activation}_{args.dtype}_beta{beta:g}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot(result, stem + ".png")
    print(format_table(result))
    print(f"wrote {stem}.json and {stem}.png")
    return 0


def format_table(result: dict) -> str:
    """Markdown table of the final-step (t = T2) agreement per layer and per parameter."""
    lines = ["| quantity | cosine(T2) | rel. error(T2) |", "|---|---|---|"]
    fmt = lambda v: "n/a" if v is None else f"{v:.6f}" if abs(v) >= 1e-3 else f"{v:.2e}"  # noqa: E731
    for b in result["blocks"]:
        f = b["free"]
        sw = b["switches_at_T2"]
        lines.append(f"| **{b['name']}** error current {b['error_current_norm']:.2e} per sample; "
                     f"free phase: {f['iters']} it, residual {f['residual']:.1e}, "
                     f"fixed-point residual {f['fixed_point_residual']:.1e}; switches between s+ and s- at T2: "
                     f"pool argmax {sw['pool_argmax']}, hard-sigmoid regime {sw['hardsigmoid_regime']} | | |")
        for q in b["layers"] + b["params"]:
            lines.append(f"| {q['name']} | {fmt(q['final_cosine'])} | {fmt(q['final_rel_error'])} |")
    s = result["summary"]
    lines.append(f"\nworst: layer cosine {fmt(s['min_layer_cosine'])}, "
                 f"layer rel. error {fmt(s['max_layer_rel_error'])}, parameter cosine {fmt(s['min_param_cosine'])}, "
                 f"parameter rel. error {fmt(s['max_param_rel_error'])}")
    return "\n".join(lines)
