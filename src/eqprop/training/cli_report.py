"""`eqprop report RUN_DIR... [--out FILE]`: a results page written from training runs.

    eqprop report runs/demo runs/fmnist_cpu_long --out docs/results.md
    eqprop report runs/demo --check docs/results.md   # fails when the page is out of date

For each run folder: the command and code it came from (run_info.json), its settings, one
row per epoch of metrics.jsonl (test and train accuracy, loss, free-phase iterations, wall
and process CPU time, load average), and whether its config still equals the shipped config
of the same name (a run of a config that changed since is flagged with the keys that
differ). Then the shipped configs without a run in the page. Every number comes from the
run files; the page says so and names the command that wrote it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import DEFAULTS, ConfigError, config_comment, list_configs, load_config, load_config_file, merge
from .config import config_changes as changed_settings
from .metrics import read_metrics
from .runinfo import read_run_info

__all__ = ["add_arguments", "config_changes", "render", "run", "run_section"]

# keys that say where and how long a run went, not what it trained
RUN_KEYS = {"name", "out_dir", "data_dir", "resume", "progress", "tensorboard", "epochs", "threads", "device",
            "eval_every", "eval_batch_size", "limit_test"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (each with config.yaml and "
                                                                   "metrics.jsonl)")
    parser.add_argument("--out", help="write the page here (default: print it)")
    parser.add_argument("--title", default="Results", help="the page's title")
    parser.add_argument("--check", metavar="FILE", help="exit with status 1 when FILE differs from the page")


def config_changes(cfg: dict) -> list[str] | None:
    """Keys (dotted) whose values differ between a run's config and today's shipped config of
    the same name, outside RUN_KEYS; None when no shipped config has that name. Trainer keys
    added after the run count at their defaults, which keep the earlier behaviour."""
    name = cfg.get("name")
    if name not in list_configs():
        return None
    ran = merge(DEFAULTS, cfg, allow_new=True)
    return [key for key, _, _ in changed_settings(load_config(name), ran) if key.split(".")[0] not in RUN_KEYS]


def _fmt(v, digits: int = 2) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _settings(cfg: dict) -> str:
    m = cfg.get("model", {})
    est = cfg.get("estimator", {}).get(cfg.get("algorithm"), {})
    o = cfg.get("optim", {})
    parts = [f"model `{m.get('kind')}`"]
    if "blocks" in m:
        parts.append("blocks " + " | ".join(str(b.get("channels", b.get("sizes", b))) if isinstance(b, dict) else str(b)
                                           for b in m["blocks"]))
    parts += [f"{k} {m[k]}" for k in ("activation", "slope", "T1", "tol", "update", "relax_dtype") if k in m]
    parts.append(f"algorithm `{cfg.get('algorithm')}` " + ", ".join(f"{k} {v}" for k, v in est.items()))
    parts.append(f"{o.get('name')} lr {o.get('lr')} ({o.get('schedule')})")
    parts.append(f"batch {cfg.get('batch_size')}, seed {cfg.get('seed')}")
    if cfg.get("limit_train"):
        parts.append(f"first {cfg['limit_train']} training examples")
    if cfg.get("relax_dtype"):
        parts.append(f"relaxations in {cfg['relax_dtype']}")
    return "; ".join(parts)


def _first_sentence(name: str) -> str:
    """The first sentence of a shipped config's leading comment."""
    text = " ".join(" ".join(config_comment(name)).split())
    end = text.find(". ")
    return (text if end < 0 else text[:end + 1]).replace("|", "/")


def run_section(run_dir: Path) -> list[str]:
    """The markdown lines of one run folder."""
    return _section(Path(run_dir))[1]


def _section(run_dir: Path) -> tuple[str, list[str]]:
    """(config name, markdown lines) of one run folder."""
    cfg_path, metrics_path = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    for p in (cfg_path, metrics_path):
        if not p.exists():
            raise ConfigError(f"report: {run_dir} is not a run folder ({p.name} is missing)")
    cfg = load_config_file(str(cfg_path))
    try:
        records = [r for r in read_metrics(metrics_path) if "epoch" in r]
        sessions = read_run_info(run_dir)
    except ValueError as e:
        raise ConfigError(f"report: {e}") from None
    name = cfg.get("name") or run_dir.name
    lines = [f"## {name} (`{run_dir}`)", ""]
    if sessions:
        for s in sessions:
            model = f" ({s['cpu_model']})" if s.get("cpu_model") else ""
            commit = (s.get("git_commit") or "unknown")[:10] + (" with local changes" if s.get("git_dirty") else "")
            lines.append(f"- from epoch {s.get('start_epoch', 0) + 1}: `{s.get('command')}`; code {commit} "
                         f"(eqprop {s.get('version')}, torch {s.get('torch')}); {s.get('device')}, "
                         f"{s.get('cpu_count')} CPUs{model}, {s.get('torch_threads')} torch threads, "
                         f"{s.get('world_size')} process(es); started {s.get('started')}")
    else:
        lines.append("- command and code version not recorded (run made before run_info.json existed)")
    lines.append(f"- settings: {_settings(cfg)}")
    changes = config_changes(cfg)
    if changes is None:
        lines.append(f"- config `{name}` is not a shipped config")
    elif changes:
        lines.append(f"- **the shipped config `{name}` has changed since this run** (keys: {', '.join(changes)}); "
                     "these numbers belong to the settings above")
    else:
        lines.append(f"- the config equals today's shipped `{name}` (apart from run length and placement)")
    lines += ["", "| epoch | test top-1 | test top-5 | train top-1 | train loss | free iters | epoch wall (s) | "
                  "process CPU (s) | load avg |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['epoch']} | {_fmt(r.get('test_top1'))} | {_fmt(r.get('test_top5'))} | "
                     f"{_fmt(r.get('train_top1'))} | {_fmt(r.get('train_loss'), 4)} | {_fmt(r.get('iters_free'), 1)} | "
                     f"{_fmt(r.get('epoch_time_s'), 0)} | {_fmt(r.get('cpu_time_s'), 0)} | "
                     f"{_fmt(r.get('load_avg_1min'), 1)} |")
    if not records:
        lines.append("| (no epoch finished) | | | | | | | | |")
    tested = [r for r in records if r.get("test_top1") is not None]
    if tested:
        best = max(tested, key=lambda r: r["test_top1"])
        wall = sum(r.get("epoch_time_s") or 0.0 for r in records)
        lines += ["", f"Last test top-1 {tested[-1]['test_top1']:.2f}% (epoch {tested[-1]['epoch']}), best "
                      f"{best['test_top1']:.2f}% (epoch {best['epoch']}); {wall / 60:.1f} minutes of epochs in all."]
    return cfg.get("name"), lines + [""]


def render(run_dirs: list[Path], command: str, title: str = "Results") -> str:
    """The whole page: header, one section per run, the shipped configs not run."""
    lines = [f"# {title}", "",
             f"Written by `{command}` from the runs' own files (config.yaml, metrics.jsonl, "
             "run_info.json); do not edit by hand: re-run the command. Times are wall seconds of the "
             "whole epoch (training and evaluation) and the process's CPU seconds; the load average "
             "says how busy the machine was.", ""]
    ran = set()
    for d in run_dirs:
        name, section = _section(Path(d))
        lines += section
        ran.add(name)
    rest = [n for n in list_configs() if n not in ran]
    if rest:
        lines += ["## Shipped configs without a run here", "",
                  "Each trains with `eqprop train NAME` once its dataset is in the data directory.", "",
                  "| config | dataset | what it is |", "|---|---|---|"]
        for n in rest:
            lines.append(f"| `{n}` | {load_config(n).get('dataset')} | {_first_sentence(n)} |")
        lines.append("")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    target = args.out or args.check  # the page names the command that writes it
    command = "eqprop report " + " ".join(str(r) for r in args.runs) + (f" --out {target}" if target else "")
    page = render([Path(r) for r in args.runs], command, args.title)
    if args.check:
        current = Path(args.check).read_text() if Path(args.check).exists() else ""
        if current != page:
            print(f"{args.check} is out of date: re-run {command}", file=sys.stderr)
            return 1
        return 0
    if args.out:
        Path(args.out).write_text(page)
        print(f"wrote {args.out}")
    else:
        print(page, end="")
    return 0
