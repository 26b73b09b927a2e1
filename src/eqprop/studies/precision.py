"""`eqprop study precision`: 16-bit relaxation against float32 on a study's network.

For one rule, the cosine of the gradient with 16-bit relaxation (`relax_dtype`) with the
float32 one at the initial weights, for each handling of the second phases (the estimator's
`precision`: deviation | block), and the time of a training step (the trainer's
`train_step`: forward, loss, backward, Adam step), measured round-robin so that all settings
share the machine's load. Every setting is a `Trainer` of the same config and seed, so all
start from the same weights and see the same first batch.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import set_estimator
from ..training.trainer import SquaredError, Trainer
from .algorithms import check_rules, rule_settings, run_config

__all__ = ["gradient", "precision_study", "precision_trainers", "time_steps"]


def precision_trainers(cfg: dict, rule: str, dtypes: Sequence[str], data: tuple, seed: int,
                       out: Path) -> dict[str, Trainer]:
    """One trainer per relaxation dtype ('float32' and each of `dtypes`) with the same weights."""
    trainers = {}
    for name in ["float32", *dtypes]:
        run = run_config(cfg, rule, seed, out, data[0].x.shape[1])
        run["relax_dtype"] = None if name == "float32" else name
        run["out_dir"] = f"{run['out_dir']}-{name}"
        trainers[name] = Trainer(run, *data, echo=lambda _m: None, objective=SquaredError())
    return trainers


def gradient(trainer: Trainer, x: Tensor, y: Tensor) -> Tensor:
    """All parameter gradients of the objective on (x, y), flattened (float64)."""
    model, objective = trainer.model, trainer.objective
    model.zero_grad(set_to_none=True)
    objective.loss(model(x, target=y), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()


def time_steps(trainers: dict[str, Trainer], x: Tensor, y: Tensor, steps: int) -> dict[str, float]:
    """Median seconds of a training step per trainer; the first round warms up, uncounted."""
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for t in trainers.values():
        t.net.train()
    for rep in range(steps + 1):
        for name, t in trainers.items():
            t0 = time.perf_counter()
            t.train_step(x, y)
            if rep:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def _cosines(trainers: dict[str, Trainer], rule: str, settings: dict, modes: list, x: Tensor,
             y: Tensor, log: Callable[[str], None]) -> dict[tuple, float]:
    ref = gradient(trainers["float32"], x, y)
    out = {}
    for name, t in list(trainers.items())[1:]:
        for mode in modes:
            set_estimator(t.model, rule, **({**settings, "precision": mode} if mode else settings))
            out[name, mode] = F.cosine_similarity(ref, gradient(t, x, y), 0).item()
            log(f"{name} second phases {mode or '-'}: cosine with float32 {out[name, mode]:.5f}")
        set_estimator(t.model, rule, **settings)
        t.model.zero_grad(set_to_none=True)
    trainers["float32"].model.zero_grad(set_to_none=True)
    return out


def precision_study(cfg: dict, rule: str, dtypes: Sequence[str], data: tuple, steps: int, out: Path, seed: int = 0,
                    log: Callable[[str], None] = print) -> str:
    """The markdown table: per dtype and second-phase handling, the gradient's cosine with
    float32 and the time of a training step (timed with the config's own handling)."""
    (rule,) = check_rules(cfg, [rule])
    settings = rule_settings(cfg, rule)
    trainers = precision_trainers(cfg, rule, dtypes, data, seed, out)
    x, y = next(iter(trainers["float32"].train_loader))
    modes = ["deviation", "block"] if "precision" in settings else [None]
    cosines = _cosines(trainers, rule, settings, modes, x, y, log)
    seconds = time_steps(trainers, x, y, steps)
    for t in trainers.values():
        t.close()
    t32 = seconds["float32"]
    lines = ["| relaxation | second phases | cosine with float32 | time / step (s) | speed-up |",
             "|---|---|---|---|---|", f"| float32 | - | 1 | {t32:.2f} | 1.00 |"]
    for name in dtypes:
        for mode in modes:
            timed = mode in (None, settings.get("precision"))
            lines.append(f"| {name} | {mode or '-'} | {cosines[name, mode]:.4f} | "
                         f"{f'{seconds[name]:.2f}' if timed else '-'} | "
                         f"{f'{t32 / seconds[name]:.2f}' if timed else '-'} |")
    return "\n".join(lines) + "\n"

