"""`eqprop study algorithms`: the energy-based learning family on equal footing.

Trains the same network (same seed, hence the same initial weights) with each learning rule,
named as in eqprop's estimator registry (cl pep nep cep pcpl ncpl ccpl tbp rbp), through
`eqprop.training.Trainer` with the `SquaredError` objective: the network holds its output
layer (no readout), the cost is 1/2 ||s_L - onehot(y)||^2 averaged over the batch, the
target goes to the forward (`model(x, target=y)`), and the prediction is the most active
output unit. What is specific to the study lives here: which rules run, the study config
-> run config translation and the report. Under `out` it writes

  results.json            the study's config and every run: rule, seed, estimator settings,
                          digest of the initial weights, per-epoch errors, losses and time
  table.md                test error per rule (mean +- std over seeds), train error, time
  curves.png              learning curves (train and test error per epoch, one line per rule)
  runs/<rule>-seed<seed>/ each run's trainer output (checkpoint, metrics.jsonl, config.yaml)

A study config (src/eqprop/configs/study_*.yaml) is a trainer config whose `estimator`
section holds every rule's settings; the study sets `algorithm`, `seed` and `out_dir` per run.
"""
from __future__ import annotations

import copy
import json
import statistics
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from torch import nn

from ..optional import require
from ..registry import estimator_names, make_estimator
from ..training.config import ConfigError, config_dir, load_config
from ..training.metrics import read_metrics
from ..training.trainer import SquaredError, Trainer, TrainingError

__all__ = ["ALL_RULES", "DEFAULT_CONFIG", "check_rules", "load_data", "markdown_table", "plot_curves",
           "rule_settings", "run_config", "run_study", "study_config", "study_configs", "summarize",
           "train_rule", "write_report"]

ALL_RULES = ("cl", "pep", "nep", "cep", "pcpl", "ncpl", "ccpl", "tbp", "rbp")
DEFAULT_CONFIG = "study_fmnist_cpu"
Log = Callable[[str], None]


# ---- configuration -------------------------------------------------------------------------

def study_configs() -> list[str]:
    """Names of the shipped study configs."""
    return sorted(p.stem for p in config_dir().glob("study_*.yaml"))


def study_config(name_or_path: str, overrides: Iterable[str] = ()) -> dict:
    """A study config (a shipped name or a *.yaml path) with key=value overrides, read by the
    trainer's config loader (so every trainer key and override rule applies)."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = config_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown study config {name_or_path!r}; available: {', '.join(study_configs())}")
    return load_config(str(path), overrides)


def rule_settings(cfg: dict, rule: str) -> dict:
    """The estimator settings of `rule` in the config (`estimator.<rule>`; empty: defaults)."""
    settings = cfg["estimator"].get(rule) or {}
    if not isinstance(settings, dict):
        raise ConfigError(f"config key 'estimator.{rule}' must be a mapping of settings, got {settings!r}")
    return dict(settings)


def check_rules(cfg: dict, rules: Sequence[str]) -> list[str]:
    """The rules, checked before any training: registered names whose settings build."""
    rules = list(rules)
    known = estimator_names()
    unknown = [r for r in rules if r not in known]
    if unknown or not rules:
        raise ConfigError(f"unknown rule(s) {unknown or rules}; the study's rules are {', '.join(ALL_RULES)} "
                          f"(any registered estimator name works: {', '.join(sorted(known))})")
    for rule in rules:
        try:
            make_estimator(rule, **rule_settings(cfg, rule))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"estimator.{rule}={rule_settings(cfg, rule)}: {e}") from None
    return rules


def run_config(cfg: dict, rule: str, seed: int, out: Path, channels: int) -> dict:
    """The trainer config of one run: the study's, with this rule, seed and output directory;
    a first block whose input channels are null takes the images' channel count (a number
    that disagrees with the data is refused)."""
    run = copy.deepcopy(cfg)
    run.update(algorithm=rule, seed=seed, out_dir=str(out / "runs" / f"{rule}-seed{seed}"), resume=False)
    blocks = run["model"].get("blocks")
    if run["model"]["kind"] == "conv" and blocks and isinstance(blocks[0], dict) and blocks[0].get("channels"):
        given = blocks[0]["channels"][0]
        if given is None:
            blocks[0]["channels"][0] = channels
        elif given != channels:
            raise ConfigError(f"model.blocks[0].channels[0] is {given} but the dataset's images have {channels} "
                              f"channel(s); set it to null to take it from the data")
    return run


def load_data(cfg: dict) -> tuple:
    """(train, test) eqprop.data.Dataset of the config's image dataset, loaded once for all runs."""
    from ..data import load_dataset

    opts = cfg["dataset_options"]
    train = load_dataset(cfg["dataset"], "train", cfg["data_dir"], **opts)
    if train.kind != "image":
        raise ConfigError(f"study: {cfg['dataset']} holds {train.kind}s; the study trains convolutional networks "
                          f"on images")
    return train, load_dataset(cfg["dataset"], "test", cfg["data_dir"], **opts)


# ---- one run, all runs ---------------------------------------------------------------------

def weights_digest(model: nn.Module) -> float:
    """Sum of all parameters: equal digests show that runs started from the same weights."""
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def epoch_records(metrics_path: Path) -> list[dict]:
    """Per-epoch errors (100 - top-1), losses, time and relaxation iterations of a run."""
    out = []
    for r in read_metrics(metrics_path):
        test = "test_top1" in r
        out.append({"epoch": r["epoch"], "train_error": 100.0 - r["train_top1"], "train_loss": r["train_loss"],
                    "test_error": 100.0 - r["test_top1"] if test else None,
                    "test_loss": r["test_loss"] if test else None, "seconds": r["train_time_s"],
                    "iters": {k[len("iters_"):]: v for k, v in r.items() if k.startswith("iters_")}})
    return out


def train_rule(cfg: dict, rule: str, seed: int, data: tuple, out: Path, log: Log = print) -> dict:
    """Train a fresh model (initial weights from `seed`) with `rule`; the run's record. A run
    that diverges is recorded with its error, and the study goes on."""
    run = run_config(cfg, rule, seed, out, data[0].x.shape[1])
    trainer = Trainer(run, *data, echo=log, objective=SquaredError())
    record = {"rule": rule, "seed": seed, "settings": rule_settings(cfg, rule),
              "init_digest": weights_digest(trainer.model), "out_dir": run["out_dir"]}
    try:
        summary = trainer.fit()
    except TrainingError as e:
        log(f"{rule} seed {seed}: {e}")
        return {**record, "error": str(e), "epochs": epoch_records(Path(run["out_dir"]) / "metrics.jsonl")}
    finally:
        trainer.close()
    if summary["status"] != "completed":
        raise KeyboardInterrupt
    epochs = epoch_records(Path(run["out_dir"]) / "metrics.jsonl")
    return {**record, "epochs": epochs, "test_error": epochs[-1]["test_error"],
            "seconds_per_epoch": statistics.fmean(e["seconds"] for e in epochs)}


def previous_runs(path: Path, cfg: dict) -> list[dict]:
    """The runs of an earlier study with the same config (for --resume), else none."""
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    return old["runs"] if old.get("config") == json.loads(json.dumps(cfg)) else []


def run_study(cfg: dict, rules: Sequence[str], seeds: Sequence[int], out: Path, data: tuple | None = None,
              resume: bool = False, log: Log = print) -> list[dict]:
    """Train every (seed, rule) run not done yet, writing results.json after each."""
    rules = check_rules(cfg, rules)
    data = data if data is not None else load_data(cfg)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    records = previous_runs(path, cfg) if resume else []
    for seed in seeds:
        for rule in rules:
            if any(r["rule"] == rule and r["seed"] == seed for r in records):
                continue
            records.append(train_rule(cfg, rule, seed, data, out, log))
            path.write_text(json.dumps({"config": cfg, "runs": records}, indent=1))
    return records


# ---- report -------------------------------------------------------------------------------

def summarize(records: list[dict], rules: Sequence[str]) -> list[dict]:
    """One row per rule: test error mean and std over the seeds, train error, time per epoch,
    and the runs that failed."""
    rows = []
    for rule in rules:
        runs = [r for r in records if r["rule"] == rule]
        done = [r for r in runs if "error" not in r]
        if not runs:
            continue
        errs = [r["test_error"] for r in done]
        rows.append({"rule": rule, "n": len(done), "failed": len(runs) - len(done),
                     "mean": statistics.fmean(errs) if errs else None,
                     "std": statistics.stdev(errs) if len(errs) > 1 else None,
                     "train": statistics.fmean(r["epochs"][-1]["train_error"] for r in done) if done else None,
                     "seconds": statistics.fmean(r["seconds_per_epoch"] for r in done) if done else None})
    return rows


def markdown_table(rows: list[dict], title: str) -> str:
    """The rows as a markdown table (a column of seeds when several runs per rule)."""
    several = any(r["n"] + r["failed"] > 1 for r in rows)
    head = "| rule | test error (%) | train error (%) | time / epoch (s) |" + (" runs |" if several else "")
    lines = [f"### {title}", "", head, "|---|---|---|---|" + ("---|" if several else "")]
    for r in rows:
        if r["mean"] is None:
            line = f"| {r['rule'].upper()} | diverged | - | - |"
        else:
            err = f"{r['mean']:.2f}" + (f" ± {r['std']:.2f}" if r["std"] is not None else "")
            line = f"| {r['rule'].upper()} | {err} | {r['train']:.2f} | {r['seconds']:.1f} |"
        runs = f"{r['n']}" + (f" (+{r['failed']} diverged)" if r["failed"] else "")
        lines.append(line + (f" {runs} |" if several else ""))
    return "\n".join(lines) + "\n"


def plot_curves(records: list[dict], rules: Sequence[str], path: Path, title: str) -> None:
    """Train and test error per epoch, one line per rule (mean over seeds)."""
    require("matplotlib", "plot", "the study's learning curves").use("Agg")
    plt = require("matplotlib.pyplot", "plot", "the study's learning curves")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for rule in rules:
        runs = [r for r in records if r["rule"] == rule and "error" not in r]
        if not runs:
            continue
        for ax, key in zip(axes, ("train_error", "test_error")):
            pts = [(i + 1, statistics.fmean(r["epochs"][i][key] for r in runs))
                   for i in range(min(len(r["epochs"]) for r in runs))
                   if all(r["epochs"][i][key] is not None for r in runs)]
            ax.plot(*zip(*pts), marker="o", label=rule.upper(), linestyle="--" if rule in ("tbp", "rbp") else "-")
    for ax, name in zip(axes, ("train error (%)", "test error (%)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].legend(ncol=3, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(records: list[dict], rules: Sequence[str], out: Path, title: str, log: Log = print) -> str:
    """table.md and curves.png (a note instead of the curves without matplotlib); the table."""
    table = markdown_table(summarize(records, rules), title)
    (out / "table.md").write_text(table)
    try:
        plot_curves(records, rules, out / "curves.png", title)
    except ImportError as e:
        log(f"note: no curves.png: {e}")
    return table
