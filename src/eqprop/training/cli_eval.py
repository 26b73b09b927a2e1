"""`eqprop eval CHECKPOINT [key=value ...]`: test loss, top-1 and top-5 of a saved model.

    eqprop eval runs/demo/checkpoint.pt
    eqprop eval runs/demo/checkpoint.pt model.T1=100 --data-dir ~/data   # relax longer at test time
    eqprop eval model.T1=100 runs/demo/checkpoint.pt                     # overrides and the file in any order

Errors (a damaged checkpoint, a bad override, test data that does not fit the model) are
raised; `eqprop` prints them as one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import time

import torch

from .config import DEFAULTS, apply_overrides, merge

__all__ = ["add_arguments", "evaluate_checkpoint", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint.pt written by eqprop train")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides for evaluation (e.g. model.T1=100 eval_batch_size=256 device=cpu)")
    parser.add_argument("--data-dir", help="data directory, the only place searched when given (default: the "
                                           "checkpoint's; docs/data.md)")


@torch.no_grad()
def evaluate_checkpoint(path: str, overrides: list[str] = (), data_dir: str | None = None) -> dict:
    """Load the checkpoint's config and model, and evaluate it on the test split."""
    from ..data import DeviceLoader, default_std_factor, load_dataset
    from . import checkpoint
    from .distributed import resolve_device
    from .metrics import EpochTotals
    from .models import DTYPES, build_model, model_inputs
    from .trainer import OBJECTIVES, STEP_ERRORS, TrainingError

    state = checkpoint.load(path)
    extra = list(overrides) + ([f"data_dir={data_dir}"] if data_dir else [])
    cfg = apply_overrides(merge(DEFAULTS, state["config"], allow_new=True), extra)
    device = resolve_device(cfg["device"])
    dtype = DTYPES[cfg["dtype"]]
    test_set = load_dataset(cfg["dataset"], "test", cfg["data_dir"], **cfg["dataset_options"])
    model = build_model(cfg, model_inputs(test_set))
    checkpoint.load_model_state(model, state["model"], path)
    fmt = torch.channels_last if cfg["channels_last"] else None
    model = model.to(device, dtype)
    if fmt is not None:
        model = model.to(memory_format=fmt)
    model.eval()
    std = cfg["std_factor"] if cfg["std_factor"] is not None else default_std_factor(test_set.name)
    loader = DeviceLoader(test_set, cfg["eval_batch_size"], train=False, device=device, augment=False,
                          std_factor=std, dtype=dtype, limit=cfg["limit_test"], memory_format=fmt)
    totals = EpochTotals(device)
    t0 = time.perf_counter()
    objective = OBJECTIVES.get(state.get("objective", "CrossEntropy"))
    if objective is None:
        raise checkpoint.CheckpointError(f"checkpoint {path}: unknown objective {state.get('objective')!r}; known: "
                              f"{', '.join(OBJECTIVES)}")
    objective = objective()
    for i, (x, y) in enumerate(loader):
        try:
            output = model(x, target=y) if objective.target_in_forward else model(x)
            output = output.float()
            totals.add(objective.loss(output, y), objective.scores(output), y)
        except STEP_ERRORS as e:
            raise TrainingError(f"evaluating {path} failed at test batch {i + 1}: {' '.join(str(e).split())}") from e
    out = totals.values()
    out.update({"time_s": time.perf_counter() - t0, "config": cfg["name"], "dataset": cfg["dataset"],
                "epoch": int(state["position"]["epoch"])})
    return out


def run(args: argparse.Namespace) -> int:
    r = evaluate_checkpoint(args.checkpoint, args.overrides, args.data_dir)
    print(f"{args.checkpoint}: config {r['config']} after {r['epoch']} epoch(s), {r['dataset']} test set "
          f"({r['count']} examples): loss {r['loss']:.4f}, top-1 {r['top1']:.2f}%, top-5 {r['top5']:.2f}% "
          f"({r['time_s']:.1f} s)")
    return 0
