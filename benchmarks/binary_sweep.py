"""Short runs of a binary training config with settings changed one run at a time: each run
is `eqprop train CONFIG limit_train=N progress=false tensorboard=false OVERRIDES` through the
same Trainer, in one process, one thread (docs/binary.md, the tuning of the dense network with
binary weights and step neurons).

    .venv/bin/python benchmarks/binary_sweep.py \
        fmnist_binary_full "model.binary.scale=mean" "estimator.ep.beta=3.0 optim.lr=1e-3" ...

Each quoted argument is one run (space-separated overrides; "" is the config as it is). Appends
one JSON line per run (config, overrides, test top-1, train top-1, CPU seconds) to
benchmarks/results/binary_sweep.jsonl (--out to change).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from eqprop.training.config import load_config
from eqprop.training.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("runs", nargs="+", help="one quoted string of overrides per run")
    p.add_argument("--limit-train", type=int, default=20000)
    p.add_argument("--out", default="benchmarks/results/binary_sweep.jsonl")
    p.add_argument("--run-dir", default="runs/binary_sweep")
    a = p.parse_args()
    torch.set_num_threads(1)
    for spec in a.runs:
        overrides = spec.split()
        tag = "_".join(o.replace("=", "-").replace(".", "") for o in overrides) or "config"
        cfg = load_config(a.config, [f"limit_train={a.limit_train}", "progress=false", "tensorboard=false",
                                     f"out_dir={a.run_dir}/{a.config}/{tag}", *overrides])
        t0 = time.process_time()
        summary = Trainer(cfg, echo=lambda _m: None).fit()
        rec = {"config": a.config, "limit_train": a.limit_train, "overrides": overrides,
               "test_top1": summary["last"]["test_top1"], "train_top1": round(summary["last"]["train_top1"], 2),
               "cpu_s": round(time.process_time() - t0, 1), "torch": torch.__version__}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
