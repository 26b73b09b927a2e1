"""`eqprop study local`: the local learning systems side by side on Fashion-MNIST
(docs/local_learning.md).

Every system is a shipped config plus overrides, trained by `eqprop.training.Trainer`; the
study only chooses the runs, measures along them (through the Trainer's `on_step` hook) and
writes the report. Two networks, each trained from the same seed by several rules:

  dense  784 -> linear -> block [256, 128] -> linear readout, plain SGD (fmnist_dense_*):
         rate-based EP, continual EP (C-EP), vector-field EP (VF-EP), continual VF (C-VF),
         EqSpike (integrate-and-fire neurons). Only when named in --systems: Bernoulli
         spikes (`eqspike_stochastic`), and EP and C-EP at rate 0.01 (`ep_lr01`,
         `cep_eta01`). EP, C-EP and EqSpike start from the same weights; the
         vector-field block draws its backward weights among the forward ones, so VF-EP and
         C-VF share their own initial weights.
  mlp    784-256-256-10 ELU perceptron, Adam (fmnist_mlp_dtp): backprop, plain DTP and DTP
         with learned backprop targets (L-DRL), all from the same weights.
  ffebm  784 -> DTP layer -> block [256, 128] -> DTP readout (fmnist_mlp_dtp_ep): DTP
         feedforward parts with an EP block, against backprop in the feedforward parts.

Along training, every `curve_every` steps (and before the first): the test error on the first
`curve_examples` test images, the angle between B and W^T of the vector-field blocks, and for
DTP the per-layer angle between the rule's update and backprop's on the first training batch
(from the first step on: before it, the feedback maps are zero).
These probes run with a forked random generator and change no parameter, and their time is
taken out of the epoch's wall and CPU times.

Under --out: results.json (settings and, per system and seed, per-epoch errors and times,
the curve, the initial weights' digests), table.md, local_study.png and runs/<system>-seed<k>/
(each run's trainer output). --json, --figure and --doc write the JSON, the figure and a
generated section of a markdown file elsewhere; --report rebuilds the outputs from the JSON
without training.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..optional import require
from ..training.config import ConfigError, load_config
from ..training.metrics import read_metrics
from ..training.runinfo import cpu_model
from ..training.trainer import Trainer, TrainingError

__all__ = ["System", "SYSTEMS", "DEFAULT_SYSTEMS", "OPTIONAL_SYSTEMS", "StudySettings", "add_arguments",
           "settings_from_args", "complete_seeds", "run_config", "train_system", "run_local", "summarize",
           "check_targets", "markdown_table", "plot_curves", "doc_section", "portable", "write_outputs", "run"]

Log = Callable[[str], None]
BEGIN = "<!-- eqprop study local: generated section, begin -->"
END = "<!-- eqprop study local: generated section, end -->"


@dataclass(frozen=True)
class System:
    """One learning system of the study: a shipped config with overrides."""

    name: str
    label: str
    network: str                          # dense | mlp | ffebm: runs of one network are compared
    config: str
    overrides: tuple[str, ...] = ()
    probe: str | None = None              # 'vf': B-W^T angles; 'dtp': DTP-backprop angles per layer


SYSTEMS: dict[str, System] = {s.name: s for s in (
    System("ep", "EP", "dense", "fmnist_dense_ep"),
    System("cep", "C-EP", "dense", "fmnist_dense_continual"),
    System("ep_lr01", "EP, lr 0.01", "dense", "fmnist_dense_ep", ("optim.lr=0.01",)),
    System("cep_eta01", "C-EP, eta = lr = 0.01", "dense", "fmnist_dense_continual",
           ("optim.lr=0.01", "estimator.continual.eta=0.01")),
    System("vf", "VF-EP", "dense", "fmnist_dense_vf", probe="vf"),
    System("cvf", "C-VF", "dense", "fmnist_dense_cvf", probe="vf"),
    System("eqspike", "EqSpike", "dense", "fmnist_dense_spiking"),
    System("eqspike_stochastic", "EqSpike (stochastic)", "dense", "fmnist_dense_spiking",
           ("model.spiking=stochastic",)),
    System("bp", "BP", "mlp", "fmnist_mlp_dtp", ("model.learning=bp",)),
    System("dtp", "DTP", "mlp", "fmnist_mlp_dtp", ("model.learning=dtp", "model.feedback_lr=0.001"), probe="dtp"),
    System("ldrl", "DTP-LDRL", "mlp", "fmnist_mlp_dtp", probe="dtp"),
    System("bp_ep", "BP+EP ff-EBM", "ffebm", "fmnist_mlp_dtp_ep", ("model.learning=bp",)),
    System("dtp_ep", "DTP+EP ff-EBM", "ffebm", "fmnist_mlp_dtp_ep", probe="dtp"),
)}
OPTIONAL_SYSTEMS = ("ep_lr01", "cep_eta01", "eqspike_stochastic")  # only when named in --systems
DEFAULT_SYSTEMS = tuple(n for n in SYSTEMS if n not in OPTIONAL_SYSTEMS)
REFERENCE = {"dense": "ep", "mlp": "bp", "ffebm": "bp_ep"}


@dataclass(frozen=True)
class StudySettings:
    """What the study trains: systems, seeds, data sizes and the probes' schedule."""

    systems: tuple[str, ...] = DEFAULT_SYSTEMS
    seeds: tuple[int, ...] = (0,)
    epochs: int = 1
    limit_train: int | None = None        # None: all 60000 training images
    limit_test: int | None = None         # None: all 10000 test images
    curve_every: int = 0                  # steps between probes (0: a tenth of an epoch)
    curve_examples: int = 1000            # test images of the probe
    threads: int = 1
    data_dir: str | None = None
    extra: tuple[str, ...] = field(default=())  # config overrides for every run

    def validate(self) -> None:
        """Raise a ConfigError naming the option."""
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown or not self.systems:
            raise ConfigError(f"study local: --systems {','.join(self.systems) or '(none)'}: unknown system(s) "
                              f"{unknown or 'none given'}; valid: {', '.join(SYSTEMS)}")
        if len(set(self.systems)) != len(self.systems):
            raise ConfigError(f"study local: --systems names a system twice: {','.join(self.systems)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ConfigError(f"study local: --seeds must be distinct integers >= 0, got {list(self.seeds)}")
        for key, low in (("epochs", 1), ("limit_train", 1), ("limit_test", 1), ("curve_every", 0),
                         ("curve_examples", 1), ("threads", 1)):
            v = getattr(self, key)
            if v is None and key in ("limit_train", "limit_test"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"study local: --{key.replace('_', '-')} must be an integer >= {low}, got {v!r}")


# ---- one run -------------------------------------------------------------------------------

def run_config(system: System, seed: int, s: StudySettings, out_dir: Path) -> dict:
    """The trainer config of one run: the system's config and overrides, then the study's."""
    limits = [f"limit_train={'null' if s.limit_train is None else s.limit_train}",
              f"limit_test={'null' if s.limit_test is None else s.limit_test}"]
    overrides = [*system.overrides, *s.extra, f"epochs={s.epochs}", *limits, f"threads={s.threads}", f"seed={seed}",
                 "progress=false", "tensorboard=false", "resume=false", f"out_dir={out_dir}"]
    try:
        return load_config(system.config, overrides)
    except ConfigError as e:
        raise ConfigError(f"study local: system {system.name} ({system.config} {' '.join(overrides)}): {e}") from None


def _digests(model: nn.Module) -> dict[str, float]:
    return {n: float(p.detach().double().sum()) for n, p in model.named_parameters()}


def _batches(loader, n: int) -> list[tuple[Tensor, Tensor]]:
    """The loader's first batches, cut to n examples."""
    out, got = [], 0
    for x, y in loader:
        out.append((x[:n - got], y[:n - got]))
        got += out[-1][0].shape[0]
        if got >= n:
            break
    return out


@torch.no_grad()
def probe_error(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> float:
    """Top-1 error (%) of the model on the batches (eval mode; the mode is restored)."""
    was = model.training
    model.eval()
    wrong = total = 0
    for x, y in batches:
        wrong += int((model(x).argmax(1) != y).sum())
        total += y.shape[0]
    model.train(was)
    return 100.0 * wrong / total


def _probe(system: System, model: nn.Module, test_batches: list, train_batch: tuple[Tensor, Tensor], step: int,
           epoch: float) -> dict:
    """One point of the curve (see the module docstring); the random generator is forked."""
    with torch.random.fork_rng(devices=[]):
        point: dict = {"step": step, "epoch": round(epoch, 4), "test_error": probe_error(model, test_batches)}
        if system.probe == "vf":
            from ..vector_field import model_backward_angles
            point["vf_angles_deg"] = [[round(a, 3) for a in block] for block in model_backward_angles(model)]
        elif system.probe == "dtp" and step > 0:  # before the first step the feedback maps are still zero
            from ..target_prop import update_angles
            point["dtp_angles_deg"] = [round(a, 3) for a in update_angles(model, *train_batch)]
    return point


def train_system(system: System, seed: int, s: StudySettings, data: tuple, runs_dir: Path, log: Log = print) -> dict:
    """Train one system from `seed`; its record (a run that fails is recorded with its error)."""
    out_dir = runs_dir / f"{system.name}-seed{seed}"
    cfg = run_config(system, seed, s, out_dir)
    probe_time: dict[int, list[float]] = {}
    curve: list[dict] = []
    state: dict = {}

    def on_step(t: Trainer) -> None:
        steps = len(t.train_loader)
        step = t.epoch * steps + t.step
        if step % state["every"] and t.step != steps:
            return
        w, c = time.perf_counter(), time.process_time()
        curve.append(_probe(system, t.model, state["test"], state["train"], step, step / steps))
        spent = probe_time.setdefault(t.epoch, [0.0, 0.0])
        spent[0] += time.perf_counter() - w
        spent[1] += time.process_time() - c

    trainer = Trainer(cfg, *data, echo=lambda _m: None, on_step=on_step)
    record: dict = {"system": system.name, "label": system.label, "network": system.network, "seed": seed,
                    "config": system.config, "overrides": [*system.overrides, *s.extra], "algorithm": cfg["algorithm"],
                    "init_digests": _digests(trainer.model), "out_dir": str(out_dir),
                    "train_examples": trainer.train_loader.num_examples,
                    "test_examples": trainer.test_loader.num_examples}
    try:
        steps = len(trainer.train_loader)
        state.update(every=s.curve_every or max(1, steps // 10), test=_batches(trainer.test_loader, s.curve_examples),
                     train=next(iter(trainer.train_loader)))
        curve.append(_probe(system, trainer.model, state["test"], state["train"], 0, 0.0))
        t0 = time.perf_counter()
        summary = trainer.fit()
        record["wall_s"] = time.perf_counter() - t0
    except TrainingError as e:
        log(f"{system.name} seed {seed}: {e}")
        return {**record, "error": str(e), "curve": curve}
    finally:
        trainer.close()
    if summary["status"] != "completed":
        raise KeyboardInterrupt
    epochs = []
    for r in read_metrics(out_dir / "metrics.jsonl"):
        pw, pc = probe_time.get(r["epoch"] - 1, [0.0, 0.0])
        epochs.append({"epoch": r["epoch"], "train_error": 100.0 - r["train_top1"], "train_loss": r["train_loss"],
                       "test_error": 100.0 - r["test_top1"] if "test_top1" in r else None,
                       "test_loss": r.get("test_loss"), "wall_s": r["train_time_s"] - pw,
                       "cpu_s": r["cpu_time_s"] - pc, "probe_wall_s": pw, "probe_cpu_s": pc,
                       "load_avg_1min": r.get("load_avg_1min")})
    record.update(steps_per_epoch=steps, epochs=epochs, curve=curve, test_error=epochs[-1]["test_error"],
                  train_error=epochs[-1]["train_error"], wall_s_per_epoch=statistics.fmean(e["wall_s"] for e in epochs),
                  cpu_s_per_epoch=statistics.fmean(e["cpu_s"] for e in epochs))
    return record


def _settings_record(s: StudySettings) -> dict:
    return {"systems": list(s.systems), "seeds": list(s.seeds), "epochs": s.epochs, "limit_train": s.limit_train,
            "limit_test": s.limit_test, "curve_every": s.curve_every, "curve_examples": s.curve_examples,
            "threads": s.threads, "extra": list(s.extra)}


def run_local(s: StudySettings, data: tuple, runs_dir: Path, results: Path | None = None, resume: bool = False,
              command: str = "", log: Log = print) -> dict:
    """Train every (seed, system) run not done yet; the results (written to `results` after each run)."""
    s.validate()
    from ..training.models import build_model, model_inputs

    for name in s.systems:  # every config resolves and builds its model before anything trains
        cfg = run_config(SYSTEMS[name], s.seeds[0], s, runs_dir / "check")
        try:
            build_model(cfg, model_inputs(data[0]))
        except (ConfigError, ValueError, TypeError) as e:
            raise ConfigError(f"study local: system {name} ({SYSTEMS[name].config}): {e}") from None
    old = json.loads(results.read_text()) if resume and results is not None and results.exists() else {}
    keep = old.get("settings", {}) | {"systems": [], "seeds": []} == _settings_record(s) | {"systems": [], "seeds": []}
    runs = list(old.get("runs", [])) if keep else []
    doc = {"command": command, "settings": _settings_record(s), "machine": machine(), "runs": runs}
    for seed in s.seeds:
        for name in s.systems:
            if any(r["system"] == name and r["seed"] == seed and "error" not in r for r in runs):
                continue
            runs[:] = [r for r in runs if not (r["system"] == name and r["seed"] == seed)]
            log(f"study local: {name} seed {seed} ...")
            r = train_system(SYSTEMS[name], seed, s, data, runs_dir, log)
            runs.append(r)
            if "error" not in r:
                log(f"  {SYSTEMS[name].label}: test error {r['test_error']:.2f}%, train error {r['train_error']:.2f}%, "
                    f"{r['wall_s_per_epoch']:.0f} s wall / {r['cpu_s_per_epoch']:.0f} s CPU per epoch")
            if results is not None:
                results.parent.mkdir(parents=True, exist_ok=True)
                results.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "processor": cpu_model() or platform.machine()}


# ---- report -------------------------------------------------------------------------------

def _mean(xs: Sequence[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def complete_seeds(doc: dict) -> list[int]:
    """The seeds for which every system of the study has a run (finished or failed): the
    report compares systems over these seeds only (an interrupted study leaves others)."""
    return [k for k in doc["settings"]["seeds"]
            if all(any(r["system"] == n and r["seed"] == k for r in doc["runs"]) for n in doc["settings"]["systems"])]


def summarize(doc: dict) -> list[dict]:
    """One row per system (in the study's order): test and train error over the seeds (mean,
    std), time per epoch (wall, CPU), the angles, and whether it shares initial weights with
    its network's reference."""
    runs = [r for r in doc["runs"] if r["seed"] in complete_seeds(doc)]
    rows = []
    for name in doc["settings"]["systems"]:
        mine = [r for r in runs if r["system"] == name]
        if not mine:
            continue
        done = [r for r in mine if "error" not in r]
        errs = [r["test_error"] for r in done]
        row = {"system": name, "label": SYSTEMS[name].label, "network": SYSTEMS[name].network, "n": len(done),
               "failed": len(mine) - len(done), "seeds": [r["seed"] for r in done],
               "test_errors": errs, "test_error": _mean(errs),
               "test_std": statistics.stdev(errs) if len(errs) > 1 else None,
               "train_error": _mean([r["train_error"] for r in done]),
               "wall_s": _mean([r["wall_s_per_epoch"] for r in done]),
               "cpu_s": _mean([r["cpu_s_per_epoch"] for r in done])}
        vf = [p["vf_angles_deg"] for r in done for p in r["curve"] if "vf_angles_deg" in p]
        if vf:
            row["vf_angle_first"] = _mean([r["curve"][0]["vf_angles_deg"][0][0] for r in done])
            row["vf_angle_last"] = _mean([r["curve"][-1]["vf_angles_deg"][0][0] for r in done])
        dtp = [p["dtp_angles_deg"] for r in done for p in r["curve"] if "dtp_angles_deg" in p]
        if dtp:
            row["dtp_angle_max"] = [max(a[k] for a in dtp) for k in range(len(dtp[0]))]
            row["dtp_angle_last"] = [_mean([r["curve"][-1]["dtp_angles_deg"][k] for r in done])
                                     for k in range(len(dtp[0]))]
        ref = [r for r in runs if r["system"] == REFERENCE[SYSTEMS[name].network] and "error" not in r]
        same = [r["init_digests"] == q["init_digests"] for r in done for q in ref if q["seed"] == r["seed"]]
        row["same_init_as_reference"] = all(same) if same else None
        rows.append(row)
    return rows


def check_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets on these rows: {'target', 'measured', 'met'} (met None: not run)."""
    by = {r["system"]: r for r in rows if r["test_error"] is not None}

    def gap(a: str, b: str, limit: float, what: str) -> dict:
        if a not in by or b not in by:
            return {"target": what, "measured": "not run", "met": None}
        d = by[a]["test_error"] - by[b]["test_error"]
        return {"target": what, "measured": f"{by[a]['label']} {by[a]['test_error']:.2f}% vs {by[b]['label']} "
                                            f"{by[b]['test_error']:.2f}% test error ({d:+.2f} points)",
                "met": d <= limit}

    out = [gap("cep", "ep", 1.0, "C-EP within 1 point of EP")]
    if "cep_eta01" in by:
        out.append(gap("cep_eta01", "ep_lr01", 1.0, "C-EP within 1 point of EP, both at rate 0.01"))
    out += [
           gap("eqspike", "ep", 1.5, "EqSpike within 1.5 points of rate-based EP")]
    if "eqspike_stochastic" in by:
        out.append(gap("eqspike_stochastic", "ep", 1.5, "EqSpike (stochastic) within 1.5 points of rate-based EP"))
    out.append(gap("vf", "ep", 1.0, "VF-EP within 1 point of symmetric EP"))
    acc = gap("ldrl", "bp", 1.0, "DTP-LDRL within 1 point of backprop")
    out.append(acc)
    if "ldrl" in by and "dtp_angle_max" in by["ldrl"]:
        hidden = by["ldrl"]["dtp_angle_max"]
        out.append({"target": "DTP-LDRL angle to backprop's update below 30 degrees throughout training",
                    "measured": "largest per layer " + ", ".join(f"{a:.1f}" for a in hidden) + " degrees",
                    "met": max(hidden) < 30.0})
    return out


def _fmt(v: float | None, d: int = 2) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def markdown_table(rows: list[dict]) -> str:
    """The study's table: per system, test error (mean ± std over seeds), train error, time
    per epoch (wall and CPU), angles."""
    lines = ["| network | system | test error (%) | train error (%) | wall s / epoch | CPU s / epoch | "
             "seeds | angle (deg) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        err = "failed" if r["test_error"] is None else (
            _fmt(r["test_error"]) + (f" ± {r['test_std']:.2f}" if r["test_std"] is not None else ""))
        if "vf_angle_last" in r:
            angle = f"B vs W^T: {r['vf_angle_first']:.1f} -> {r['vf_angle_last']:.1f}"
        elif "dtp_angle_max" in r:
            angle = ("max " + ", ".join(f"{a:.1f}" for a in r["dtp_angle_max"]) + "; last "
                     + ", ".join(f"{a:.1f}" for a in r["dtp_angle_last"]))
        else:
            angle = "-"
        seeds = (", ".join(str(k) for k in r["seeds"]) or "none") + (f" (+{r['failed']} failed)" if r["failed"] else "")
        lines.append(f"| {r['network']} | {r['label']} | {err} | {_fmt(r['train_error'])} | {_fmt(r['wall_s'], 1)} | "
                     f"{_fmt(r['cpu_s'], 1)} | {seeds} | {angle} |")
    return "\n".join(lines) + "\n"


def _seed_note(runs: list[dict], seeds: list[int]) -> str:
    """' (seeds 1)' when a system's runs cover fewer than the study's complete seeds."""
    mine = sorted({r["seed"] for r in runs})
    return "" if mine == sorted(seeds) else f" (seed{'s' if len(mine) > 1 else ''} {', '.join(map(str, mine))})"


def _mean_curve(runs: list[dict], key: Callable[[dict], float | None]) -> tuple[list[float], list[float]]:
    n = min(len(r["curve"]) for r in runs)
    xs, ys = [], []
    for i in range(n):
        vals = [key(r["curve"][i]) for r in runs]
        if all(v is not None for v in vals):
            xs.append(runs[0]["curve"][i]["epoch"])
            ys.append(statistics.fmean(vals))
    return xs, ys


def plot_curves(doc: dict, path: Path, title: str) -> None:
    """Left: probe test error along training, one line per system (mean over seeds); middle:
    angle between B and W^T (vector-field systems); right: DTP's per-layer angle to backprop."""
    require("matplotlib", "plot", "the local study's figure").use("Agg")
    plt = require("matplotlib.pyplot", "plot", "the local study's figure")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"dense": "-", "mlp": "--", "ffebm": ":"}
    seeds = complete_seeds(doc)
    for i, name in enumerate(doc["settings"]["systems"]):
        color = plt.cm.tab20(i % 20)  # one colour per system (the default cycle repeats after 10)
        # runs that stopped are drawn up to their last probe
        runs = [r for r in doc["runs"] if r["system"] == name and r["seed"] in seeds and r.get("curve")]
        finished = [r for r in runs if "error" not in r]
        runs = finished or runs
        if not runs:
            continue
        sy = SYSTEMS[name]
        label = sy.label + (" (stopped)" if not finished else "") + _seed_note(runs, seeds)
        axes[0].plot(*_mean_curve(runs, lambda p: p["test_error"]), styles[sy.network], marker=".", label=label,
                     color=color)
        if sy.probe == "vf":
            axes[1].plot(*_mean_curve(runs, lambda p: p["vf_angles_deg"][0][0]), marker=".", label=label, color=color)
        measured = [p for r in runs for p in r["curve"] if "dtp_angles_deg" in p]
        if sy.probe == "dtp" and measured:
            for k in range(len(measured[0]["dtp_angles_deg"]) - 1):  # the output layer's angle is 0
                axes[2].plot(*_mean_curve(runs, lambda p, k=k: p["dtp_angles_deg"][k] if "dtp_angles_deg" in p
                                          else None), styles[sy.network],
                             marker=".", label=f"{label}, layer {k + 1}")
    for ax, name in zip(axes, ("probe test error (%)", "angle B vs W^T (deg)", "angle to backprop's update (deg)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _title(doc: dict) -> str:
    s = doc["settings"]
    first = doc["runs"][0] if doc["runs"] else {}
    train, test = first.get("train_examples", s["limit_train"]), first.get("test_examples", s["limit_test"])
    data = (f"{train} training / {test} test images" if train is not None and test is not None else
            f"{train or 'all'} training / {test or 'all'} test images")
    return (f"Fashion-MNIST, {data}, {s['epochs']} epoch(s), seeds "
            f"{', '.join(str(k) for k in complete_seeds(doc)) or 'none complete'}, {s['threads']} thread(s)")


def _every(doc: dict) -> int | str:
    """The probes' spacing in steps (curve_every, or the tenth of an epoch it defaulted to)."""
    if doc["settings"]["curve_every"]:
        return doc["settings"]["curve_every"]
    steps = next((r["steps_per_epoch"] for r in doc["runs"] if "steps_per_epoch" in r), None)
    return "(a tenth of an epoch)" if steps is None else max(1, steps // 10)


def curve_tables(doc: dict) -> str:
    """The probe curves as markdown: test error per system at each probe, the angle between
    B and W^T (first coupling) and DTP's per-layer angles (means over the complete seeds)."""
    seeds = complete_seeds(doc)
    runs = [r for r in doc["runs"] if r["seed"] in seeds and "error" not in r]
    if not runs:
        return ""
    epochs = [p["step"] for p in min((r["curve"] for r in runs), key=len)]
    head = "| step | " + " | ".join(str(e) for e in epochs) + " |\n|---|" + "---|" * len(epochs)

    def table(title: str, rows: list[tuple[str, Callable[[dict], str | None]]]) -> list[str]:
        out = ["", title, "", head]
        for label, cell in rows:
            out.append(f"| {label} | " + " | ".join(cell({"i": i}) or "-" for i in range(len(epochs))) + " |")
        return out

    def mean_at(name: str, key: Callable[[dict], float | None], d: int = 1) -> Callable[[dict], str | None]:
        mine = [r for r in runs if r["system"] == name]

        def cell(at: dict) -> str | None:
            vals = [key(r["curve"][at["i"]]) for r in mine]
            return None if any(v is None for v in vals) else f"{statistics.fmean(vals):.{d}f}"
        return cell

    names = [n for n in doc["settings"]["systems"] if any(r["system"] == n for r in runs)]
    steps = next((r["steps_per_epoch"] for r in runs if "steps_per_epoch" in r), "?")
    label = {n: SYSTEMS[n].label + _seed_note([r for r in runs if r["system"] == n], seeds) for n in names}
    lines = table(f"Probe test error (%) by training step ({steps} steps per epoch):",
                  [(label[n], mean_at(n, lambda p: p["test_error"])) for n in names])
    vf = [n for n in names if SYSTEMS[n].probe == "vf"]
    dtp = [n for n in names if SYSTEMS[n].probe == "dtp"]
    if vf or dtp:
        rows = [(f"{label[n]}: B vs W^T", mean_at(n, lambda p: p["vf_angles_deg"][0][0])) for n in vf]
        for n in dtp:
            layers = len(next(p for r in runs if r["system"] == n for p in r["curve"] if "dtp_angles_deg" in p)
                         ["dtp_angles_deg"]) - 1  # the output layer's angle is 0
            rows += [(f"{label[n]}: layer {k + 1} vs backprop",
                      mean_at(n, lambda p, k=k: p["dtp_angles_deg"][k] if "dtp_angles_deg" in p else None))
                     for k in range(layers)]
        lines += table("Angles (degrees) by training step:", rows)
    return "\n".join(lines) + "\n"


def doc_section(doc: dict, figure: str | None, report_command: str | None = None) -> str:
    """The generated markdown section (between the BEGIN and END markers)."""
    s = doc["settings"]
    rows = summarize(doc)
    lines = [BEGIN, "", "### Measured", "",
             "This section is generated by the study from its JSON results. Made by", "", f"    {doc['command']}", "",
             *([f"and written here from the JSON by `{report_command}`.", ""] if report_command else []),
             f"{_title(doc)}; torch {doc['machine']['torch']}. Probe: test error on the first "
             f"{s['curve_examples']} test images every {_every(doc)} steps. "
             "Times are per epoch with the probes taken out: wall seconds and the process's CPU seconds (on a "
             "shared machine the wall time includes waiting for a core). Errors are the last epoch's, mean ± std "
             "over the seeds; the train error is the Trainer's, over the epoch's batches as they were trained.", "",
             markdown_table(rows)]
    lines += ["Targets of the issue on this run:", ""]
    for t in check_targets(rows):
        verdict = {True: "met", False: "not met", None: "not measured"}[t["met"]]
        lines.append(f"- {t['target']}: **{verdict}** ({t['measured']}).")
    shared = [r["label"] for r in rows if r["same_init_as_reference"] and r["system"] not in REFERENCE.values()]
    other = [r["label"] for r in rows if r["same_init_as_reference"] is False]
    lines += ["", "Initial weights (digests in the JSON): " + ("; ".join(shared) or "none")
              + " started from exactly the weights of their network's reference run (EP, BP, BP+EP ff-EBM) for "
              "each seed" + (f"; not so {' and '.join(other)} (their blocks hold other parameters)" if other else "")
              + "."]
    per_seed = [r for r in rows if len(r["seeds"]) > 1]
    if per_seed:
        seeds = complete_seeds(doc)
        lines += ["", "Test error per seed (%):", "", "| system | " + " | ".join(f"seed {k}" for k in seeds)
                  + " |", "|---|" + "---|" * len(seeds)]
        for r in per_seed:
            errs = dict(zip(r["seeds"], r["test_errors"]))
            lines.append(f"| {r['label']} | " + " | ".join(_fmt(errs.get(k)) for k in seeds) + " |")
    failed = [r for r in doc["runs"] if "error" in r]
    if failed:
        lines += ["", "Runs that stopped (the Trainer's message):", ""]
        for r in failed:
            last = r["curve"][-1] if r.get("curve") else None
            seen = "" if last is None or last["step"] == 0 else (
                f" Last probe before it stopped, step {last['step']}: test error {last['test_error']:.1f}%"
                + (", angles " + ", ".join(f"{a:.1f}" for a in last["dtp_angles_deg"]) + " degrees"
                   if "dtp_angles_deg" in last else "") + ".")
            lines.append(f"- {SYSTEMS[r['system']].label}, seed {r['seed']}: {r['error']}.{seen}")
    lines.append(curve_tables(doc))
    done = complete_seeds(doc)
    extra = [r for r in doc["runs"] if r["seed"] not in done and "error" not in r]
    if extra:
        lines += ["", "Runs of seeds that not every system finished (the study was stopped); not in the table "
                  "above:", "", "| system | seed | test error (%) | train error (%) | wall s / epoch | CPU s / epoch |",
                  "|---|---|---|---|---|---|"]
        for r in extra:
            lines.append(f"| {SYSTEMS[r['system']].label} | {r['seed']} | {r['test_error']:.2f} | "
                         f"{r['train_error']:.2f} | {r['wall_s_per_epoch']:.1f} | {r['cpu_s_per_epoch']:.1f} |")
    if figure:
        lines += ["", f"![probe test error, B-W^T angle and DTP angles along training]({figure})"]
    lines += ["", END]
    return "\n".join(lines) + "\n"


def write_doc(path: Path, section: str) -> None:
    """Replace the generated section of the markdown file (appended the first time)."""
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + section
    path.write_text(text)


def portable(doc: dict) -> dict:
    """The results with each run's folder named relative to the study's output folder
    (`runs/<system>-seed<k>`), in its record and in its error message: what is published
    does not depend on where the study ran."""
    doc = json.loads(json.dumps(doc))
    for r in doc["runs"]:
        old = r.get("out_dir")
        if old is None:
            continue
        new = f"runs/{r['system']}-seed{r['seed']}"
        r["out_dir"] = new
        if "error" in r:
            r["error"] = r["error"].replace(old, new)
    return doc


def write_outputs(doc: dict, out: Path, json_path: Path | None = None, figure: Path | None = None,
                  doc_path: Path | None = None, log: Log = print) -> str:
    """table.md and local_study.png under `out` (and the JSON, figure and doc section where
    asked, with portable run folders); returns the table."""
    doc = portable(doc)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(doc)
    table = f"**{_title(doc)}**\n\n" + markdown_table(rows)
    (out / "table.md").write_text(table)
    png = out / "local_study.png"
    try:
        plot_curves(doc, png, _title(doc))
    except ImportError as e:
        log(f"note: no figure: {e}")
        png = None
    if json_path is not None and json_path.resolve() != (out / "results.json").resolve():
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(doc, indent=1) + "\n")
    if figure is not None and png is not None:
        figure.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, figure)
    if doc_path is not None:
        link = os.path.relpath(figure, doc_path.parent) if figure is not None and png is not None else None
        cmd = " ".join(["eqprop study local --report", *(f"--{k} {v}" for k, v in (
            ("json", json_path), ("figure", figure), ("doc", doc_path)) if v is not None)])
        write_doc(doc_path, doc_section(doc, link, cmd))
    return table


# ---- command line -------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The local study's options (--epochs, --limit-train, --limit-test, --seeds, --out come
    from the shared parser)."""
    parser.add_argument("--systems", default=None,
                        help="local: comma-separated systems (default: " + ",".join(DEFAULT_SYSTEMS)
                             + "; also: eqspike_stochastic)")
    parser.add_argument("--curve-every", type=int, default=0, help="local: steps between probes (0: epoch / 10)")
    parser.add_argument("--curve-examples", type=int, default=1000, help="local: test images of the probe")
    parser.add_argument("--json", default=None, help="local: also write the results JSON here")
    parser.add_argument("--figure", default=None, help="local: also write the figure here")
    parser.add_argument("--doc", default=None, help="local: write the generated section into this markdown file")
    parser.add_argument("--report", action="store_true", help="local: rebuild the outputs without training, from "
                                                              "--json when that file exists, else <out>/results.json")


def settings_from_args(args: argparse.Namespace) -> StudySettings:
    """StudySettings from the command line (options of the other studies are refused)."""
    for flag, name in ((args.config != "study_fmnist_cpu", "--config"), (args.dataset, "--dataset"),
                       (args.rules_given, "--rules"), (args.batch_size, "--batch-size"), (args.only, "--only")):
        if flag:
            raise ConfigError(f"study local: {name} does not apply (the systems are fixed configs; choose them "
                              f"with --systems)")
    systems = tuple(x.strip() for x in args.systems.split(",")) if args.systems is not None else DEFAULT_SYSTEMS
    s = StudySettings(systems=systems, seeds=tuple(args.seeds), epochs=1 if args.epochs is None else args.epochs,
                      limit_train=args.limit_train, limit_test=args.limit_test, curve_every=args.curve_every,
                      curve_examples=args.curve_examples, threads=args.threads or 1, data_dir=args.data_dir,
                      extra=tuple([*args.overrides, *args.set]))
    s.validate()
    return s


def _command(args: argparse.Namespace) -> str:
    parts = ["eqprop study local"]
    if args.systems is not None:
        parts.append(f"--systems {args.systems}")
    parts.append("--seeds " + " ".join(str(k) for k in args.seeds))
    for flag, v in (("--epochs", args.epochs), ("--limit-train", args.limit_train), ("--limit-test", args.limit_test),
                    ("--threads", args.threads)):
        if v is not None:
            parts.append(f"{flag} {v}")
    if args.curve_every:
        parts.append(f"--curve-every {args.curve_every}")
    if args.curve_examples != 1000:
        parts.append(f"--curve-examples {args.curve_examples}")
    parts += [*args.overrides, *(["--set", *args.set] if args.set else [])]
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    """`eqprop study local`: train (or, with --report, only report) and write the outputs."""
    out = Path(args.out or "runs/study_local")
    results = out / "results.json"
    json_path = Path(args.json) if args.json else None
    paths = dict(json_path=json_path, figure=Path(args.figure) if args.figure else None,
                 doc_path=Path(args.doc) if args.doc else None)
    if args.report:
        source = json_path if json_path is not None and json_path.exists() else results
        if not source.exists():
            raise ConfigError(f"study local --report: no results at {source} (run the study first)")
        doc = json.loads(source.read_text())
        print(write_outputs(doc, out, **paths))
        return 0
    s = settings_from_args(args)
    torch.set_num_threads(s.threads)
    from ..data import load_dataset
    data = (load_dataset("fashion_mnist", "train", s.data_dir), load_dataset("fashion_mnist", "test", s.data_dir))
    out.mkdir(parents=True, exist_ok=True)
    print(f"study local: {list(s.systems)}, seeds {list(s.seeds)}, {s.epochs} epoch(s), threads {s.threads}",
          flush=True)
    doc = run_local(s, data, out / "runs", results, resume=args.resume, command=_command(args))
    print(write_outputs(doc, out, **paths))
    failed = [f"{r['system']} seed {r['seed']}" for r in doc["runs"] if "error" in r]
    if failed:
        print(f"study local: failed runs (recorded with their errors): {', '.join(failed)}", flush=True)
    return 0
