"""`eqprop study algorithms|precision`: the studies' command line.

    eqprop study algorithms                                   # all nine rules, study_fmnist_cpu
    eqprop study algorithms epochs=1 --rules cep,cl,tbp --seeds 0 1 --set optim.lr=1e-3
    eqprop study algorithms --config study_published device=cuda --dataset cifar10
    eqprop study precision --rule cep --dtypes bfloat16 float16 --steps 3
    eqprop study hardware --only read_noise,adc_bits          # analog non-idealities, EP and BPTT
    eqprop study continual tasks=5 metas=[0,1,2] --seeds 0 1     # forgetting of binarized networks
    eqprop study local --limit-train 10000 --seeds 0 1 2       # local rules: C-EP, VF-EP, EqSpike, DTP ...

Overrides are trainer config keys (`eqprop train` ones): epochs, optim.lr, limit_train,
relax_dtype, model.T1, and each rule's settings under estimator.<rule> (estimator.cep.beta);
for `continual` they are its own settings (eqprop.studies.continual.ContinualSettings).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..training.config import ConfigError
from ..training.trainer import TrainingError
from .algorithms import ALL_RULES, DEFAULT_CONFIG, load_data, run_study, study_config, write_report
from .hardware import add_arguments as hardware_arguments
from .local import add_arguments as local_arguments
from .precision import precision_study

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", choices=["algorithms", "precision", "continual", "hardware", "local"],
                        help="algorithms: train with every rule; precision: 16-bit relaxation against float32; "
                             "continual: task sequences, binarized networks with metaplasticity; "
                             "hardware: accuracy under analog device non-idealities (EP and BPTT); "
                             "local: EP, C-EP, VF-EP, C-VF, EqSpike, DTP, L-DRL and backprop on Fashion-MNIST")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with the trainer's keys, e.g. epochs=5 optim.lr=1e-3 "
                             "estimator.cep.beta=0.1")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="more config overrides (usable after other options)")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"study config name in eqprop/configs or a YAML path (default: {DEFAULT_CONFIG}; the "
                             f"published architecture: study_published)")
    parser.add_argument("--dataset", help="image dataset name (fashion_mnist, mnist, svhn, cifar10, cifar100)")
    parser.add_argument("--rules", default=",".join(ALL_RULES),
                        help="comma-separated estimator names (default: all nine, " + ",".join(ALL_RULES) + ")")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (one run per rule and seed)")
    parser.add_argument("--data-dir", default=None, help="data directory (default: $EQPROP_DATA, then ~/.cache/eqprop)")
    parser.add_argument("--out", default=None,
                        help="output directory (default: runs/study_algorithms, runs/study_continual)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--resume", action="store_true",
                        help="skip (rule, seed) runs already in <out>/results.json with the same config")
    parser.add_argument("--rule", default="cep", help="precision: the rule to measure (default cep)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16"],
                        help="precision: 16-bit dtypes to compare with float32")
    parser.add_argument("--batch-size", type=int, default=None, help="precision: batch size (default: config's)")
    parser.add_argument("--steps", type=int, default=3, help="precision: timed training steps per setting")
    hardware_arguments(parser)
    local_arguments(parser)


def resolve(args: argparse.Namespace) -> dict:
    """The study's config: file, positional and --set overrides, then the options' values."""
    extra = [*args.overrides, *args.set]
    for flag, key in ((args.dataset, "dataset"), (args.data_dir, "data_dir"), (args.threads, "threads"),
                      (args.batch_size, "batch_size")):
        if flag is not None:
            extra.append(f"{key}={flag}")
    return study_config(args.config, extra)


def algorithms(args: argparse.Namespace, cfg: dict) -> int:
    """Train every rule and seed, then write the report."""
    out = Path(args.out or "runs/study_algorithms")
    out.mkdir(parents=True, exist_ok=True)
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    with open(out / "log.txt", "a") as log_file:
        def log(msg: str) -> None:
            print(msg, flush=True)
            log_file.write(msg + "\n")
            log_file.flush()

        log(f"study algorithms: {cfg['dataset']}, config {args.config}, rules {rules}, seeds {args.seeds}")
        records = run_study(cfg, rules, args.seeds, out, resume=args.resume, log=log)
        title = f"{cfg['dataset']}: {args.config}, {cfg['epochs']} epochs, seeds {args.seeds}"
        log(write_report(records, rules, out, title, log))
        log(f"wrote {out / 'table.md'}, {out / 'curves.png'}, {out / 'results.json'}")
    return 0


def precision(args: argparse.Namespace, cfg: dict) -> int:
    """Print the 16-bit relaxation table for one rule."""
    data = load_data(cfg)
    print(f"study precision: {cfg['dataset']}, config {args.config}, rule {args.rule}, batch {cfg['batch_size']}, "
          f"threads {torch.get_num_threads()}", flush=True)
    print(precision_study(cfg, args.rule, args.dtypes, data, args.steps, Path(args.out or "runs/study_algorithms"),
                          args.seeds[0]))
    return 0


def continual(args: argparse.Namespace) -> int:
    """Learn a task sequence with binarized networks at each metaplasticity strength."""
    from ..data import load_dataset
    from .continual import parse_settings, run_continual
    from .continual import write_report as continual_report

    settings = parse_settings([*args.overrides, *args.set])
    for flag, name in ((args.config != DEFAULT_CONFIG, "--config"), (args.dataset, "--dataset"),
                       (args.resume, "--resume"), (args.batch_size, "--batch-size")):
        if flag:
            raise ConfigError(f"study continual: {name} does not apply (Fashion-MNIST tasks; settings are key=value)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out or "runs/study_continual")
    out.mkdir(parents=True, exist_ok=True)
    train = load_dataset("fashion_mnist", "train", args.data_dir)
    test = load_dataset("fashion_mnist", "test", args.data_dir)
    print(f"study continual: {settings}, seeds {args.seeds}, threads {torch.get_num_threads()}", flush=True)
    runs = run_continual(settings, train, test, args.seeds)
    print(continual_report(settings, runs, out, torch.get_num_threads()))
    print(f"wrote {out / 'table.md'}, {out / 'forgetting.png'}, {out / 'results.json'}")
    return 0


def run(args: argparse.Namespace) -> int:
    from ..data import DatasetError

    try:
        if args.study == "continual":
            return continual(args)
        if args.study == "local":
            from .local import run as local

            args.rules_given = args.rules != ",".join(ALL_RULES)
            return local(args)
        if args.study == "hardware":
            from .hardware import run as hardware

            args.rules_given = args.rules != ",".join(ALL_RULES)
            args.out = args.out or "runs/study_hardware"
            return hardware(args)
        cfg = resolve(args)
        return (precision if args.study == "precision" else algorithms)(args, cfg)
    except (ConfigError, DatasetError, TrainingError) as e:
        print(f"eqprop study: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        out = Path(args.out or "runs/study_algorithms")
        print(f"eqprop study: interrupted; finished runs are in {out / 'results.json'} "
              f"(continue with --resume)", file=sys.stderr)
        return 130
