"""`eqprop train CONFIG [key=value ...]`: train a named experiment config.

    eqprop train fmnist_cpu epochs=1 out_dir=runs/demo
    eqprop train cifar10_split_l6_2blocks algorithm=id optim.lr=1e-4 --data-dir ~/data
    eqprop train fmnist_cpu --resume                 # continue runs/fmnist_cpu/checkpoint.pt
    eqprop train fmnist_cpu --resume epochs=6        # extend it (key=value and flags mix in any order)
    eqprop train fmnist_cpu --overwrite              # replace the run in runs/fmnist_cpu
    torchrun --nproc_per_node=2 -m eqprop.cli train fmnist_cpu device=cpu
    eqprop train --list

User errors (a bad key or value, a folder holding another run, a damaged checkpoint, a
failing step) are raised as ConfigError, CheckpointError, TrainingError or DatasetError;
`eqprop` prints them as one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import (
    DEFAULTS,
    ConfigError,
    apply_overrides,
    check_resume,
    config_comment,
    list_configs,
    load_config,
    merge,
    to_yaml,
)

__all__ = ["add_arguments", "command_line", "describe_configs", "resolve", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="config name (see --list) or path to a .yaml file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides, e.g. algorithm=id optim.lr=1e-4 epochs=3 (+key=value adds a key); "
                             "they may come before or after the flags")
    parser.add_argument("--data-dir", help="data directory, the only place searched when given (see docs/data.md)")
    parser.add_argument("--out-dir", help="where checkpoint, metrics and curves go (default: runs/<config>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in <out-dir> (overrides given now apply from the resumed step)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run that <out-dir> holds (without it such a folder is refused)")
    parser.add_argument("--list", action="store_true", help="list the available configs and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def describe_configs() -> list[str]:
    """One line per config: name and the first comment line of its file."""
    return [f"{name:34s} {(config_comment(name) or [''])[0]}" for name in list_configs()]


def out_dir_of(cfg: dict) -> Path:
    return Path(cfg["out_dir"] or Path("runs") / str(cfg["name"]))


def resolve(args: argparse.Namespace) -> tuple[dict, dict | None, Path | None]:
    """(config to run, checkpoint state, checkpoint file): the config file + overrides, or
    when resuming the checkpoint's config + the overrides given now (checked by
    check_resume); the state is None for a new run."""
    extra = list(args.overrides)
    if args.data_dir:
        extra.append(f"data_dir={args.data_dir}")
    if args.out_dir:
        extra.append(f"out_dir={args.out_dir}")
    if args.resume:
        extra.append("resume=true")
    cfg = load_config(args.config, extra)
    if not cfg["resume"]:
        return cfg, None, None
    if getattr(args, "overwrite", False):
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the run in "
                          f"{out_dir_of(cfg)}, --overwrite replaces it")
    from . import checkpoint

    out = out_dir_of(cfg)
    path = out / "checkpoint.pt"
    if not path.exists() and not checkpoint.previous_path(path).exists() and (out / "config.yaml").exists():
        raise ConfigError(f"cannot resume: {out} holds a run that stopped before its first checkpoint was "
                          f"written ({path} does not exist); start it again with --overwrite")
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks for all
    state, used = checkpoint.load_latest(path, echo=print if main_rank else (lambda _m: None))
    saved = state["config"]
    if saved.get("name") != cfg["name"]:
        raise ConfigError(f"checkpoint {used} belongs to config {saved.get('name')!r}, not {cfg['name']!r}")
    # the checkpoint's config stands; overrides given now apply on top (e.g. epochs=200 to extend)
    resumed = apply_overrides(merge(DEFAULTS, saved, allow_new=True), extra)
    check_resume(saved, resumed, used)
    return resumed, state, used


def command_line(args: argparse.Namespace) -> str:
    """The `eqprop train` command as given (recorded in the run's run_info.json)."""
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in (("data_dir", args.data_dir), ("out_dir", args.out_dir)) if v]
    flags += [f"--{k}" for k in ("resume", "overwrite") if getattr(args, k, False)]
    return " ".join(["eqprop train", args.config, *args.overrides, *flags])


def run(args: argparse.Namespace) -> int:
    if args.list:
        print("\n".join(describe_configs()))
        return 0
    if not args.config:
        raise ConfigError("a config name is needed (eqprop train --list shows them)")
    from .trainer import Trainer, check_out_dir

    cfg, state, path = resolve(args)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    check_out_dir(out_dir_of(cfg), resume=cfg["resume"], overwrite=args.overwrite)
    try:
        trainer = Trainer(cfg, command=command_line(args))
        try:
            if state is not None:
                trainer.resume(path, state=state)
            summary = trainer.fit()
        finally:
            trainer.close()
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
