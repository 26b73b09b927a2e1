"""`eqprop analyze rhel`: RHEL against BPTT on Hamiltonian SSMs (docs/theory.md, "Hamiltonian
recurrent units and RHEL").

Three measurements, written as rhel.md (tables), rhel.json (everything) and rhel.png:
  eps     per-parameter relative error ||g_rhel - g_bptt|| / ||g_bptt|| and cosine, on one
          batch (synthetic, or the first test samples of a sequence dataset), per eps;
  length  the same at one eps (--length-eps) versus sequence length, synthetic inputs; in
          float32 also BPTT against float64 BPTT, which tells how well conditioned the
          gradient itself is at that length;
  memory  time and peak memory of a training step (forward + cross-entropy + backward)
          for both estimators versus sequence length.

Peak memory. CUDA: torch.cuda.max_memory_allocated above the memory allocated before the
step. CPU: the step runs under torch.profiler(profile_memory=True), which records every allocation and
free of the CPU allocator (the "[memory]" events, +bytes / -bytes); summed in time order
they give the bytes allocated since the step began, and the peak is their maximum. The
"io" column counts the tensors any method must hold whatever the estimator: each HRU's
input and output sequences and their gradients; "beyond io" = peak - io.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..estimators import BPTT, RHEL, Estimator
from ..hamiltonian import HSSM, make_hru
from ..registry import set_estimator
from ..testing import cosine, gradients, rel_error
from .common import pyplot, timed

__all__ = [
    "KINDS", "SingleHRU", "add_arguments", "sequence_model", "synthetic_sequences", "data_batch", "BPTT_REF",
    "estimator_gradients", "compare", "summary", "peak_bytes", "io_bytes", "backward_step", "memory_run",
    "run_analysis", "markdown", "plot", "run"
]

KINDS = ("linear", "nonlinear")


class SingleHRU(nn.Module):
    """One HRU between a linear encoder and a mean-over-time linear readout: the smallest
    model whose step memory is all HRU (used for the memory measurement)."""

    def __init__(self, in_features: int, num_classes: int, hidden: int, state_size: int, kind: str, **hru):
        super().__init__()
        self.encoder = nn.Linear(in_features, hidden)
        self.hru = make_hru(kind, hidden, state_size, **hru)
        self.head = nn.Linear(hidden, num_classes)

    @property
    def hrus(self):
        return [self.hru]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.hru(self.encoder(x)).mean(1))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="HRU kinds to analyse")
    parser.add_argument("--model", choices=("hssm", "hru"), default="hssm",
                        help="model of the eps and length sweeps (hru: one unit, encoder and readout)")
    parser.add_argument("--memory-model", choices=("hssm", "hru"), default="hru", help="model of the memory runs")
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--state-size", type=int, default=16)
    parser.add_argument("--n-blocks", type=int, default=2)
    parser.add_argument("--dt-min", type=float, default=0.01, help="initial dt range of the HRUs (log-uniform)")
    parser.add_argument("--dt-max", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--features", type=int, default=1, help="input features of synthetic sequences")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--dataset", default="synthetic",
                        help="batch of the eps sweep: 'synthetic' or a sequence dataset (e.g. seq_fashion_mnist_pixel)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--eps-length", type=int, default=784, help="sequence length of the synthetic eps sweep")
    parser.add_argument("--eps", type=float, nargs="+", default=[1.0, 1e-1, 1e-2, 1e-3, 1e-4])
    parser.add_argument("--length-eps", type=float, default=1e-2, help="eps of the length sweep")
    parser.add_argument("--lengths", type=int, nargs="+", default=[28, 784, 4096])
    parser.add_argument("--memory-lengths", type=int, nargs="+", default=[784, 4096])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of a training step (median)")
    parser.add_argument("--skip", nargs="*", choices=("eps", "length", "memory"), default=[])
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/analyze_rhel", help="output directory")


def _check_args(args: argparse.Namespace) -> None:
    if args.threads is not None and args.threads <= 0:
        raise ValueError(f"analyze rhel: --threads must be positive, got {args.threads}")
    for name in ("hidden", "state_size", "n_blocks", "batch", "features", "num_classes", "eps_length", "repeats"):
        if getattr(args, name) <= 0:
            raise ValueError(f"analyze rhel: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("eps", "lengths", "memory_lengths"):
        if any(not (v > 0 and math.isfinite(v)) for v in getattr(args, name)):
            raise ValueError(f"analyze rhel: --{name.replace('_', '-')} values must be positive, "
                             f"got {getattr(args, name)}")
    if not 0 < args.dt_min <= args.dt_max < 1:
        raise ValueError(f"analyze rhel: need 0 < --dt-min <= --dt-max < 1, got {args.dt_min}, {args.dt_max}")
    if not args.length_eps > 0:
        raise ValueError(f"analyze rhel: --length-eps must be positive, got {args.length_eps}")


def sequence_model(args: argparse.Namespace, kind: str, which: str, in_features: int, seed: int) -> nn.Module:
    """The model of one measurement: an HSSM, or one HRU between encoder and readout (`which`)."""
    torch.manual_seed(seed)
    if which == "hru":
        model = SingleHRU(in_features, args.num_classes, args.hidden, args.state_size, kind,
                          dt_min=args.dt_min, dt_max=args.dt_max)
    else:
        model = HSSM(in_features, args.num_classes, hidden=args.hidden, state_size=args.state_size,
                     n_blocks=args.n_blocks, unit=kind, dt_min=args.dt_min, dt_max=args.dt_max)
    return model.to(device=args.device, dtype=getattr(torch, args.dtype))


def synthetic_sequences(args: argparse.Namespace, length: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(args.batch, length, args.features, generator=g)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g)
    return x.to(args.device, getattr(torch, args.dtype)), y.to(args.device)


def data_batch(args: argparse.Namespace) -> tuple[Tensor, Tensor]:
    from ..data import load_dataset

    ds = load_dataset(args.dataset, "test", args.data_dir)
    if ds.num_classes != args.num_classes:
        args.num_classes = ds.num_classes
    x = ds.x[: args.batch].to(args.device, getattr(torch, args.dtype))
    return x, ds.y[: args.batch].to(args.device)


BPTT_REF = BPTT(T2=None)  # through every time step: the reference gradient


def estimator_gradients(model: nn.Module, x: Tensor, y: Tensor, estimator: Estimator) -> dict[str, Tensor]:
    """Gradients of the cross-entropy w.r.t. every parameter and the input, by `estimator`."""
    set_estimator(model, estimator)
    x = x.detach().requires_grad_(True)
    names = [n for n, _ in model.named_parameters()] + ["input"]
    return dict(zip(names, gradients(lambda: F.cross_entropy(model(x), y), list(model.parameters()) + [x])))


def compare(est: dict[str, Tensor], ref: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Per tensor: relative error and cosine of `est` against `ref`."""
    return {k: {"rel_error": rel_error(est[k], r), "cosine": cosine(est[k], r)} for k, r in ref.items()}


def summary(per_param: dict[str, dict[str, float]]) -> dict:
    worst = max(per_param, key=lambda k: per_param[k]["rel_error"])
    rels = [v["rel_error"] for v in per_param.values()]
    return {"max_rel_error": per_param[worst]["rel_error"], "median_rel_error": statistics.median(rels),
            "min_cosine": min(v["cosine"] for v in per_param.values()), "worst": worst}


def peak_bytes(fn, device: torch.device) -> int:
    """Peak memory allocated by fn() above what was allocated before (see module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # raw allocator events (+bytes on allocation, -bytes on free); prof.events() would build
    # a tree of every operator, which is slow and large for long sequences
    mem = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                 if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    running = peak = 0
    for _, nbytes in mem:
        running += nbytes
        peak = max(peak, running)
    return peak


def io_bytes(model: nn.Module, x: Tensor) -> int:
    """Bytes of the HRUs' inputs and outputs and of their gradients, (batch, L, H) each."""
    size = x.element_size() * x.shape[0] * x.shape[1]
    return sum(4 * size * h.in_features for h in model.hrus)


def backward_step(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """Forward, cross-entropy and backward (the step whose time and memory are measured)."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def memory_run(args: argparse.Namespace, kind: str, length: int) -> dict:
    x, y = synthetic_sequences(args, length, args.seed + 1)
    device = torch.device(args.device)
    row = {"length": length}
    for est in ("rhel", "bptt"):
        model = sequence_model(args, kind, args.memory_model, args.features, args.seed)
        set_estimator(model, RHEL(eps=args.length_eps) if est == "rhel" else BPTT_REF)

        step = partial(backward_step, model, x, y)
        step()  # warm-up; also allocates the .grad tensors kept across steps
        times = [timed(step, device=device)[0] for _ in range(args.repeats)]
        model.zero_grad(set_to_none=True)
        peak = peak_bytes(step, device)
        row[est] = {"time_s": statistics.median(times), "peak_bytes": peak,
                    "beyond_io_bytes": peak - io_bytes(model, x)}
    row["io_bytes"] = io_bytes(model, x)
    return row


def run_analysis(args: argparse.Namespace) -> dict:
    _check_args(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results: dict = {"settings": {k: v for k, v in vars(args).items() if not k.startswith("_")}, "kinds": {}}
    for kind in args.kinds:
        res: dict = {}
        if "eps" not in args.skip:
            if args.dataset == "synthetic":
                x, y = synthetic_sequences(args, args.eps_length, args.seed + 1)
            else:
                x, y = data_batch(args)
            model = sequence_model(args, kind, args.model, x.shape[2], args.seed)
            ref = estimator_gradients(model, x, y, BPTT_REF)
            res["eps"] = {"length": x.shape[1], "rows": []}
            for eps in args.eps:
                per = compare(estimator_gradients(model, x, y, RHEL(eps=eps)), ref)
                res["eps"]["rows"].append({"eps": eps, **summary(per), "per_parameter": per})
        if "length" not in args.skip:
            res["length"] = {"eps": args.length_eps, "rows": []}
            for L in args.lengths:
                x, y = synthetic_sequences(args, L, args.seed + 1)
                model = sequence_model(args, kind, args.model, args.features, args.seed)
                t0 = time.perf_counter()
                ref = estimator_gradients(model, x, y, BPTT_REF)
                t1 = time.perf_counter()
                per = compare(estimator_gradients(model, x, y, RHEL(eps=args.length_eps)), ref)
                t2 = time.perf_counter()
                norm = torch.sqrt(sum(g.double().square().sum() for g in ref.values())).item()
                row = {"length": L, **summary(per), "bptt_s": t1 - t0, "rhel_s": t2 - t1, "bptt_grad_norm": norm,
                       "per_parameter": per}
                if x.dtype != torch.float64:  # how well float32 BPTT itself is conditioned here
                    ref64 = estimator_gradients(copy.deepcopy(model).double(), x.double(), y, BPTT_REF)
                    row["bptt_vs_float64"] = summary(compare(ref, ref64))["max_rel_error"]
                res["length"]["rows"].append(row)
        if "memory" not in args.skip:
            res["memory"] = [memory_run(args, kind, L) for L in args.memory_lengths]
        results["kinds"][kind] = res
    return results


def _mib(b: float) -> str:
    return f"{b / 2**20:.3f}"


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"# RHEL vs BPTT ({s['dtype']}, {s['device']}, seed {s['seed']})", ""]
    for kind, res in results["kinds"].items():
        lines.append(f"## {kind} HRU")
        if "eps" in res:
            lines += ["", f"Gradient error against BPTT versus eps ({s['model']}, {s['dataset']}, "
                          f"length {res['eps']['length']}, batch {s['batch']}):", "",
                      "| eps | max rel. error | median rel. error | min cosine | worst |", "|---|---|---|---|---|"]
            lines += [f"| {r['eps']:g} | {r['max_rel_error']:.2e} | {r['median_rel_error']:.2e} | "
                      f"{r['min_cosine']:.8f} | {r['worst']} |" for r in res["eps"]["rows"]]
            best = min(res["eps"]["rows"], key=lambda r: r["max_rel_error"])
            lines += ["", f"Per parameter at eps = {best['eps']:g}:", "", "| parameter | rel. error | cosine |",
                      "|---|---|---|"]
            lines += [f"| {k} | {v['rel_error']:.2e} | {v['cosine']:.8f} |" for k, v in best["per_parameter"].items()]
        if "length" in res:
            lines += ["", f"Gradient error against BPTT versus sequence length (eps {res['length']['eps']:g}, "
                          f"synthetic inputs):", "",
                      "| length | max rel. error | median rel. error | min cosine | worst | BPTT s | RHEL s | "
                      "BPTT gradient norm | BPTT vs float64 BPTT |", "|---|---|---|---|---|---|---|---|---|"]
            lines += [f"| {r['length']} | {r['max_rel_error']:.2e} | {r['median_rel_error']:.2e} | "
                      f"{r['min_cosine']:.8f} | {r['worst']} | {r['bptt_s']:.2f} | {r['rhel_s']:.2f} | "
                      f"{r['bptt_grad_norm']:.3e} | "
                      + (f"{r['bptt_vs_float64']:.2e} |" if "bptt_vs_float64" in r else "- |")
                      for r in res["length"]["rows"]]
        if "memory" in res:
            lines += ["", f"Training step ({s['memory_model']}, batch {s['batch']}), median of {s['repeats']} "
                          f"timed steps; peak memory above the step's start, MiB:", "",
                      "| length | BPTT s | RHEL s | BPTT peak | RHEL peak | io | BPTT beyond io | RHEL beyond io |",
                      "|---|---|---|---|---|---|---|---|"]
            lines += [f"| {r['length']} | {r['bptt']['time_s']:.3f} | {r['rhel']['time_s']:.3f} | "
                      f"{_mib(r['bptt']['peak_bytes'])} | {_mib(r['rhel']['peak_bytes'])} | {_mib(r['io_bytes'])} | "
                      f"{_mib(r['bptt']['beyond_io_bytes'])} | {_mib(r['rhel']['beyond_io_bytes'])} |"
                      for r in res["memory"]]
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    titles = {"eps": ("RHEL vs BPTT: relative error", "eps", "relative error"),
              "length": (f"relative error vs length (eps {results['settings']['length_eps']:g})", "sequence length",
                         "max relative error"),
              "memory": ("training step: peak memory beyond io", "sequence length", "MiB")}
    panels = [k for k in titles if any(k in res for res in results["kinds"].values())]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    ax = dict(zip(panels, axes[0]))
    for kind, res in results["kinds"].items():
        if "eps" in res:
            rows = res["eps"]["rows"]
            ax["eps"].loglog([r["eps"] for r in rows], [r["max_rel_error"] for r in rows], "o-", label=f"{kind} max")
            ax["eps"].loglog([r["eps"] for r in rows], [r["median_rel_error"] for r in rows], "s--",
                             label=f"{kind} median")
        if "length" in res:
            rows = res["length"]["rows"]
            ax["length"].loglog([r["length"] for r in rows], [r["max_rel_error"] for r in rows], "o-", label=kind)
        if "memory" in res:
            for est, style in (("bptt", "o-"), ("rhel", "s-")):
                ax["memory"].plot([r["length"] for r in res["memory"]],
                                  [r[est]["beyond_io_bytes"] / 2**20 for r in res["memory"]], style,
                                  label=f"{kind} {est}")
    for key, (title, xl, yl) in titles.items():
        if key in ax:
            ax[key].set_title(title)
            ax[key].set_xlabel(xl)
            ax[key].set_ylabel(yl)
            ax[key].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    results = run_analysis(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rhel.json").write_text(json.dumps(results, indent=1))
    md = markdown(results)
    (out / "rhel.md").write_text(md)
    plot(results, out / "rhel.png")
    print(md)
    print(f"wrote {out / 'rhel.md'}, {out / 'rhel.json'}, {out / 'rhel.png'}")
    return 0
