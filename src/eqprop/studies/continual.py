"""`eqprop study continual`: catastrophic forgetting of binarized networks, with and without
metaplasticity (docs/binary.md).

A sequence of tasks built from Fashion-MNIST is learned one task after the other:

  permuted  each task is the 10-class problem on images whose pixels went through a fixed
            random permutation of its own (task 1 too);
  split     task k separates the classes 2k and 2k+1 (labels 0 and 1 on one shared output
            pair: a new task reuses the outputs of the earlier ones).

After each task, the network is tested on every task. The networks: a binarized network
trained with `MetaplasticAdam` at each strength m of `metas` (m = 0: a plain binarized
network), and the same network with real weights trained with Adam (the full-precision
reference). net=bnn is the metaplasticity paper's setting (binarized MLP, backprop); net=ep
is an ff-EBM (bias-free linear layer, batch norm, dense Hopfield block, bias-free linear
readout, batch norm) whose weights are all binary (linear layers and block couplings), trained
by EP in the block and backprop outside it. As in the paper's code, the optimizer is fresh for
each task, and with task_bn each task keeps its own batch-norm statistics and affine
parameters: those in place at the end of its training are restored to test it.

Settings are key=value arguments (`eqprop study continual tasks=5 metas=[0,1,2]`, see
`ContinualSettings`). Under --out it writes results.json (settings and, per network and seed,
the accuracy matrix acc[i][j] on task j after task i), table.md and forgetting.png.
"""
from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..binary import binarize_weight, binarize_weights, binary_mlp, latent_weights
from ..blocks import DenseHopfield
from ..chain import FFEBM
from ..estimators import EP
from ..metaplastic import MetaplasticAdam, metaplastic_groups
from ..optional import require
from ..training.config import ConfigError, parse_value

__all__ = ["ContinualSettings", "make_tasks", "build_net", "run_sequence", "run_continual", "summarize",
           "markdown_table", "plot_forgetting", "parse_settings"]

Log = Callable[[str], None]
BENCHMARKS = ("permuted", "split")
NETS = ("bnn", "ep")


@dataclass(frozen=True)
class ContinualSettings:
    """The study's settings (defaults: a run of a few minutes on one CPU thread)."""

    benchmark: str = "permuted"           # permuted | split
    tasks: int = 5                        # permuted: >= 2; split: 2..5 class pairs
    net: str = "bnn"                      # bnn (backprop, the paper's setting) | ep (binary ff-EBM, EP)
    hidden: list = field(default_factory=lambda: [512, 512])  # hidden widths (ep: the block's layers)
    metas: list = field(default_factory=lambda: [0.0, 2.0, 5.0, 10.0, 15.0, 20.0])
    full_precision: bool = True           # also train the real-weight network
    epochs_per_task: int = 2
    train_per_task: int = 10000           # training examples per task (a random subset)
    test_per_task: int = 2000             # test examples per task
    batch_size: int = 100
    lr: float = 0.005
    init_width: float = 0.1               # initial (latent) weights uniform in +-init_width/2
    task_bn: bool = True                  # per-task batch-norm state (as in the paper's code)
    beta: float = 0.5                     # ep: nudging strength
    T1: int = 20                          # ep: free-phase iterations
    T2: int = 10                          # ep: nudged-phase iterations

    def validate(self) -> None:
        """Raise a ConfigError naming the setting."""
        def bad(key: str, what: str) -> ConfigError:
            return ConfigError(f"study continual: {key} must be {what}, got {getattr(self, key)!r}")

        if self.benchmark not in BENCHMARKS:
            raise bad("benchmark", f"one of {BENCHMARKS}")
        if self.net not in NETS:
            raise bad("net", f"one of {NETS}")
        for key in ("tasks", "epochs_per_task", "train_per_task", "test_per_task", "batch_size", "T1", "T2"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(key, "a positive integer")
        if self.tasks < 2 or (self.benchmark == "split" and self.tasks > 5):
            raise bad("tasks", "at least 2 (split: at most 5 class pairs)")
        for key in ("lr", "init_width", "beta"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < math.inf):
                raise bad(key, "a finite number > 0")
        if not isinstance(self.hidden, list) or not self.hidden or any(
                isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in self.hidden):
            raise bad("hidden", "a non-empty list of positive integers")
        if self.net == "ep" and len(self.hidden) < 2:
            raise bad("hidden", "at least two widths for net=ep (the block's layers, coupled in pairs)")
        if not isinstance(self.metas, list) or any(
                isinstance(m, bool) or not isinstance(m, (int, float)) or not (0 <= m < math.inf) for m in self.metas):
            raise bad("metas", "a list of finite numbers >= 0")
        if not self.metas and not self.full_precision:
            raise ConfigError("study continual: nothing to train (metas is empty and full_precision is false)")
        for key in ("full_precision", "task_bn"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "true or false")


def parse_settings(items: Sequence[str]) -> ContinualSettings:
    """ContinualSettings from key=value strings (YAML-typed values)."""
    names = {f.name for f in fields(ContinualSettings)}
    values: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"study continual: {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in names:
            raise ConfigError(f"study continual: unknown setting {key!r}; valid: {', '.join(sorted(names))}")
        value = parse_value(text)
        if key in ("lr", "init_width", "beta") and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if key == "metas" and isinstance(value, list):
            value = [float(m) if isinstance(m, int) and not isinstance(m, bool) else m for m in value]
        values[key] = value
    settings = replace(ContinualSettings(), **values)
    settings.validate()
    return settings


# ---- tasks ---------------------------------------------------------------------------------

@dataclass
class Task:
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def _normalized(ds) -> Tensor:
    x = ds.x.float().div_(255).flatten(1)
    return (x - ds.mean[0]) / ds.std[0]


def make_tasks(settings: ContinualSettings, train, test, seed: int) -> tuple[list[Task], int]:
    """The task sequence and the number of output units, from Fashion-MNIST train/test
    `eqprop.data.Dataset`s (the subsets and permutations are drawn from `seed`)."""
    g = torch.Generator().manual_seed(seed)
    xtr, xte = _normalized(train), _normalized(test)
    tasks = []
    if settings.benchmark == "permuted":
        for k in range(settings.tasks):
            perm = torch.randperm(xtr.shape[1], generator=g)
            idx = torch.randperm(len(xtr), generator=g)[:settings.train_per_task]
            tasks.append(Task(f"P{k + 1}", xtr[idx][:, perm], train.y[idx], xte[:settings.test_per_task][:, perm],
                              test.y[:settings.test_per_task]))
        return tasks, train.num_classes
    for k in range(settings.tasks):
        a, b = 2 * k, 2 * k + 1
        mtr = (train.y == a) | (train.y == b)
        mte = (test.y == a) | (test.y == b)
        xk, yk = xtr[mtr], (train.y[mtr] == b).long()
        idx = torch.randperm(len(xk), generator=g)[:settings.train_per_task]
        tasks.append(Task(f"{a}/{b}", xk[idx], yk[idx], xte[mte][:settings.test_per_task],
                          (test.y[mte] == b).long()[:settings.test_per_task]))
    return tasks, 2


# ---- networks ------------------------------------------------------------------------------

def build_net(settings: ContinualSettings, binary: bool, n_in: int, n_out: int) -> nn.Module:
    """The binarized network (binary=True) or its real-weight reference."""
    if settings.net == "bnn":
        return binary_mlp([n_in, *settings.hidden, n_out], binary=binary, init_width=settings.init_width)
    # as net=bnn: bias-free linear layers, each followed by batch norm (without it, in a trial run
    # the all-binary network stayed at the same accuracy, near 54%, on every permuted task)
    block = DenseHopfield(list(settings.hidden), T1=settings.T1, estimator=EP(beta=settings.beta, T2=settings.T2),
                          name="block1")
    model = FFEBM(nn.Flatten(), nn.Linear(n_in, settings.hidden[0], bias=False), nn.BatchNorm1d(settings.hidden[0]),
                  block, nn.Linear(settings.hidden[-1], n_out, bias=False), nn.BatchNorm1d(n_out))
    if binary:
        binarize_weights(model)
        for m in model:
            if isinstance(m, nn.Linear):
                binarize_weight(m)
        # the scales keep the initial mean |W| of each layer; the latent weights restart uniform in
        # +-init_width/2 as in net=bnn, so that lr means the same flip rate in both networks
        with torch.no_grad():
            for w in latent_weights(model):
                w.uniform_(-settings.init_width / 2, settings.init_width / 2)
    return model


def _bn_state(net: nn.Module) -> dict:
    return {k: v.clone() for k, v in net.state_dict().items()
            if any(k.startswith(n + ".") for n, m in net.named_modules() if isinstance(m, nn.BatchNorm1d))}


@torch.no_grad()
def accuracy(net: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> float:
    net.eval()
    correct = sum(int((net(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    net.train()
    return 100.0 * correct / len(x)


def run_sequence(settings: ContinualSettings, tasks: list[Task], n_out: int, meta: float | None, seed: int,
                 log: Log = print) -> dict:
    """Train one network through the task sequence; meta=None is the full-precision reference.
    Returns {'method', 'meta', 'seed', 'acc' (acc[i][j]: task j after task i), 'seconds'}."""
    torch.manual_seed(seed)
    binary = meta is not None
    net = build_net(settings, binary, tasks[0].x_train.shape[1], n_out)
    method = f"m={meta:g}" if binary else "full precision"
    use_bn = settings.task_bn
    bn_states: list[dict] = []
    acc: list[list[float]] = []
    start = time.perf_counter()
    g = torch.Generator().manual_seed(seed + 1)
    for i, task in enumerate(tasks):
        groups = metaplastic_groups(net, meta) if binary else [{"params": list(net.parameters()), "meta": 0.0}]
        opt = MetaplasticAdam(groups, lr=settings.lr)  # fresh for each task, as in the paper's code
        for _ in range(settings.epochs_per_task):
            order = torch.randperm(len(task.x_train), generator=g)
            for b in range(0, len(order), settings.batch_size):
                idx = order[b:b + settings.batch_size]
                if len(idx) < 2:
                    continue  # batch norm needs two samples
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(net(task.x_train[idx]), task.y_train[idx]).backward()
                opt.step()
        if use_bn:
            bn_states.append(_bn_state(net))
        row = []
        for j, other in enumerate(tasks):
            if use_bn and j < i:
                net.load_state_dict(bn_states[j], strict=False)
            row.append(accuracy(net, other.x_test, other.y_test))
            if use_bn and j < i:
                net.load_state_dict(bn_states[i], strict=False)
        acc.append(row)
        log(f"  {method:>15} seed {seed} after task {i + 1} ({task.name}): "
            + " ".join(f"{a:5.1f}" for a in row[:i + 1]))
    return {"method": method, "meta": meta, "seed": seed, "acc": acc, "seconds": time.perf_counter() - start}


def run_continual(settings: ContinualSettings, train, test, seeds: Sequence[int], log: Log = print) -> list[dict]:
    """Every network (full precision, then each m) for every seed."""
    runs = []
    for seed in seeds:
        tasks, n_out = make_tasks(settings, train, test, seed)
        methods: list[float | None] = ([None] if settings.full_precision else []) + list(settings.metas)
        for meta in methods:
            runs.append(run_sequence(settings, tasks, n_out, meta, seed, log))
    return runs


# ---- report --------------------------------------------------------------------------------

def summarize(runs: list[dict]) -> list[dict]:
    """Per method (mean over seeds) after the last task: accuracy per task, the mean over the
    earlier tasks, the last task, and the mean over all tasks."""
    out = []
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        per_task = [statistics.fmean(r["acc"][-1][j] for r in rs) for j in range(len(rs[0]["acc"][-1]))]
        out.append({"method": method, "meta": rs[0]["meta"], "seeds": [r["seed"] for r in rs],
                    "final": per_task, "earlier_mean": statistics.fmean(per_task[:-1]), "last": per_task[-1],
                    "all_mean": statistics.fmean(per_task),
                    "seconds": statistics.fmean(r["seconds"] for r in rs)})
    return out


def markdown_table(summary: list[dict], title: str) -> str:
    n = len(summary[0]["final"])
    head = ["network"] + [f"task {j + 1}" for j in range(n)] + [f"mean 1-{n - 1}", "all", "time (s)"]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [s["method"]] + [f"{a:.1f}" for a in s["final"]] + [f"{s['earlier_mean']:.1f}",
                                                                     f"{s['all_mean']:.1f}", f"{s['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_forgetting(runs: list[dict], path: Path, title: str) -> None:
    """Left: accuracy on task 1 after each task; right: mean accuracy over the tasks seen so
    far. One line per network (mean over seeds)."""
    require("matplotlib", "plot", "the forgetting figure").use("Agg")
    plt = require("matplotlib.pyplot", "plot", "the forgetting figure")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        n = len(rs[0]["acc"])
        first = [statistics.fmean(r["acc"][i][0] for r in rs) for i in range(n)]
        seen = [statistics.fmean(statistics.fmean(r["acc"][i][:i + 1]) for r in rs) for i in range(n)]
        style = "--" if rs[0]["meta"] is None else "-"
        axes[0].plot(range(1, n + 1), first, style, marker="o", label=method)
        axes[1].plot(range(1, n + 1), seen, style, marker="o", label=method)
    for ax, name in zip(axes, ("accuracy on task 1 (%)", "mean accuracy on tasks seen (%)")):
        ax.set_xticks(range(1, len(runs[0]["acc"]) + 1))
        ax.set_xlabel("tasks learned")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(settings: ContinualSettings, runs: list[dict], out: Path, threads: int, log: Log = print) -> str:
    """results.json, table.md and forgetting.png under `out`; returns the table."""
    summary = summarize(runs)
    s = settings
    what = f"{s.tasks} {'permuted' if s.benchmark == 'permuted' else 'split (class pairs)'} Fashion-MNIST tasks"
    title = (f"{what}, net={s.net} hidden={s.hidden}, {s.epochs_per_task} epochs x {s.train_per_task} examples "
             f"per task, {s.test_per_task} test examples per task, seeds {sorted(set(r['seed'] for r in runs))}, "
             f"threads {threads}")
    table = markdown_table(summary, title)
    (out / "table.md").write_text(table)
    record = {"settings": asdict(settings), "threads": threads, "summary": summary, "runs": runs}
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    try:
        plot_forgetting(runs, out / "forgetting.png", what)
    except ImportError as e:
        log(f"note: no forgetting.png: {e}")
    return table
