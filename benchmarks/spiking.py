"""EqSpike measurements (docs/spiking.md): results go to benchmarks/results/spiking.json, one
section per subcommand (a run replaces its own section only).

  python -m benchmarks.spiking convergence   # cosine of spike-based updates with rate-based EP's
  python -m benchmarks.spiking stdp          # the STDP-like window -> docs/figures/stdp_window.png
  python -m benchmarks.spiking train --data-dir DIR [--limit-train N --limit-test N --seeds S ... --runs ...]
                                             # EqSpike vs rate-based EP on Fashion-MNIST, 1 epoch
  python -m benchmarks.spiking gradients --data-dir DIR  # the same cosines on the Fashion-MNIST network
  python -m benchmarks.spiking report        # the results as the markdown tables of docs/spiking.md

Everything runs with torch.set_num_threads(1).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from eqprop import EP, DenseHopfield, EqSpike, SpikingDenseHopfield
from eqprop.spiking import SPIKE_SETTINGS, stdp_window, trace_decay

RESULTS = Path(__file__).resolve().parent / "results" / "spiking.json"
FIGURE = Path(__file__).resolve().parent.parent / "docs" / "figures" / "stdp_window.png"
DT = torch.float64


def save(section: str, data: dict) -> None:
    out = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    out[section] = data
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote section {section!r} of {RESULTS}")


# ---- convergence to rate-based EP ---------------------------------------------------------

def tiny(copies: int):
    """The [3, 4, 2] logistic block of tests/test_spiking.py, two samples repeated `copies` times."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    block = DenseHopfield([3, 4, 2], activation="sigmoid", alpha=1.5, T1=400).to(DT)
    u = torch.randn(2, 3, generator=g, dtype=DT).repeat(copies, 1)
    y = torch.rand(2, 2, generator=g, dtype=DT).repeat(copies, 1)
    return block, u, y


def gradient(block, estimator, u, y) -> torch.Tensor:
    block.estimator = estimator
    params = list(block.parameters())
    for p in params:
        p.grad = None
    uu = u.clone().requires_grad_(True)
    (0.5 * ((block(uu) - y) ** 2).sum()).backward()
    return torch.cat([p.grad.flatten() for p in params] + [uu.grad.flatten()])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def convergence(args: argparse.Namespace) -> None:
    """Cosine between the estimates on spiking neurons and rate-based EP's (same weights, same
    beta and variant), against the spikes per step at full drive p = rate dt / threshold and
    the filter's length tau / dt; N = p tau / dt spikes per filter time constant."""
    rows = []
    for spiking, copies in (("stochastic", args.copies), ("deterministic", 1)):
        rate_block, u, y = tiny(copies)
        for variant in ("positive", "centered"):
            reference = gradient(rate_block, EP(beta=args.beta, variant=variant, T2=400), u, y)
            for tau in args.taus:
                for p in args.rates:
                    block = SpikingDenseHopfield.from_dense(rate_block, spiking=spiking, tau=tau, dt=1.0, rate=p)
                    block.T1 = int(6 * tau)
                    T2 = int(4 * tau)
                    row = dict(spiking=spiking, copies=copies, variant=variant, beta=args.beta, tau=tau, dt=1.0,
                               rate=p, threshold=1.0, spikes_per_tau=p * tau, T1=block.T1, T2=T2)
                    for name, est in (("eqspike", EqSpike(beta=args.beta, variant=variant, T2=T2)),
                                      ("ep_on_spikes", EP(beta=args.beta, variant=variant, T2=T2))):
                        torch.manual_seed(0)
                        row[f"cosine_{name}"] = round(cosine(gradient(block, est, u, y), reference), 4)
                    rows.append(row)
                    print(row, flush=True)
    save("convergence", {"command": "python -m benchmarks.spiking convergence", "threads": 1,
                         "model": "DenseHopfield([3, 4, 2], sigmoid, alpha=1.5), float64, 2 samples",
                         "rows": rows})


# ---- STDP-like window ---------------------------------------------------------------------

def stdp(args: argparse.Namespace) -> None:
    """Weight change of one synapse for one pre- and one post-synaptic spike k steps apart."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tau, dt, rate = args.tau, 1.0, 1.0
    offsets = list(range(-int(4 * tau), int(4 * tau) + 1))
    dw = stdp_window(offsets, tau=tau, dt=dt, rate=rate)
    a, h = trace_decay(dt, tau), 1.0 / (rate * dt)
    unit = h * h * (1 - a) ** 2  # the depression next to coincidence
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.axhline(0, color="0.7", lw=0.8)
    ax.vlines([k * dt / tau for k in offsets], 0, (dw / unit).tolist(), color="C0", lw=1.5)
    ax.plot([k * dt / tau for k in offsets], (dw / unit).tolist(), "o", color="C0", ms=2.5)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("(t_post - t_pre) / tau")
    ax.set_ylabel("weight change / (h (1 - a))^2")
    ax.set_title(f"EqSpike, one spike pair (tau = {tau:g} dt, rate dt = threshold)", fontsize=10)
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=120, metadata={"Software": None})
    plt.close(fig)
    print(f"wrote {FIGURE}")
    save("stdp", {"command": f"python -m benchmarks.spiking stdp --tau {tau:g}", "tau": tau, "dt": dt, "rate": rate,
                  "threshold": 1.0, "coincident": float(dw[offsets.index(0)]),
                  "next_to_coincident": float(dw[offsets.index(1)]), "sum_over_offsets": float(dw.sum()),
                  "figure": "docs/figures/stdp_window.png"})


# ---- training on Fashion-MNIST ------------------------------------------------------------

RUNS = {
    "rate_ep": ["model.kind=dense", "algorithm=ep"],
    "eqspike_stochastic": ["algorithm=eqspike", "model.spiking=stochastic"],
    "eqspike_deterministic": ["algorithm=eqspike", "model.spiking=deterministic"],
    "ep_on_spikes": ["algorithm=ep", "model.spiking=stochastic"],
    "eqspike_positive": ["algorithm=eqspike", "model.spiking=stochastic", "estimator.eqspike.variant=positive"],
}


def train(args: argparse.Namespace) -> None:
    """One epoch of fmnist_dense_eqspike per run and seed, on the first limit_train / limit_test
    images; results are kept per seed (runs of other seeds with the same settings are kept)."""
    from eqprop.training.config import load_config
    from eqprop.training.trainer import Trainer

    common = [f"limit_train={args.limit_train}", f"limit_test={args.limit_test}", "epochs=1", "threads=1",
              "progress=false", "tensorboard=false", *args.overrides]
    data = [f"data_dir={args.data_dir}"] if args.data_dir else []  # not recorded: a path of this machine
    previous = json.loads(RESULTS.read_text()).get("train", {}) if RESULTS.exists() else {}
    results = dict(previous.get("runs", {})) if previous.get("common") == common else {}
    for seed in args.seeds:
        for name in args.runs:
            overrides = [*common, f"seed={seed}", *data, *RUNS[name], f"out_dir={args.out}/{name}-seed{seed}"]
            cfg = load_config("fmnist_dense_eqspike", overrides)
            if cfg["model"]["kind"] == "dense":  # the same network of rate-based neurons: no spike settings
                for key in SPIKE_SETTINGS:
                    cfg["model"].pop(key)
            start = time.perf_counter()
            trainer = Trainer(cfg, echo=print)
            try:
                summary = trainer.fit()
            finally:
                trainer.close()
            last = summary["last"]
            run = results.setdefault(name, {"overrides": RUNS[name], "seeds": {}})
            run["seeds"][str(seed)] = {"test_top1": round(last["test_top1"], 2),
                                       "train_top1": round(last.get("train_top1", math.nan), 2),
                                       "seconds": round(time.perf_counter() - start, 1)}
            tops = [r["test_top1"] for r in run["seeds"].values()]
            run["mean_test_top1"] = round(sum(tops) / len(tops), 2)
            print(name, seed, run["seeds"][str(seed)], flush=True)
            save("train", {"command": "python -m benchmarks.spiking train " + " ".join(
                [f"--limit-train {args.limit_train}", f"--limit-test {args.limit_test}", "--data-dir DIR",
                 "--seeds SEED ...", *(f"--override {o}" for o in args.overrides)]),
                "config": "fmnist_dense_eqspike", "common": common, "runs": results})


def network_gradients(args: argparse.Namespace) -> None:
    """Per-tensor cosine of the spiking estimates with rate-based EP's on the Fashion-MNIST
    network of fmnist_dense_eqspike at initialisation, for one batch of training images."""
    import copy

    from eqprop import set_estimator
    from eqprop.data import load_dataset
    from eqprop.training.config import load_config
    from eqprop.training.models import build_model

    cfg = load_config("fmnist_dense_eqspike", ["algorithm=eqspike"])
    est = cfg["estimator"]["eqspike"]
    data = load_dataset("fashion_mnist", "train", args.data_dir)
    x = (data.x[:args.batch].float() / 255 - data.mean[0]) / data.std[0]
    y = data.y[:args.batch]
    info = {"num_classes": 10, "kind": "image", "shape": tuple(data.x.shape[1:])}

    def build(kind_cfg: dict) -> torch.nn.Module:
        torch.manual_seed(args.seed)
        return build_model(kind_cfg, info)

    def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(args.seed + 1)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    rate_cfg = copy.deepcopy(cfg)
    rate_cfg["model"]["kind"], rate_cfg["algorithm"] = "dense", "ep"
    for key in SPIKE_SETTINGS:
        rate_cfg["model"].pop(key)
    rate_cfg["estimator"]["ep"] = dict(est)
    reference = grads(build(rate_cfg))
    rows = {}
    for spiking in ("stochastic", "deterministic"):
        spk_cfg = copy.deepcopy(cfg)
        spk_cfg["model"]["spiking"] = spiking
        model = build(spk_cfg)
        rows[f"eqspike_{spiking}"] = grads(model)
        set_estimator(model, "ep", **est)
        rows[f"ep_on_spikes_{spiking}"] = grads(model)
    table = {name: {n: round(cosine(g[n].flatten(), reference[n].flatten()), 3) for n in reference}
             for name, g in rows.items()}
    for name, row in table.items():
        print(name, row, flush=True)
    save("network_gradients", {"command": f"python -m benchmarks.spiking gradients --data-dir DIR --batch {args.batch} "
                                          f"--seed {args.seed}", "threads": 1, "estimator": est,
                               "reference": "rate-based EP, same settings and initial weights", "cosines": table})


def report(args: argparse.Namespace) -> None:
    """The measurements of benchmarks/results/spiking.json as the markdown of docs/spiking.md."""
    data = json.loads(RESULTS.read_text())
    rows = data.get("convergence", {}).get("rows", [])
    if rows:
        print("| neurons | variant | tau / dt | p | N = p tau / dt | eqspike | ep on spikes |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['spiking']} | {r['variant']} | {r['tau']:g} | {r['rate']:g} | {r['spikes_per_tau']:g} | "
                  f"{r['cosine_eqspike']:.4f} | {r['cosine_ep_on_spikes']:.4f} |")
        print()
    runs = data.get("train", {}).get("runs", {})
    if runs:
        print("| run | overrides | test top-1 per seed (%) | mean | seconds per run |")
        print("|---|---|---|---|---|")
        for name, run in runs.items():
            seeds = run["seeds"]
            tops = ", ".join(f"{seeds[s]['test_top1']:.2f} (seed {s})" for s in sorted(seeds))
            secs = ", ".join(f"{seeds[s]['seconds']:.0f}" for s in sorted(seeds))
            print(f"| {name} | `{' '.join(run['overrides'])}` | {tops} | {run['mean_test_top1']:.2f} | {secs} |")
        print()
    if "stdp" in data:
        s = data["stdp"]
        grads = data.get("network_gradients", {}).get("cosines", {})
    if grads:
        names = list(next(iter(grads.values())))
        print("| estimate | " + " | ".join(f"`{n}`" for n in names) + " |")
        print("|---|" + "---|" * len(names))
        for est, row in grads.items():
            print(f"| {est} | " + " | ".join(f"{row[n]:.3f}" for n in names) + " |")
        print()
    print(f"stdp: coincident {s['coincident']:.4f}, next to coincident {s['next_to_coincident']:.4f}")


def main() -> None:
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.spiking", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convergence", help="cosine of spike-based updates with rate-based EP's")
    c.add_argument("--copies", type=int, default=1024, help="repeats of the 2 samples (stochastic spiking)")
    c.add_argument("--beta", type=float, default=0.5)
    c.add_argument("--taus", type=float, nargs="+", default=[50.0, 200.0])
    c.add_argument("--rates", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    s = sub.add_parser("stdp", help="the STDP-like window, docs/figures/stdp_window.png")
    s.add_argument("--tau", type=float, default=10.0)
    t = sub.add_parser("train", help="EqSpike vs rate-based EP, 1 epoch of a Fashion-MNIST subset")
    t.add_argument("--data-dir", default=None, help="folder holding fashion_mnist/ (default: the loader's)")
    t.add_argument("--limit-train", type=int, default=10000)
    t.add_argument("--limit-test", type=int, default=2000)
    t.add_argument("--seeds", type=int, nargs="+", default=[0])
    t.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    t.add_argument("--override", dest="overrides", action="append", default=[],
                   help="extra config override for every run (repeatable)")
    t.add_argument("--out", default="runs/spiking", help="folder of the runs' outputs")
    n = sub.add_parser("gradients", help="cosines with rate-based EP on the Fashion-MNIST network, one batch")
    n.add_argument("--data-dir", default=None, help="folder holding fashion_mnist/ (default: the loader's)")
    n.add_argument("--batch", type=int, default=64)
    n.add_argument("--seed", type=int, default=0)
    sub.add_parser("report", help="print the results as markdown tables")
    args = parser.parse_args()
    {"convergence": convergence, "stdp": stdp, "train": train, "gradients": network_gradients,
     "report": report}[args.command](args)


if __name__ == "__main__":
    main()
