"""Gradient fidelity: EP (each variant, free or held pooling routes) against implicit
differentiation (ID, MINRES adjoint) and BPTT, at initialisation and at training checkpoints.

For one batch per seed, every EP setting of the grid (beta x variant x pool) is compared
with ID and with BPTT (T steps unrolled from the free equilibrium): per parameter tensor the
cosine and relative error, over all parameters the cosine ("flat"), and the lowest cosine over
the energy blocks' tensors ("worst tensor"). It also counts, per block, the discrete switches
between the free state and the states EP contrasts (in-block max-pool argmaxes and
hard-sigmoid regimes, `eqprop.analysis.gdd.switches`), which break EP's agreement at finite
beta, and records the free phase's iterations, residual and fixed-point residual.
`--id-damping MU ...` adds ID with a damped adjoint (`ID(damping=MU)`) as further rows, each
also compared with every EP row of its batch ('vs_ep'): how close EP is to a slightly damped
implicit gradient where the exact one is dominated by a slow mode of the sweep.

Models: `dhn3` and `dhn1`, the L = 6 DHN of the splitting study cut into 3 blocks and unsplit
(GOE V = 8.351e-5, slope 1, async, T1 = 60, a fixed Gaussian CIFAR-shaped batch), and
`demo`, the `fmnist_cpu` config's model built by the training model builder (a batch of its
training set). `--checkpoints` adds the models of training checkpoints (files or run folders).

`gradients_of(model, estimator, x, y)` computes a model's gradients without side effects
(the trainer's `monitor_fidelity` uses it): parameters' `.grad`, buffers (batch-norm running
statistics), RNG streams, estimators and relaxation records are as before.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks import EnergyBlock
from ..chain import relax_stats
from ..estimators import BPTT, EP, ID, POOLS, VARIANTS, ContrastEstimator, Estimator
from ..registry import estimator_modules, set_estimator
from ..testing import cosine, rel_error
from .common import pyplot, synthetic_images
from .gdd import fixed_point_residual, switches
from .splitting import DHN_L6, GOE_V, dhn_model

__all__ = ["MODELS", "REFERENCE", "FidelityMonitor", "preserved", "gradients_of", "gradients_and_stats",
           "energy_parameter_names", "agreement", "block_taps", "count_switches", "measure", "checkpoint_files",
           "plot", "markdown", "add_arguments", "run"]

MODELS = {
    "dhn3": "L = 6 DHN of the splitting study in 3 blocks (GOE V = 8.351e-5, slope 1, async, T1 = 60)",
    "dhn1": "L = 6 DHN of the splitting study unsplit (GOE V = 8.351e-5, slope 1, async, T1 = 60)",
    "demo": "the fmnist_cpu config's model (training model builder), a batch of Fashion-MNIST",
}
REFERENCE = {"solver": "minres", "tol": 1e-6, "max_iter": 1000}  # the ID reference's settings
Loss = Callable[[Tensor, Tensor], Tensor]


# ---- gradients without side effects ------------------------------------------------------

@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Everything a measuring forward/backward may change is as before on exit: the
    estimators of the model's blocks, their relaxation records (`last_relax`), the buffers
    (batch-norm running statistics) and the RNG streams (torch, CUDA, Python, NumPy)."""
    ests = [(m, m.estimator) for m in estimator_modules(model)]
    records = [(m, m.last_relax) for m in model.modules() if isinstance(m, EnergyBlock)]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state(),
           torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
    try:
        yield
    finally:
        for m, e in ests:
            m.estimator = e
        for m, r in records:
            m.last_relax = r
        with torch.no_grad():
            for b, v in buffers:
                b.copy_(v)
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])


def gradients_of(model: nn.Module, estimator: Estimator | None, x: Tensor, y: Tensor,
                 loss: Loss = F.cross_entropy, target: bool = False) -> dict[str, Tensor]:
    """{parameter name: d loss(model(x), y) / d parameter} with `estimator` on every block
    (None: the model's own), computed with autograd.grad inside `preserved`: nothing of the
    model's training state changes. target: pass y to the forward (rules that need it)."""
    return gradients_and_stats(model, estimator, x, y, loss, target)[0]


def gradients_and_stats(model: nn.Module, estimator: Estimator | None, x: Tensor, y: Tensor,
                        loss: Loss = F.cross_entropy, target: bool = False) -> tuple[dict[str, Tensor], list[dict]]:
    """`gradients_of` and the relaxation statistics of that forward/backward per block
    ({'block': name, phase: {iters, residual, converged}, ...})."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    with preserved(model):
        if estimator is not None:
            set_estimator(model, estimator)
        with torch.enable_grad():
            out = model(x, target=y) if target else model(x)
            value = loss(out.float() if out.dtype in (torch.float16, torch.bfloat16) else out, y)
            grads = torch.autograd.grad(value, [p for _, p in named], allow_unused=True)
        names = [m.block_name for m in model.modules() if isinstance(m, EnergyBlock)]
        stats = [{"block": n, **st} for n, st in zip(names, relax_stats(model))]
    return {n: (torch.zeros_like(p) if g is None else g.detach()) for (n, p), g in zip(named, grads)}, stats


def energy_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in named_parameters) of the parameters inside energy-based blocks."""
    return {f"{prefix}.{n}" if prefix else n for prefix, m in model.named_modules() if isinstance(m, EnergyBlock)
            for n, _ in m.named_parameters()}


def agreement(estimate: dict[str, Tensor], reference: dict[str, Tensor], block_names: set[str]) -> dict:
    """flat_cos / flat_rel over all tensors, worst_tensor_cos (and its name) over the
    energy blocks' tensors, and per tensor {cos, rel}."""
    names = list(reference)
    per = {n: {"cos": cosine(estimate[n], reference[n]), "rel": _finite(rel_error(estimate[n], reference[n]))}
           for n in names}
    blocks = [n for n in names if n in block_names] or names
    worst = min(blocks, key=lambda n: per[n]["cos"])
    return {"flat_cos": cosine([estimate[n] for n in names], [reference[n] for n in names]),
            "flat_rel": _finite(rel_error([estimate[n] for n in names], [reference[n] for n in names])),
            "worst_tensor_cos": per[worst]["cos"], "worst_tensor": worst, "per_tensor": per}


def _finite(v: float) -> float | None:
    return v if v == v and abs(v) != float("inf") else None


class FidelityMonitor:
    """The trainer's `monitor_fidelity`: the model's own estimator against ID (MINRES, the
    REFERENCE settings) on one fixed batch, without side effects on training (`gradients_of`).

    Refuses (ValueError) a model without energy-based blocks, one whose estimator-carrying
    modules ID cannot differentiate (Hamiltonian units), and blocks with a non-ideal device
    model (each forward would advance the device's noise stream)."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, loss: Loss = F.cross_entropy, target: bool = False):
        modules = estimator_modules(model)
        if not any(isinstance(m, EnergyBlock) for m in modules):
            raise ValueError(f"monitor_fidelity: {type(model).__name__} holds no energy-based block to compare "
                             f"with implicit differentiation")
        self.reference = ID(**REFERENCE)
        for m in modules:
            self.reference.check_applicable(m.estimator_kind, getattr(m, "block_name", type(m).__name__))
            device = getattr(m, "device", None)
            if device is not None and not device.ideal:
                raise ValueError(f"monitor_fidelity: {m.block_name} has a device model; measuring would advance its "
                                 f"noise stream and change the training run (set monitor_fidelity=0)")
        self.model, self.x, self.y, self.loss, self.target = model, x, y, loss, target
        self.names = energy_parameter_names(model)

    def measure(self) -> dict[str, float]:
        """{'fidelity_flat_cos': cosine over all parameters, 'fidelity_worst_tensor_cos':
        the lowest over the energy blocks' tensors} of the current estimator against ID."""
        ref = gradients_of(self.model, self.reference, self.x, self.y, self.loss, self.target)
        est = gradients_of(self.model, None, self.x, self.y, self.loss, self.target)
        a = agreement(est, ref, self.names)
        return {"fidelity_flat_cos": a["flat_cos"], "fidelity_worst_tensor_cos": a["worst_tensor_cos"]}


# ---- switches and the free phase -----------------------------------------------------------

def block_taps(model: nn.Module, estimator: Estimator, x: Tensor, y: Tensor, loss: Loss = F.cross_entropy
               ) -> list[tuple[EnergyBlock, Tensor, Tensor]]:
    """(block, input current u, error current delta = dl/ds_L) of every energy-based block,
    for one forward/backward of `model` with `estimator` (inside `preserved`)."""
    blocks = [m for m in model.modules() if isinstance(m, EnergyBlock)]
    us: dict[int, Tensor] = {}
    deltas: dict[int, Tensor] = {}

    def pre_hook(i: int):
        def hook(module, args):
            us[i] = args[0].detach()
        return hook

    def out_hook(i: int):
        def hook(module, args, out):
            if out.requires_grad:
                out.register_hook(lambda g: deltas.__setitem__(i, g.detach()))
        return hook

    handles = [h for i, b in enumerate(blocks)
               for h in (b.register_forward_pre_hook(pre_hook(i)), b.register_forward_hook(out_hook(i)))]
    try:
        gradients_of(model, estimator, x, y, loss)
    finally:
        for h in handles:
            h.remove()
    return [(b, us[i], deltas[i]) for i, b in enumerate(blocks) if i in us and i in deltas]


def count_switches(taps: list[tuple[EnergyBlock, Tensor, Tensor]], estimator: ContrastEstimator) -> dict:
    """Per block: switches (pool argmax, hard-sigmoid regime) between the free state and each
    of the two states `estimator` contrasts (its nudged phases re-run from the taps' currents),
    and the free state's fixed-point residual; with totals."""
    per_block, pool_total, regime_total = {}, 0, 0
    for block, u, delta in taps:
        with torch.no_grad():
            s, _ = block.relax(u)
            c = estimator.contrast(block, u, s, delta, None)
        a, b = switches(block, s, c.first), switches(block, s, c.second)
        pool = sum(a["pool_argmax"].values()) + sum(b["pool_argmax"].values())
        regime = sum(a["hardsigmoid_regime"].values()) + sum(b["hardsigmoid_regime"].values())
        per_block[block.block_name] = {"pool_argmax": pool, "hardsigmoid_regime": regime, "first": a, "second": b,
                                       "fixed_point_residual": fixed_point_residual(block, s, u)}
        pool_total, regime_total = pool_total + pool, regime_total + regime
    return {"pool_argmax": pool_total, "hardsigmoid_regime": regime_total, "blocks": per_block}


# ---- one model, one batch ----------------------------------------------------------------

def measure(model: nn.Module, x: Tensor, y: Tensor, grid: list[dict], *, bptt_steps: int | None = None,
            with_switches: bool = True, loss: Loss = F.cross_entropy, echo: Callable[[str], None] = print,
            id_damping: tuple[float, ...] = ()) -> dict:
    """The comparison of one model on one batch: {'reference': ID and BPTT on their own,
    'rows': one per EP setting of `grid` (dicts of EP settings, e.g. {'beta': 0.2, 'pool':
    'held', 'variant': 'centered', 'T2': 20}), then one per damping of `id_damping` (ID with
    that damping, the reference's solver settings otherwise; 'vs_ep' against each EP row)}."""
    names = energy_parameter_names(model)
    t0 = time.process_time()
    ref, stats = gradients_and_stats(model, ID(**REFERENCE), x, y, loss)
    free = [{"block": st["block"], **st.get("free", {})} for st in stats]
    bptt = gradients_of(model, BPTT(T2=bptt_steps), x, y, loss)
    reference = {"id_adjoint": [{"block": st["block"], **st.get("adjoint", {})} for st in stats], "free": free,
                 "cpu_s": time.process_time() - t0,
                 "bptt_steps": bptt_steps or "T1", "bptt_vs_id": _short(agreement(bptt, ref, names))}
    rows, ep_grads = [], []
    for settings in grid + [{"damping": mu} for mu in id_damping]:
        t0 = time.process_time()
        is_ep = "damping" not in settings
        est = EP(**settings) if is_ep else ID(**{**REFERENCE, **settings})
        g = gradients_of(model, est, x, y, loss)
        vs_id, vs_bptt = agreement(g, ref, names), agreement(g, bptt, names)
        head = {"estimator": "ep", **settings} if is_ep else {
            "estimator": "id", "beta": None, "variant": "id", "pool": f"damping {settings['damping']:g}", **settings}
        row = {**head, **{k: vs_id[k] for k in ("flat_cos", "worst_tensor_cos", "worst_tensor", "flat_rel")},
               "flat_cos_bptt": vs_bptt["flat_cos"], "worst_tensor_cos_bptt": vs_bptt["worst_tensor_cos"],
               "per_tensor": {n: {"cos_id": v["cos"], "rel_id": v["rel"], "cos_bptt": vs_bptt["per_tensor"][n]["cos"],
                                  "rel_bptt": vs_bptt["per_tensor"][n]["rel"]} for n, v in vs_id["per_tensor"].items()},
               "free": free}
        if is_ep:
            ep_grads.append((row, g))
        else:
            row["vs_ep"] = [{**{k: r[k] for k in ("beta", "variant", "pool")},
                             **{k: a[k] for k in ("flat_cos", "worst_tensor_cos")}}
                            for r, e in ep_grads for a in [agreement(g, e, names)]]
        if with_switches and is_ep:
            row["switches"] = count_switches(block_taps(model, est, x, y, loss), est)
        row["cpu_s"] = time.process_time() - t0
        rows.append(row)
        sw = row.get("switches", {})
        what = (f"beta {settings['beta']:g} {settings['variant']} pool={settings['pool']}" if is_ep else
                f"id damping {settings['damping']:g}" + "".join(
                    f" (flat cos vs EP beta {v['beta']:g} {v['pool']}: {v['flat_cos']:.4f})" for v in row["vs_ep"]))
        echo(f"  {what}: flat cos "
             f"{row['flat_cos']:.4f}, worst tensor {row['worst_tensor_cos']:.4f} ({row['worst_tensor']}); vs BPTT "
             f"{row['flat_cos_bptt']:.4f} / {row['worst_tensor_cos_bptt']:.4f}"
             + (f"; switches {sw.get('pool_argmax', '-')} argmax, {sw.get('hardsigmoid_regime', '-')} regime"
                if is_ep else ""))
    return {"reference": reference, "rows": rows}


def _short(a: dict) -> dict:
    return {k: a[k] for k in ("flat_cos", "flat_rel", "worst_tensor_cos", "worst_tensor")}


# ---- models -----------------------------------------------------------------------------

def _dhn(n_blocks: int, seed: int, args: argparse.Namespace, dtype: torch.dtype) -> tuple[nn.Module, Tensor, Tensor]:
    T1 = 60 if args.T1 is None else args.T1
    model = dhn_model(DHN_L6, n_blocks, args.width_div, seed, in_size=args.in_size, slope=1.0,
                      variance=GOE_V * args.width_div, T1=T1, update="async").to(dtype).train()
    x, y = synthetic_images(args.batch, args.in_size, 10, seed, dtype=dtype)
    return model, x, y


def _batch(cfg: dict, index: int, batch: int, dtype: torch.dtype, data_dir: str | None):
    """Batch number `index` of the config's training set in file order (no shuffling), and the
    data description the model builder needs."""
    from ..data import DeviceLoader, default_std_factor, load_dataset
    from ..training.models import model_inputs
    train = load_dataset(cfg["dataset"], "train", data_dir or cfg["data_dir"], **cfg["dataset_options"])
    std = cfg["std_factor"] if cfg["std_factor"] is not None else default_std_factor(train.name)
    loader = DeviceLoader(train, batch, train=False, augment=False, std_factor=std, dtype=dtype,
                          limit=min(len(train), batch * (index + 1)))
    for i, (x, y) in enumerate(loader):
        if i == index:
            return x, y, model_inputs(train)
    raise _bad(f"fidelity: the training set of {cfg['dataset']} holds no batch {index} of {batch}")


def _demo(seed: int, args: argparse.Namespace, dtype: torch.dtype) -> tuple[nn.Module, Tensor, Tensor, dict]:
    from ..training.config import load_config
    from ..training.models import build_model
    overrides = [] if args.T1 is None else [f"model.T1={args.T1}"]
    cfg = load_config("fmnist_cpu", overrides)
    x, y, info = _batch(cfg, seed, args.batch, dtype, args.data_dir)
    torch.manual_seed(seed)
    model = build_model(cfg, info).to(dtype).train()
    return model, x, y, cfg


def checkpoint_files(paths: list[str]) -> list[Path]:
    """The checkpoint files named by `paths`: files as given, run folders expanded to the
    checkpoints they hold (checkpoint.pt and the previous one kept beside it)."""
    from ..training.checkpoint import previous_path
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = [f for f in (p / "checkpoint.pt", previous_path(p / "checkpoint.pt")) if f.is_file()]
            if not found:
                raise _bad(f"fidelity: --checkpoints {p}: the folder holds no checkpoint.pt")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise _bad(f"fidelity: --checkpoints {p}: no such file or folder")
    return out


def _checkpoint(path: Path, seed: int, args: argparse.Namespace, dtype: torch.dtype):
    from ..training import checkpoint as ckpt_io
    from ..training.config import DEFAULTS, merge
    from ..training.models import build_model
    state = ckpt_io.load(path)
    cfg = merge(DEFAULTS, state["config"], allow_new=True)
    if args.T1 is not None:
        cfg["model"]["T1"] = args.T1
    x, y, info = _batch(cfg, seed, args.batch, dtype, args.data_dir)
    model = build_model(cfg, info)
    ckpt_io.load_model_state(model, state["model"], path)
    model = model.to(dtype).train()
    pos = state["position"]
    from ..data import DeviceLoader, load_dataset  # steps per epoch of that run
    train = load_dataset(cfg["dataset"], "train", args.data_dir or cfg["data_dir"], **cfg["dataset_options"])
    per_epoch = len(DeviceLoader(train, cfg["batch_size"], train=True, limit=cfg["limit_train"]))
    where = {"checkpoint": str(path), "epoch": pos["epoch"], "step_in_epoch": pos["step"],
             "step": pos["epoch"] * per_epoch + pos["step"]}
    return model, x, y, cfg, where


# ---- output -----------------------------------------------------------------------------

def markdown(result: dict) -> str:
    """One table row per model, step, beta, variant and pool (damped ID: variant 'id', pool
    'damping MU', and its flat cosine with the batch's first EP row): seeds side by side."""
    lines = ["| model | step | beta | variant | pool | worst tensor cos (per seed) | flat cos (per seed) | "
             "worst vs BPTT | argmax / regime switches | free iters | flat cos vs first EP row |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in result["models"].items():
        groups: dict[tuple, list[dict]] = {}
        for r in m["seeds"]:
            groups.setdefault((r.get("step") or 0, r["beta"], r["variant"], r["pool"]), []).append(r)
        for (step, beta, variant, pool), rows in groups.items():
            sw = [r.get("switches") for r in rows]
            sw_text = ", ".join(f"{s['pool_argmax']}/{s['hardsigmoid_regime']}" for s in sw if s) or "-"
            iters = ", ".join("+".join(str(b.get("iters", "?")) for b in r["free"]) for r in rows)
            worst = ", ".join(f"{r['worst_tensor_cos']:.3f}" for r in rows)
            flat = ", ".join(f"{r['flat_cos']:.4f}" for r in rows)
            bptt = ", ".join(f"{r['worst_tensor_cos_bptt']:.3f}" for r in rows)
            vs_ep = ", ".join(f"{r['vs_ep'][0]['flat_cos']:.4f}" for r in rows if r.get("vs_ep")) or "-"
            lines.append(f"| {name} | {step} | {'-' if beta is None else f'{beta:g}'} | {variant} | {pool} | {worst} | "
                         f"{flat} | {bptt} | {sw_text} | {iters} | {vs_ep} |")
    return "\n".join(lines)


def plot(result: dict, path: str | os.PathLike) -> None:
    """Left: worst-tensor and flat cosine against ID per model, beta and pool (seeds as
    points). Right (when checkpoints were measured): both along training. EP rows only."""
    plt = pyplot()
    models = {n: {"seeds": [r for r in m["seeds"] if r.get("estimator", "ep") == "ep"]}
              for n, m in result["models"].items()}
    init = {n: [r for r in m["seeds"] if r.get("checkpoint") is None] for n, m in models.items()}
    init = {n: rows for n, rows in init.items() if rows}
    along = {n: [r for r in m["seeds"] if r.get("checkpoint") is not None] for n, m in models.items()}
    along = {n: rows for n, rows in along.items() if rows}
    ncols = max(len(init) + (1 if along else 0), 1)
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols + (2.5 if along else 0), 3.6), squeeze=False)
    for ax, (name, rows) in zip(axes[0], init.items()):
        keys = sorted({(r["beta"], r["variant"], r["pool"]) for r in rows}, key=lambda k: (-k[0], k[1], k[2]))
        for i, key in enumerate(keys):
            sel = [r for r in rows if (r["beta"], r["variant"], r["pool"]) == key]
            ax.plot([i - 0.1] * len(sel), [r["worst_tensor_cos"] for r in sel], "o", color="C0",
                    label="worst tensor" if i == 0 else None)
            ax.plot([i + 0.1] * len(sel), [r["flat_cos"] for r in sel], "s", color="C1",
                    label="all parameters" if i == 0 else None)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f"b={b:g}\n{v[0]} {p}" for b, v, p in keys], fontsize=7)
        ax.set_title(f"{name}: EP vs ID at initialisation", fontsize=9)
        ax.set_ylabel("cosine")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if along:
        ax = axes[0][-1]
        for j, (name, rows) in enumerate(along.items()):
            keys = sorted({(r["beta"], r["variant"], r["pool"]) for r in rows})
            for k, key in enumerate(keys):
                sel = sorted((r for r in rows if (r["beta"], r["variant"], r["pool"]) == key), key=lambda r: r["step"])
                steps = sorted({r["step"] for r in sel})
                worst = [min(r["worst_tensor_cos"] for r in sel if r["step"] == s) for s in steps]
                flat = [min(r["flat_cos"] for r in sel if r["step"] == s) for s in steps]
                c = f"C{(j * len(keys) + k) % 10}"
                tag = f"{name.split('@')[0]} b={key[0]:g} {key[1]} {key[2]}"
                ax.plot(steps, worst, "o-", color=c, label=f"{tag}: worst")
                ax.plot(steps, flat, "s--", color=c, label=f"{tag}: all")
        ax.set_xlabel("training step")
        ax.set_ylabel("cosine with ID (lowest over seeds)")
        ax.set_title("along training", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- command line -----------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=["dhn3", "dhn1", "demo"], metavar="MODEL",
                        help="models at initialisation: " + "; ".join(f"{k}: {v}" for k, v in MODELS.items())
                        + " (--models none: only the checkpoints)")
    parser.add_argument("--checkpoints", nargs="+", default=[], metavar="PATH",
                        help="training checkpoints (files, or run folders: their checkpoint.pt and the previous one)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="initialisation and batch per seed (at a checkpoint: the batch only)")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.2, 0.02])
    parser.add_argument("--variants", nargs="+", default=["centered"], choices=list(VARIANTS))
    parser.add_argument("--pools", nargs="+", default=["free", "held"], choices=list(POOLS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--T1", type=int, default=None,
                        help="free-phase iterations (default: 60 for the DHNs, the config's for demo and checkpoints)")
    parser.add_argument("--T2", type=int, default=None,
                        help="EP's nudged-phase iterations (default: 20 for the DHNs, the config's estimator.ep.T2 "
                             "for demo and checkpoints)")
    parser.add_argument("--anderson", type=int, default=None,
                        help="Anderson acceleration (history length) of every relaxation of every model's blocks "
                             "(default: the model's own setting; 0: off)")
    parser.add_argument("--omega", type=float, default=None,
                        help="over-relaxation of every relaxation of every model's blocks (default: the model's own "
                             "setting; 1: off)")
    parser.add_argument("--mirror", action="store_true",
                        help="centered EP starts its -beta phase from the mirror image of the +beta one")
    parser.add_argument("--ep-tol", type=float, default=None,
                        help="EP's nudged phases stop at this relative change, T2 as the cap (default: the config's)")
    parser.add_argument("--id-damping", type=float, nargs="+", default=[], metavar="MU",
                        help="also measure ID with these adjoint dampings (ID(damping=MU)) against ID, BPTT and "
                             "each EP row")
    parser.add_argument("--bptt-steps", type=int, default=None, help="BPTT's unrolled steps (default: T1)")
    parser.add_argument("--width-div", type=int, default=1, help="divide the DHNs' widths by this (tests, quick runs)")
    parser.add_argument("--in-size", type=int, default=32, help="image size of the DHNs' batch")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--no-switches", action="store_true", help="skip counting argmax and regime switches")
    parser.add_argument("--data-dir", default=None, help="data folder for demo and checkpoints")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default="runs/fidelity", help="output folder (fidelity.json, .md, .png)")
    parser.add_argument("--json", default=None, help="write the JSON here instead of OUT/fidelity.json")
    parser.add_argument("--figure", default=None, help="write the figure here instead of OUT/fidelity.png")
    parser.add_argument("--no-figure", action="store_true", help="skip the figure (no matplotlib needed)")
    parser.add_argument("--replot", default=None, metavar="JSON",
                        help="measure nothing: write the table and the figure of an earlier run's JSON")


def _bad(message: str) -> ValueError:
    """A user's mistake as eqprop's ConfigError (a ValueError: `eqprop` prints it as one line).
    Imported here: eqprop.training imports this module for its monitor."""
    from ..training.config import ConfigError
    return ConfigError(message)


def _check(args: argparse.Namespace) -> list[str]:
    models = [] if args.models == ["none"] else list(args.models)
    bad = [m for m in models if m not in MODELS]
    if bad:
        raise _bad(f"fidelity: unknown model(s) {bad} in --models; expected some of {sorted(MODELS)} or none")
    if not models and not args.checkpoints:
        raise _bad("fidelity: nothing to measure: give --models or --checkpoints")
    for key in ("batch", "width_div", "in_size", "threads", "T1", "T2", "bptt_steps"):
        v = getattr(args, key)
        if v is not None and v < 1:
            raise _bad(f"fidelity: --{key.replace('_', '-')} must be a positive integer, got {v}")
    if args.anderson is not None and args.anderson < 0:
        raise _bad(f"fidelity: --anderson must be an integer >= 0, got {args.anderson}")
    if args.omega is not None and not 0 < args.omega < 2:
        raise _bad(f"fidelity: --omega must be in (0, 2), got {args.omega}")
    if args.ep_tol is not None and not args.ep_tol > 0:
        raise _bad(f"fidelity: --ep-tol must be > 0, got {args.ep_tol}")
    if any(s < 0 for s in args.seeds):
        raise _bad(f"fidelity: --seeds must be integers >= 0, got {args.seeds}")
    if any(not b > 0 for b in args.betas):
        raise _bad(f"fidelity: --betas must be > 0, got {args.betas}")
    if any(not (0 < mu < float("inf")) for mu in args.id_damping):
        raise _bad(f"fidelity: --id-damping must be finite numbers > 0, got {args.id_damping}")
    return models


def _grid(args: argparse.Namespace, T2: int, tol: float | None) -> list[dict]:
    tol = args.ep_tol if args.ep_tol is not None else tol
    return [{"beta": b, "variant": v, "pool": p, "T2": T2, "tol": tol,
             **({"mirror": True} if args.mirror and v == "centered" else {})}
            for b in args.betas for v in args.variants for p in args.pools]


def _ep_settings(cfg: dict) -> tuple[int, float | None]:
    ep = cfg["estimator"].get("ep") or {}
    return int(ep.get("T2", 20)), ep.get("tol")


def _replot(args: argparse.Namespace) -> int:
    path = Path(args.replot)
    if not path.is_file():
        raise _bad(f"fidelity: --replot {path}: no such file")
    result = json.loads(path.read_text())
    if not isinstance(result, dict) or not isinstance(result.get("models"), dict):
        raise _bad(f"fidelity: --replot {path}: not a fidelity JSON (no 'models')")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(result)
    (out / "fidelity.md").write_text(table + "\n")
    print(table)
    if not args.no_figure:
        fig_path = Path(args.figure) if args.figure else out / "fidelity.png"
        fig_path.parent.mkdir(parents=True, exist_ok=True)
        plot(result, fig_path)
        print(f"wrote {out / 'fidelity.md'}, {fig_path}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.replot:
        return _replot(args)
    models = _check(args)
    checkpoints = checkpoint_files(args.checkpoints)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    result: dict = {"settings": {k: v for k, v in vars(args).items()}, "reference": dict(REFERENCE),
                    "threads": torch.get_num_threads(), "models": {}}
    swi = not args.no_switches

    def add(name: str, description: str, seed: int, model: nn.Module, x: Tensor, y: Tensor, grid: list[dict],
            where: dict) -> None:
        print(f"{name} seed {seed}{' at ' + where['checkpoint'] if where.get('checkpoint') else ''}:", flush=True)
        if args.anderson is not None:
            model.configure_blocks(anderson=args.anderson)
        if args.omega is not None:
            model.configure_blocks(omega=args.omega)
        m = measure(model, x, y, grid, bptt_steps=args.bptt_steps, with_switches=swi,
                    id_damping=tuple(args.id_damping))
        entry = result["models"].setdefault(name, {"description": description, "seeds": [], "references": []})
        entry["references"].append({"seed": seed, **where, **m["reference"]})
        entry["seeds"] += [{"seed": seed, **where, **r} for r in m["rows"]]

    init = {"checkpoint": None, "step": 0}
    for name in models:
        for seed in args.seeds:
            if name == "demo":
                model, x, y, cfg = _demo(seed, args, dtype)
                T2, tol = _ep_settings(cfg)
            else:
                model, x, y = _dhn(3 if name == "dhn3" else 1, seed, args, dtype)
                T2, tol = 20, None
            add(name, MODELS[name] + (f" (widths / {args.width_div})" if name != "demo" and args.width_div > 1
                                      else ""), seed, model, x, y, _grid(args, args.T2 or T2, tol), init)
    for path in checkpoints:
        for seed in args.seeds:
            model, x, y, cfg, where = _checkpoint(path, seed, args, dtype)
            T2, tol = _ep_settings(cfg)
            add(f"{cfg['name']}@checkpoints", f"checkpoints of a {cfg['name']} training run", seed, model, x, y,
                _grid(args, args.T2 or T2, tol), where)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = Path(args.json) if args.json else out / "fidelity.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    table = markdown(result)
    (out / "fidelity.md").write_text(table + "\n")
    print(table)
    written = [str(json_path), str(out / "fidelity.md")]
    if not args.no_figure:
        fig_path = Path(args.figure) if args.figure else out / "fidelity.png"
        fig_path.parent.mkdir(parents=True, exist_ok=True)
        plot(result, fig_path)
        written.append(str(fig_path))
    print("wrote " + ", ".join(written))
    return 0

