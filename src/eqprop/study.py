"""`eqprop study algorithms`: the energy-based learning family on equal footing (SPEC §7).

Trains the same network (same seed, same initial weights) with each learning rule of
eqprop.rules on an image dataset, then writes

  results.json   every run: settings, per-epoch train/test error and time
  table.md       test error per rule (mean +- std over seeds when several), time per epoch
  curves.png     learning curves (test error per epoch, one line per rule)

The network holds its output layer (no readout): its last layer has one unit per class,
the cost is 1/2 ||s_L - onehot(y)||^2 averaged over the batch, and the prediction is the
most active output unit. Settings come from a config (src/eqprop/configs/study_*.yaml)
with key=value overrides, e.g.

    eqprop study algorithms train.epochs=3 --config study_fmnist_cpu --seeds 0 1 --set train.lr=1e-3
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from . import rules as rules_mod
from .blocks import ConvHopfield
from .chain import FFEBM
from .couplings import init_module_
from .estimators import make_estimator

ALL_RULES = ("cl", "pep", "nep", "cep", "pcpl", "ncpl", "ccpl", "tbp", "rbp")
CONFIG_DIR = Path(__file__).parent / "configs"
DTYPES = {None: None, "none": None, "float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------

def load_config(name_or_path: str, overrides: list[str] = ()) -> dict:
    """Read a study config (a name in eqprop/configs or a path) and apply key=value overrides
    (dotted keys, values parsed as YAML)."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in CONFIG_DIR.glob("study_*.yaml"))
        raise ValueError(f"study: config {name_or_path!r} not found (known: {known})")
    cfg = yaml.safe_load(path.read_text())
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"study: override {item!r} is not key=value")
        key, value = item.split("=", 1)
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise ValueError(f"study: unknown config section {p!r} in {key!r}")
            node = node[p]
        if leaf not in node:
            raise ValueError(f"study: unknown config key {key!r} (known in this section: {sorted(node)})")
        node[leaf] = _parse_value(value)
    return cfg


def _parse_value(text: str):
    """A YAML value, with numbers such as 4e-3 (a string to YAML 1.1) read as floats."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def rule_settings(rule: str, r: dict) -> dict:
    """The estimator settings of `rule` from the config's `rules` section."""
    if rule in ("pep", "nep", "cep"):
        return dict(beta=r["beta"], T2=r["T2"], precision=r["precision"])
    if rule in ("pcpl", "ncpl", "ccpl"):
        return dict(eta=r["eta"], T2=r["T2"], precision=r["precision"])
    if rule == "cl":
        return dict(T2=r["T2"], precision=r["precision"])
    if rule == "tbp":
        return dict(K=r["K"])
    if rule == "rbp":
        return dict(max_iter=r["rbp_max_iter"], tol=r["rbp_tol"])
    raise ValueError(f"study: unknown rule {rule!r}, expected some of {ALL_RULES}")


# ---------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------

def build_model(model_cfg: dict, relax_cfg: dict, in_channels: int, in_size: int, num_classes: int) -> FFEBM:
    """Convolutional Hopfield network holding its output layer: the first convolution (+pool)
    is the (feedforward) current into the first layer, the rest one energy-based block
    whose last layer has `num_classes` units."""
    ch, pools, fc = list(model_cfg["channels"]), model_cfg["pools"], list(model_cfg.get("fc") or [])
    if len(ch) < 1 or len(pools) != len(ch):
        raise ValueError(f"study: model needs one pool character per convolution, got channels={ch} pools={pools!r}")
    size = in_size
    sizes = []
    for p in pools:
        size = size // 2 if p == "m" else size
        sizes.append(size)
    if size < 1:
        raise ValueError(f"study: input size {in_size} is too small for pools {pools!r}")
    ff = nn.Sequential(nn.Conv2d(in_channels, ch[0], 3, padding=1), *([nn.MaxPool2d(2)] if pools[0] == "m" else []))
    init_module_(ff, "kaiming", model_cfg.get("alpha", 0.5))
    dtype = DTYPES[relax_cfg.get("relax_dtype")]
    block = ConvHopfield(ch, pools[1:], [*fc, num_classes], in_size=sizes[0], activation=model_cfg["activation"],
                         slope=model_cfg["slope"], init=model_cfg["init"], variance=model_cfg["variance"],
                         alpha=model_cfg["alpha"], last_linear=model_cfg.get("output", "hardsigmoid") == "linear",
                         T1=relax_cfg["T1"], tol=relax_cfg.get("tol"),
                         update=relax_cfg["update"], first=relax_cfg["first"], relax_dtype=dtype, name="block1")
    if model_cfg.get("output", "hardsigmoid") not in ("hardsigmoid", "linear"):
        raise ValueError(f"study: model.output must be 'hardsigmoid' or 'linear', got {model_cfg.get('output')!r}")
    if model_cfg.get("output_bias") is not None:
        with torch.no_grad():
            block.couplings[-1].linear.bias.fill_(float(model_cfg["output_bias"]))
    model = FFEBM(ff, block)
    if model_cfg.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    return model


def _pad(x: torch.Tensor, pad_to: int | None) -> torch.Tensor:
    if not pad_to or x.shape[-1] >= pad_to:
        return x
    a = pad_to - x.shape[-1]
    return F.pad(x, (a // 2, a - a // 2, a // 2, a - a // 2))


# ---------------------------------------------------------------------------------------
# training one rule
# ---------------------------------------------------------------------------------------

def squared_error(out: torch.Tensor, y_onehot: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y_onehot) ** 2).sum(1).mean()


@torch.no_grad()
def evaluate(model: FFEBM, loader, pad_to: int | None, num_classes: int) -> tuple[float, float]:
    """(error %, mean squared-error cost) on a loader."""
    model.eval()
    wrong, total, cost = 0, 0, 0.0
    for x, y in loader:
        out = model(_pad(x, pad_to))
        wrong += int((out.argmax(1) != y).sum())
        cost += float(squared_error(out, F.one_hot(y, num_classes).to(out.dtype))) * len(y)
        total += len(y)
    return 100.0 * wrong / total, cost / total


def train_rule(rule: str, seed: int, cfg: dict, data: dict, log=print) -> dict:
    """Train a fresh model (initial weights from `seed`) with `rule`; returns the run record."""
    mc, rc, tc = cfg["model"], cfg["relax"], cfg["train"]
    torch.manual_seed(seed)
    model = build_model(mc, rc, data["channels"], data["size"], data["num_classes"])
    init_digest = float(sum(p.detach().double().sum() for p in model.parameters()))
    block = model.blocks[0]
    block.estimator = make_estimator(rule, **rule_settings(rule, cfg["rules"]))
    opt = torch.optim.Adam(model.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"])
    train_loader, test_loader = data["train"], data["test"]
    total_steps = tc["epochs"] * len(train_loader)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1), eta_min=tc["lr_min"])
    k = data["num_classes"]
    record = dict(rule=rule, seed=seed, settings=rule_settings(rule, cfg["rules"]), init_digest=init_digest,
                  epochs=[])
    for epoch in range(tc["epochs"]):
        model.train()
        train_loader.set_epoch(epoch)
        wrong = total = 0
        cost = 0.0
        t0 = time.perf_counter()
        for x, y in train_loader:
            y1 = F.one_hot(y, k).to(x.dtype)
            with rules_mod.targets(model, y1):
                out = model(_pad(x, mc.get("pad_to")))
                loss = squared_error(out, y1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            sched.step()
            if not math.isfinite(float(loss)):
                raise RuntimeError(f"study: {rule} seed {seed}: loss became {float(loss)} in epoch {epoch + 1}")
            wrong += int((out.detach().argmax(1) != y).sum())
            cost += float(loss) * len(y)
            total += len(y)
        seconds = time.perf_counter() - t0
        test_err, test_cost = evaluate(model, test_loader, mc.get("pad_to"), k)
        ep = dict(epoch=epoch + 1, train_error=100.0 * wrong / total, train_cost=cost / total, test_error=test_err,
                  test_cost=test_cost, seconds=seconds)
        record["epochs"].append(ep)
        log(f"{rule:5s} seed {seed} epoch {epoch + 1}/{tc['epochs']}: train err {ep['train_error']:.2f}% "
            f"test err {test_err:.2f}% ({seconds:.1f} s)")
    record["test_error"] = record["epochs"][-1]["test_error"]
    record["seconds_per_epoch"] = statistics.fmean(e["seconds"] for e in record["epochs"])
    return record


# ---------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------

def summarize(records: list[dict], rules: list[str]) -> list[dict]:
    rows = []
    for rule in rules:
        runs = [r for r in records if r["rule"] == rule]
        if not runs:
            continue
        errs = [r["test_error"] for r in runs]
        rows.append(dict(rule=rule, n=len(runs), mean=statistics.fmean(errs),
                         std=statistics.stdev(errs) if len(errs) > 1 else None,
                         train=statistics.fmean(r["epochs"][-1]["train_error"] for r in runs),
                         seconds=statistics.fmean(r["seconds_per_epoch"] for r in runs)))
    return rows


def markdown_table(rows: list[dict], title: str) -> str:
    several = any(r["n"] > 1 for r in rows)
    head = "| rule | test error (%) | train error (%) | time / epoch (s) |" + (" seeds |" if several else "")
    sep = "|---|---|---|---|" + ("---|" if several else "")
    lines = [f"### {title}", "", head, sep]
    for r in rows:
        err = f"{r['mean']:.2f}" + (f" ± {r['std']:.2f}" if r["std"] is not None else "")
        line = f"| {r['rule'].upper()} | {err} | {r['train']:.2f} | {r['seconds']:.1f} |"
        lines.append(line + (f" {r['n']} |" if several else ""))
    return "\n".join(lines) + "\n"


def plot_curves(records: list[dict], rules: list[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for rule in rules:
        runs = [r for r in records if r["rule"] == rule]
        if not runs:
            continue
        n = min(len(r["epochs"]) for r in runs)
        x = list(range(1, n + 1))
        for ax, key in zip(axes, ("train_error", "test_error")):
            y = [statistics.fmean(r["epochs"][i][key] for r in runs) for i in range(n)]
            ax.plot(x, y, marker="o", label=rule.upper(), linestyle="--" if rule in ("tbp", "rbp") else "-")
    for ax, name in zip(axes, ("train error (%)", "test error (%)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].legend(ncol=3, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(records: list[dict], rules: list[str], out: Path, title: str) -> str:
    rows = summarize(records, rules)
    table = markdown_table(rows, title)
    (out / "table.md").write_text(table)
    plot_curves(records, rules, out / "curves.png", title)
    return table


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------

def load_data(cfg: dict, root: str | None, seed: int) -> dict:
    from .data import DeviceLoader, default_std_factor, load_dataset

    name, tc = cfg["dataset"], cfg["train"]
    train = load_dataset(name, "train", root)
    test = load_dataset(name, "test", root)
    if train.kind != "image":
        raise ValueError(f"study: {name} holds {train.kind}s; the study trains convolutional networks on images")
    sf = default_std_factor(name)
    fmt = torch.channels_last if cfg["model"].get("channels_last") else None
    size = cfg["model"].get("pad_to") or train.x.shape[-1]
    return dict(
        train=DeviceLoader(train, tc["batch_size"], train=True, std_factor=sf, seed=seed, limit=tc["train_limit"],
                           memory_format=fmt),
        test=DeviceLoader(test, 500, train=False, std_factor=sf, limit=tc["test_limit"], memory_format=fmt),
        channels=train.x.shape[1], size=max(size, train.x.shape[-1]), num_classes=train.num_classes, name=name)


# ---------------------------------------------------------------------------------------
# 16-bit relaxation: gradient agreement and time per training step
# ---------------------------------------------------------------------------------------

def _train_step(model: FFEBM, opt, x: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
    with rules_mod.targets(model, y1):
        loss = squared_error(model(x), y1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
    opt.step()
    return loss


def precision_study(cfg: dict, rule: str, dtypes: list[str], x: torch.Tensor, y: torch.Tensor, steps: int,
                    num_classes: int, log=print) -> str:
    """Cosine of the 16-bit gradient with the float32 one at the initial weights (for each
    handling of the second phases), and the time of a training step (forward, backward,
    Adam step), measured round-robin so that all settings share the machine's load."""
    mc, rc = cfg["model"], cfg["relax"]
    x = _pad(x, mc.get("pad_to"))
    y1 = F.one_hot(y, num_classes).to(x.dtype)
    settings = rule_settings(rule, cfg["rules"])
    torch.manual_seed(0)
    base = build_model(mc, rc, x.shape[1], x.shape[-1], num_classes)

    def grads(dtype, **over) -> torch.Tensor:
        m = copy.deepcopy(base)
        m.blocks[0].relax_dtype = dtype
        m.blocks[0].estimator = make_estimator(rule, **{**settings, **over})
        with rules_mod.targets(m, y1):
            squared_error(m(x), y1).backward()
        return torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]).double()

    g32 = grads(None)
    modes = ["deviation", "block"] if "precision" in settings else [None]
    cosines = {}
    for name in dtypes:
        for mode in modes:
            over = {} if mode is None else {"precision": mode}
            cosines[name, mode] = F.cosine_similarity(g32, grads(DTYPES[name], **over), 0).item()
            log(f"{name} second phases {mode}: cosine with float32 {cosines[name, mode]:.5f}")
    runs = {}
    for name in ["float32", *dtypes]:
        m = copy.deepcopy(base)
        m.blocks[0].relax_dtype = DTYPES[name]
        m.blocks[0].estimator = make_estimator(rule, **settings)
        runs[name] = (m, torch.optim.Adam(m.parameters(), lr=cfg["train"]["lr"]), [])
    for rep in range(steps + 1):  # the first round warms up and is not counted
        for name, (m, opt, times) in runs.items():
            t0 = time.perf_counter()
            _train_step(m, opt, x, y1)
            if rep:
                times.append(time.perf_counter() - t0)
    t32 = statistics.median(runs["float32"][2])
    lines = [f"| relaxation | second phases | cosine with float32 | time / step (s) | speed-up |", "|---|---|---|---|---|",
             f"| float32 | - | 1 | {t32:.2f} | 1.00 |"]
    for name in dtypes:
        t = statistics.median(runs[name][2])
        for mode in modes:
            timed = mode in (None, settings.get("precision"))
            lines.append(f"| {name} | {mode or '-'} | {cosines[name, mode]:.4f} | "
                         f"{f'{t:.2f}' if timed else '-'} | {f'{t32 / t:.2f}' if timed else '-'} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", choices=["algorithms", "precision"],
                        help="algorithms: train with every rule; precision: 16-bit relaxation against float32")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. train.epochs=5)")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="more config overrides (usable after other options)")
    parser.add_argument("--config", default="study_fmnist_cpu",
                        help="config name in eqprop/configs or a YAML path (default: study_fmnist_cpu; the "
                             "published architecture: study_published)")
    parser.add_argument("--dataset", help="dataset name (fashion_mnist, mnist, svhn, cifar10, cifar100)")
    parser.add_argument("--rules", default=",".join(ALL_RULES), help="comma-separated rules (default: all nine)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (one run per rule and seed)")
    parser.add_argument("--data-dir", default=None, help="data directory (default: eqprop.data's)")
    parser.add_argument("--out", default="runs/study_algorithms", help="output directory")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--resume", action="store_true", help="skip (rule, seed) runs already in results.json "
                                                              "with the same config")
    parser.add_argument("--rule", default="cep", help="precision: the rule to measure (default cep)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16"],
                        help="precision: 16-bit dtypes to compare with float32")
    parser.add_argument("--batch-size", type=int, default=None, help="precision: batch size (default: config's)")
    parser.add_argument("--steps", type=int, default=3, help="precision: timed training steps per setting")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, [*args.overrides, *args.set])
    if args.dataset:
        cfg["dataset"] = args.dataset
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    unknown = [r for r in rules if r not in ALL_RULES]
    if unknown or not rules:
        raise ValueError(f"study: unknown rule(s) {unknown}, expected some of {ALL_RULES}")
    for r in rules:  # fail early on invalid rule settings
        make_estimator(r, **rule_settings(r, cfg["rules"]))
    if cfg["relax"].get("relax_dtype") not in DTYPES:
        raise ValueError(f"study: relax.relax_dtype must be one of {[k for k in DTYPES if k]}, "
                         f"got {cfg['relax'].get('relax_dtype')!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.study == "precision":
        if args.rule not in ALL_RULES:
            raise ValueError(f"study: unknown rule {args.rule!r}, expected one of {ALL_RULES}")
        if args.batch_size:
            cfg["train"]["batch_size"] = args.batch_size
        data = load_data(cfg, args.data_dir, args.seeds[0])
        x, y = next(iter(data["train"]))
        print(f"study precision: {cfg['dataset']}, config {args.config}, rule {args.rule}, batch {len(y)}, "
              f"threads {torch.get_num_threads()}", flush=True)
        print(precision_study(cfg, args.rule, args.dtypes, x, y, args.steps, data["num_classes"]))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    records: list[dict] = []
    if args.resume and results_path.exists():
        old = json.loads(results_path.read_text())
        if old.get("config") == cfg:
            records = old["runs"]
    log_file = open(out / "log.txt", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_file.write(msg + "\n")
        log_file.flush()

    log(f"study algorithms: {cfg['dataset']}, config {args.config}, rules {rules}, seeds {args.seeds}, "
        f"threads {torch.get_num_threads()}")
    for seed in args.seeds:
        data = load_data(cfg, args.data_dir, seed)
        for rule in rules:
            if any(r["rule"] == rule and r["seed"] == seed for r in records):
                continue
            records.append(train_rule(rule, seed, copy.deepcopy(cfg), data, log))
            results_path.write_text(json.dumps(dict(config=cfg, runs=records), indent=1))
    title = f"{cfg['dataset']}: {args.config}, {cfg['train']['epochs']} epochs, seeds {args.seeds}"
    table = write_report(records, rules, out, title)
    log(table)
    log(f"wrote {out / 'table.md'}, {out / 'curves.png'}, {results_path}")
    log_file.close()
    return 0
