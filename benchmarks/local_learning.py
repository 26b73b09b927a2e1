"""EP, continual EP (C-EP), vector-field EP (VF-EP) and continual VF (C-VF) on the same dense
Fashion-MNIST network, trained by the Trainer from the fmnist_dense_* configs: test accuracy,
training time, and for the vector-field runs the angle between B and W^T along training and
the cosine between the block's VF-EP gradient and the true gradient of its dynamics (implicit
differentiation) on a probe batch (docs/local_learning.md).

    EQPROP_DATA=/usr/share/datasets .venv/bin/python benchmarks/local_learning.py [--limit-train 60000] [--epochs 1]

Writes benchmarks/results/local_learning.json. With --theory instead: the per-step property of
C-EP on a small float64 block (the normalised update of nudged step t against truncated
backprop's gradient for the t-th last free step, synchronous and asynchronous updates) and the
distance of the summed C-EP update from EP's as eta grows; writes
benchmarks/results/local_learning_theory.json (seconds). The probe (256 training examples, every
`--every` steps) runs on a copy of the model and changes no parameter. Threads: 1.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from eqprop import EP, TBP, ContinualEP, DenseHopfield
from eqprop.registry import set_estimator
from eqprop.testing import check_estimator, cosine, gradients, rel_error
from eqprop.training.config import load_config
from eqprop.training.trainer import Trainer
from eqprop.vector_field import VectorFieldBlock, model_backward_angles

RESULTS = Path(__file__).resolve().parent / "results" / "local_learning.json"
THEORY = RESULTS.with_name("local_learning_theory.json")

# (label, config, overrides)
RUNS = [
    ("EP (centered)", "fmnist_dense_ep", []),
    ("C-EP (centered)", "fmnist_dense_continual", []),
    ("EP (positive)", "fmnist_dense_ep", ["estimator.ep.variant=positive"]),
    ("C-EP (positive)", "fmnist_dense_continual", ["estimator.continual.variant=positive"]),
    ("VF-EP", "fmnist_dense_vf", []),
    ("C-VF", "fmnist_dense_cvf", []),
    ("VF-EP, weight decay 0.02", "fmnist_dense_vf", ["optim.weight_decay=0.02"]),
    ("EP (centered), weight decay 0.02", "fmnist_dense_ep", ["optim.weight_decay=0.02"]),
    ("EP (centered), lr 0.01", "fmnist_dense_ep", ["optim.lr=0.01"]),
    ("C-EP (centered), eta = lr = 0.01", "fmnist_dense_continual", ["optim.lr=0.01", "estimator.continual.eta=0.01"]),
    ("EP (positive), lr 0.01", "fmnist_dense_ep", ["optim.lr=0.01", "estimator.ep.variant=positive"]),
    ("C-EP (positive), eta = lr = 0.01", "fmnist_dense_continual",
     ["optim.lr=0.01", "estimator.continual.eta=0.01", "estimator.continual.variant=positive"]),
]


def block_params(model: nn.Module) -> list[torch.Tensor]:
    """The forward couplings' parameters of every vector-field block."""
    return [p for m in model.modules() if isinstance(m, VectorFieldBlock) for p in m.couplings.parameters()]


def probe_cosine(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Cosine between the gradient estimate of the model's own estimator (VF-EP, or C-VF's
    -change/eta) for the blocks' forward couplings and the true gradient of the asymmetric
    dynamics (implicit differentiation)."""
    probe = copy.deepcopy(model)
    out = []
    for est in (None, "id"):
        if est is not None:
            set_estimator(probe, est, max_iter=200, tol=1e-6)
        probe.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(probe(x), y).backward()
        out.append([p.grad.detach().clone() for p in block_params(probe)])
    return cosine(out[0], out[1])


def run(label: str, name: str, overrides: list[str], args: argparse.Namespace, out: Path) -> dict:
    cfg = load_config(name, overrides + [
        f"epochs={args.epochs}", f"limit_train={args.limit_train}", f"limit_test={args.limit_test}", "threads=1",
        "progress=false", "tensorboard=false", f"out_dir={out}", f"seed={args.seed}",
        *([f"data_dir={args.data_dir}"] if args.data_dir else [])])
    curve: list[dict] = []
    vf = cfg["model"]["kind"] == "vf_dense"
    probe: dict = {}

    def on_step(trainer: Trainer) -> None:
        step = trainer.epoch * len(trainer.train_loader) + trainer.step
        if vf and (step % args.every == 0 or step == 1):
            curve.append({"step": step, "angles_deg": model_backward_angles(trainer.model)[0],
                          "grad_cos_vs_id": probe_cosine(trainer.model, *probe["xy"])})

    t0 = time.perf_counter()
    trainer = Trainer(cfg, echo=lambda _m: None, on_step=on_step if vf else None)
    if vf:
        probe["xy"] = probe_batch(trainer)
        curve.append({"step": 0, "angles_deg": model_backward_angles(trainer.model)[0],
                      "grad_cos_vs_id": probe_cosine(trainer.model, *probe["xy"])})
    summary = trainer.fit()
    last = summary["last"]
    return {"label": label, "config": name, "overrides": overrides, "test_top1": last["test_top1"],
            "train_top1": last["train_top1"], "train_time_s": last["train_time_s"],
            "wall_s": time.perf_counter() - t0, "curve": curve}


def probe_batch(trainer: Trainer) -> tuple[torch.Tensor, torch.Tensor]:
    """256 training examples: the first batches of the loader's first epoch (fixed by the seed;
    the loader draws from its own generator, so this changes nothing in the run)."""
    xs, ys, n = [], [], 0
    for x, y in trainer.train_loader:
        xs.append(x)
        ys.append(y)
        n += x.shape[0]
        if n >= 256:
            break
    return torch.cat(xs)[:256], torch.cat(ys)[:256]


def small_block(update: str) -> tuple[DenseHopfield, torch.Tensor, torch.Tensor]:
    """A float64 dense block [3, 5, 4, 2] (logistic), an input and a target (seeded)."""
    torch.manual_seed(0)
    block = DenseHopfield([3, 5, 4, 2], activation="sigmoid", alpha=1.5, T1=3000, tol=1e-13, update=update)
    g = torch.Generator().manual_seed(1)
    block = block.double()
    return block, torch.randn(2, 3, generator=g, dtype=torch.float64), torch.rand(2, 2, generator=g,
                                                                                  dtype=torch.float64)


def per_step(update: str, variant: str, steps: int = 12, beta: float = 1e-5, eta: float = 1e-10) -> list[dict]:
    """Per nudged step t: cosine and relative error between C-EP's normalised update and
    -(TBP(K=t) - TBP(K=t-1)), the gradient truncated backprop gives the t-th last free step."""
    block, u, y = small_block(update)
    s, stats = block.relax(u)
    rule = ContinualEP(beta=beta, eta=eta, T2=steps, variant=variant)
    updates: list = []
    rule.run(block, u, s, s[-1] - y, callback=lambda t, d: updates.append([x / eta for x in d]))
    params = list(block.parameters())
    block.configure(T1=stats.iters, tol=None)
    prev = [torch.zeros_like(p) for p in params]
    rows = []
    for t in range(1, steps + 1):
        block.estimator = TBP(K=t)
        g = gradients(lambda: 0.5 * ((block(u) - y) ** 2).sum(), params)
        ref = [-(a - b) for a, b in zip(g, prev)]
        prev = g
        rows.append({"t": t, "cos": cosine(updates[t - 1], ref), "rel": rel_error(updates[t - 1], ref)})
    return rows


def theory() -> dict:
    out: dict = {"per_step": {}, "eta_sweep": {}}
    for update in ("sync", "async"):
        for variant in ("centered", "positive"):
            out["per_step"][f"{update}/{variant}"] = per_step(update, variant)
    block, u, _ = small_block("async")
    for variant in ("centered", "positive"):
        rows = []
        for eta in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
            rep = check_estimator(block, ContinualEP(beta=0.05, eta=eta, T2=30, variant=variant), u,
                                  reference=EP(beta=0.05, T2=30, variant=variant))
            rows.append({"eta": eta, "cos": rep.cosine, "rel": rep.rel_error})
        out["eta_sweep"][variant] = rows
    out["settings"] = {"block": "DenseHopfield([3, 5, 4, 2]), logistic, float64, batch 2",
                       "per_step": "beta=1e-5, eta=1e-10, free phase to tol 1e-13",
                       "eta_sweep": "beta=0.05, T2=30, async, against EP with the same beta, T2, variant",
                       "torch": torch.__version__}
    return out


def report(path: Path, stride: int = 100) -> str:
    """The Markdown tables of docs/local_learning.md from a results file (curves every
    `stride` steps)."""
    r = json.loads(path.read_text())
    s = r["settings"]
    lines = [f"Fashion-MNIST, {s['limit_train']} training / {s['limit_test']} test examples, {s['epochs']} epoch(s), "
             f"seed {s['seed']}, {s['threads']} thread, torch {s['torch']}.", "",
             "| run | config and overrides | test top-1 (%) | train top-1 (%) | train time (s) |",
             "|---|---|---|---|---|"]
    for run in r["runs"]:
        over = " ".join(run["overrides"])
        lines.append(f"| {run['label']} | `{run['config']}{' ' + over if over else ''}` | {run['test_top1']:.2f} | "
                     f"{run['train_top1']:.2f} | {run['train_time_s']:.0f} |")
    curves = [run for run in r["runs"] if run["curve"]]
    if curves:
        steps = [p["step"] for p in curves[0]["curve"] if p["step"] % stride == 0]
        lines += ["", "Angle between B and W^T (degrees) / cosine between the run's gradient estimate for the block's "
                  "forward couplings (VF-EP, or C-VF's -change/eta) and the true gradient of the asymmetric dynamics "
                  "(ID), on the 256-example probe batch, by training step:", "",
                  "| run | " + " | ".join(str(k) for k in steps) + " |", "|---|" + "---|" * len(steps)]
        for run in curves:
            at = {p["step"]: p for p in run["curve"]}
            cells = [f"{at[k]['angles_deg'][0]:.1f} / {at[k]['grad_cos_vs_id']:.3f}" for k in steps]
            lines.append(f"| {run['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--limit-train", type=int, default=60000)
    parser.add_argument("--limit-test", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=100, help="steps between angle/probe measurements")
    parser.add_argument("--only", nargs="*", default=None, help="labels of the runs to do (default: all)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--runs-dir", default="/tmp/eqprop_local_learning")
    parser.add_argument("--theory", action="store_true", help="only the small-block checks")
    parser.add_argument("--report", action="store_true", help="print the Markdown tables of a results file")
    parser.add_argument("--stride", type=int, default=100, help="--report: steps between the curve's columns")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.report:
        print(report(Path(args.out), args.stride))
        return
    if args.theory:
        THEORY.write_text(json.dumps(theory(), indent=1) + "\n")
        print(f"wrote {THEORY}")
        return
    path = Path(args.out)
    results = json.loads(path.read_text()) if path.exists() else {}
    runs = {r["label"]: r for r in results.get("runs", [])}
    for i, (label, name, overrides) in enumerate(RUNS):
        if args.only is not None and label not in args.only:
            continue
        r = run(label, name, overrides, args, Path(args.runs_dir) / f"run{i}")
        print(f"{label}: test {r['test_top1']:.2f}%, train {r['train_top1']:.2f}%, {r['train_time_s']:.0f} s",
              flush=True)
        runs[label] = r
        results = {"settings": {"limit_train": args.limit_train, "limit_test": args.limit_test, "epochs": args.epochs,
                                "seed": args.seed, "threads": 1, "every": args.every, "torch": torch.__version__,
                                "python": platform.python_version()},
                   "runs": [runs[lab] for lab, _, _ in RUNS if lab in runs]}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
