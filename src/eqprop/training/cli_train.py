"""`eqprop train CONFIG [key=value ...]`: train a named experiment config.

    eqprop train fmnist_cpu epochs=1 out_dir=runs/demo
    eqprop train cifar10_split_l6_2blocks algorithm=id optim.lr=1e-4 --data-dir ~/data
    eqprop train fmnist_cpu --resume                 # continue runs/fmnist_cpu/checkpoint.pt
    torchrun --nproc_per_node=2 -m eqprop.cli train fmnist_cpu device=cpu
    eqprop train --list
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import DEFAULTS, ConfigError, apply_overrides, config_dir, list_configs, load_config, merge, to_yaml

__all__ = ["add_arguments", "describe_configs", "resolve", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="config name (see --list) or path to a .yaml file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. algorithm=id optim.lr=1e-4 epochs=3 (+key=value adds a key)")
    parser.add_argument("--data-dir", help="data directory (default: $EQPROP_DATA, then ~/.cache/eqprop)")
    parser.add_argument("--out-dir", help="where checkpoint, metrics and curves go (default: runs/<config>)")
    parser.add_argument("--resume", action="store_true", help="continue from <out-dir>/checkpoint.pt")
    parser.add_argument("--list", action="store_true", help="list the available configs and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def describe_configs() -> list[str]:
    """One line per config: name and the first comment line of its file."""
    lines = []
    for name in list_configs():
        text = (config_dir() / f"{name}.yaml").read_text().splitlines()
        note = next((ln.lstrip("# ").strip() for ln in text if ln.startswith("#")), "")
        lines.append(f"{name:34s} {note}")
    return lines


def resolve(args: argparse.Namespace) -> dict:
    """The config to run: file + overrides (+ the checkpoint's config when resuming)."""
    extra = list(args.overrides)
    if args.data_dir:
        extra.append(f"data_dir={args.data_dir}")
    if args.out_dir:
        extra.append(f"out_dir={args.out_dir}")
    if args.resume:
        extra.append("resume=true")
    cfg = load_config(args.config, extra)
    if not cfg["resume"]:
        return cfg
    from . import checkpoint

    path = Path(cfg["out_dir"] or Path("runs") / cfg["name"]) / "checkpoint.pt"
    saved = checkpoint.load(path)["config"]
    if saved.get("name") != cfg["name"]:
        raise ConfigError(f"checkpoint {path} belongs to config {saved.get('name')!r}, not {cfg['name']!r}")
    # the checkpoint's config stands; overrides given now apply on top (e.g. epochs=200 to extend)
    resumed = apply_overrides(merge(DEFAULTS, saved, allow_new=True), extra)
    changed = sorted(k for k in resumed if resumed[k] != saved.get(k))
    if changed:
        print(f"resuming with changed settings: {', '.join(changed)}")
    return resumed


def run(args: argparse.Namespace) -> int:
    if args.list:
        print("\n".join(describe_configs()))
        return 0
    if not args.config:
        print("eqprop train: a config name is needed (eqprop train --list shows them)", file=sys.stderr)
        return 2
    from ..data import DatasetError
    from .checkpoint import CheckpointError
    from .trainer import Trainer, TrainingError

    try:
        cfg = resolve(args)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        trainer = Trainer(cfg)
        try:
            if cfg["resume"]:
                trainer.resume()
            summary = trainer.fit()
        finally:
            trainer.close()
    except (ConfigError, CheckpointError, TrainingError, DatasetError) as e:
        print(f"eqprop train: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("eqprop train: aborted; the last checkpoint written (if any) is kept", file=sys.stderr)
        return 130
    last = summary["last"]
    if "test_top1" in last and summary["is_main"]:
        print(f"test accuracy: top-1 {last['test_top1']:.2f}%, top-5 {last['test_top5']:.2f}% "
              f"(epoch {last['epoch']}, {last['epoch_time_s']:.0f} s for the epoch)")
    if summary["status"] == "interrupted":
        return 130
    return 0
