"""The training loop: epochs of (forward, loss, estimator backward, optimizer step), evaluation,
metrics, checkpoints and resumption.

    trainer = Trainer(load_config("fmnist_cpu", ["epochs=1"]))
    summary = trainer.fit()

What is minimised is the trainer's `Objective`: by default `CrossEntropy` on the model's
logits with argmax predictions. A network that holds its output layer (no readout) trains
with `SquaredError`, which also hands the labels to the forward (`model(x, target=y)`) for
the rules that need the target:

    Trainer(cfg, objective=SquaredError()).fit()

Each epoch is saved (the last two checkpoints are kept) before it is evaluated, so a failing
evaluation never loses the trained epoch. Resuming (`Trainer.resume`) restores model,
optimizer, RNG states and the position in training (epoch and step; the loader's order is a
function of seed and epoch, so a run interrupted by Ctrl-C mid-epoch continues from the next
batch) and, on CPU, ends bit-identical to an uninterrupted run. The optimizer's settings and
the schedule come from the config given to the trainer: a changed `optim.lr`, `lr_min`,
`weight_decay`, `momentum`, `schedule` or `epochs` takes effect from the resumed step, the
schedule being rebuilt over the new length (`Schedule`); the settings that cannot change are
refused (`eqprop.training.config.check_resume`).

`check_out_dir` is the rule of `eqprop train` for output folders: a folder holding a run is
used only to resume it, or replaced when asked. `Trainer.fit` itself starts a new run by
replacing the run files of its folder.
"""
from __future__ import annotations

import math
import os
import random
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..analysis.account import StepAccountant
from ..analysis.fidelity import FidelityMonitor
from ..blocks import DivergenceError
from ..data import write_data_record
from ..devices import attach_device_writes
from ..metaplastic import MetaplasticAdam, metaplastic_groups
from ..optional import require
from . import checkpoint as ckpt_io
from . import distributed
from .config import ConfigError, augment_settings_set, check_resume, to_yaml
from .metrics import EpochTotals, MetricsLogger, plot_curves, read_metrics
from .models import DTYPES, build_model, model_inputs, relax_health, relax_summary
from .runinfo import RUN_INFO, record_session

__all__ = ["AUTOCAST", "OBJECTIVES", "RUN_FILES", "CrossEntropy", "Objective", "Schedule", "SquaredError", "Trainer",
           "TrainingError", "check_out_dir", "health_warnings", "make_optimizer", "make_scheduler", "progress_bar",
           "seed_everything"]

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT = "checkpoint.pt"
# the files that make a folder hold a run, and the other files a run writes there
DATA_RECORD = "data_files.json"  # the data files the run read (path, size, checksum of the head)
RUN_FILES = ("config.yaml", "metrics.jsonl", CHECKPOINT, ckpt_io.previous_path(CHECKPOINT).name, DATA_RECORD, RUN_INFO)
OUTPUT_FILES = ("curves.png",)
PROBE = "write-test"  # check_out_dir's temporary file
# failures of a step or an evaluation that are reported with where they happened
STEP_ERRORS = (ValueError, RuntimeError, IndexError, TypeError, ZeroDivisionError)


class TrainingError(RuntimeError):
    """Training or evaluation cannot go on (NaN loss, diverged relaxation, a failing step or
    evaluation); the message says where (epoch, step) and the last good checkpoint is kept."""


def _cause(e: BaseException) -> str:
    """An exception as one line: its message (type name when empty), whitespace collapsed,
    without a final full stop (the caller's sentence goes on)."""
    text = " ".join(str(e).split()).rstrip(".")
    return text or type(e).__name__


def _unwritable(out: Path, e: OSError) -> ConfigError:
    where = f" ({e.filename})" if e.filename else ""
    return ConfigError(f"out_dir {out} cannot be written: {e.strerror or _cause(e)}{where}")


def check_out_dir(out_dir: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> Path:
    """The rule for output folders: a folder that holds a run (config.yaml, metrics.jsonl or
    a checkpoint) is refused unless the run is resumed or `overwrite` is asked for; the folder
    must be writable. ConfigError otherwise, naming the folder and both flags."""
    out = Path(out_dir)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: --resume continues the run in "
                          f"{out}, --overwrite replaces it")
    held = [name for name in RUN_FILES if (out / name).exists()]
    if held and not (resume or overwrite):
        raise ConfigError(f"out_dir {out} already holds a run ({', '.join(held)}); continue it with --resume, or "
                          f"replace it with --overwrite (or choose another out_dir)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{PROBE}.", suffix=ckpt_io.TEMP_SUFFIX, dir=out)  # one per process
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise _unwritable(out, e) from None
    return out


class Objective:
    """What the trainer minimises and how it reads a model's output (batch, num_classes).

    Subclasses define `loss`; the others have defaults:
      loss(output, y)     the scalar minimised on a batch (y: integer labels (batch,); 16-bit
                          outputs arrive as float32)
      scores(output)      per-class scores, highest = most likely: top-1/top-5 metrics
      predict(output)     predicted labels: the argmax of the scores
      target_in_forward   call `model(x, target=y)`, for a model whose last block holds the
                          output layer and rules that need the target (cl, cpl, EP with a
                          cost on the output layer). The output (the free equilibrium) does
                          not depend on the target; evaluation passes it too, which the
                          rules ignore under no_grad
    """

    target_in_forward: bool = False

    def loss(self, output: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def scores(self, output: Tensor) -> Tensor:
        return output

    def predict(self, output: Tensor) -> Tensor:
        return self.scores(output).argmax(1)

    def __repr__(self) -> str:
        return type(self).__name__


class CrossEntropy(Objective):
    """Cross-entropy on logits (the default): a model with a readout."""

    def loss(self, output: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(output, y)


class SquaredError(Objective):
    """1/2 ||s_L - onehot(y)||^2 averaged over the batch, for a network holding its output
    layer s_L: the labels go to the forward, and the prediction is the most active unit."""

    target_in_forward = True

    def loss(self, output: Tensor, y: Tensor) -> Tensor:
        onehot = F.one_hot(y, output.shape[1]).to(output.dtype)
        return 0.5 * ((output - onehot) ** 2).sum(1).mean()


OBJECTIVES: dict[str, type[Objective]] = {"CrossEntropy": CrossEntropy, "SquaredError": SquaredError}


class _NoBar:
    """Stands in for a tqdm bar when progress bars are off (tqdm is an optional extra)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, iterable=None, **kwargs):
    """A tqdm bar (the `progress` extra) when enabled, else the iterable itself or a bar that
    does nothing."""
    if not enabled:
        return _NoBar() if iterable is None else iterable
    tqdm = require("tqdm", "progress", "progress bars").tqdm
    return tqdm(iterable, **kwargs)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(params, optim: dict) -> torch.optim.Optimizer:
    """The optimizer `optim.name` names over `params` (a model, or an iterable of parameters).

    adam / sgd: torch.optim.Adam / SGD. metaplastic: eqprop.metaplastic.MetaplasticAdam with
    strength `optim.m` on the latent weights of the model's binary weights (model.binary) and
    m = 0 (plain Adam) on every other parameter; it needs the model, to find those weights."""
    if optim["name"] == "metaplastic":
        if not isinstance(params, nn.Module):
            raise ConfigError("optim.name=metaplastic: make_optimizer needs the model (to find its binary weights), "
                              "got an iterable of parameters")
        try:
            groups = metaplastic_groups(params, optim["m"])
        except ValueError as e:
            raise ConfigError(f"optim.name=metaplastic needs binary weights (model.binary.weights: true): "
                              f"{e}") from None
        groups[0]["hidden"] = True  # the group whose meta follows optim.m (apply_optim_settings)
        return MetaplasticAdam(groups, lr=optim["lr"], weight_decay=optim["weight_decay"])
    if isinstance(params, nn.Module):
        params = params.parameters()
    if optim["name"] == "adam":
        return torch.optim.Adam(params, lr=optim["lr"], weight_decay=optim["weight_decay"])
    return torch.optim.SGD(params, lr=optim["lr"], momentum=optim["momentum"], nesterov=optim["nesterov"],
                           weight_decay=optim["weight_decay"])


def apply_optim_settings(optimizer: torch.optim.Optimizer, optim: dict) -> None:
    """Put the config's lr (as the schedule's start), weight_decay and, for SGD, momentum and
    nesterov, for MetaplasticAdam m (in the group of the latent weights), into the parameter
    groups (after loading a checkpoint's optimizer state)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = optim["lr"]
        group["weight_decay"] = optim["weight_decay"]
        if isinstance(optimizer, torch.optim.SGD):
            group["momentum"], group["nesterov"] = optim["momentum"], optim["nesterov"]
        if isinstance(optimizer, MetaplasticAdam) and group.get("hidden", False):
            group["meta"] = optim["m"]


class Schedule(torch.optim.lr_scheduler.LRScheduler):
    """The learning rate as a function of the position t (epochs or steps done): cosine from
    each group's initial lr to lr_min over `total` (lr_min after it), or constant.

    The value at t depends only on t and the settings, so a resumed run rebuilds the schedule
    for new settings and jumps to its position (`at`); a run extended from E to E' epochs
    goes on with the cosine over E' epochs from position E."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, total: int, lr_min: float):
        self.kind, self.total, self.lr_min = kind, max(int(total), 1), float(lr_min)
        super().__init__(optimizer)

    def value(self, base: float, t: int) -> float:
        if self.kind == "constant" or t <= 0:
            return base
        t = min(t, self.total)
        return self.lr_min + (base - self.lr_min) * (1 + math.cos(math.pi * t / self.total)) / 2

    def get_lr(self) -> list[float]:
        return [self.value(base, self.last_epoch) for base in self.base_lrs]

    def at(self, t: int) -> None:
        """Jump to position t: set every group's learning rate to the schedule's value there."""
        self.last_epoch = int(t)
        lrs = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = lrs


def make_scheduler(optimizer: torch.optim.Optimizer, optim: dict, epochs: int, steps_per_epoch: int) -> Schedule:
    """Cosine annealing from lr to lr_min over all epochs (stepped per epoch or per step), or
    a constant rate."""
    total = epochs if optim["schedule_unit"] == "epoch" else epochs * steps_per_epoch
    return Schedule(optimizer, optim["schedule"], total, optim["lr_min"])


class Trainer:
    """Builds data, model, optimizer and schedule from a config, and trains.

    `train_set`/`test_set` (eqprop.data.Dataset) replace loading `cfg['dataset']` (tests,
    studies that share one loaded dataset among runs).
    `on_step(trainer)` is called after every optimizer step (tests, instrumentation).
    A model with a `local_step(x)` method has it called with each training batch before the
    step's forward (parameters it trains itself, e.g. eqprop.target_prop's feedback maps).
    `objective` (an `Objective`) replaces the default `CrossEntropy`.
    """

    def __init__(self, cfg: dict, train_set=None, test_set=None, echo: Callable[[str], None] = print,
                 on_step: Callable[[Trainer], None] | None = None, objective: Objective | None = None,
                 command: str | None = None):
        if objective is not None and not isinstance(objective, Objective):
            raise TypeError(f"Trainer: objective must be an eqprop.training.trainer.Objective, got "
                            f"{type(objective).__name__}")
        self.objective = objective if objective is not None else CrossEntropy()
        self.cfg = cfg
        if cfg["threads"]:
            torch.set_num_threads(cfg["threads"])
        self.dist = distributed.setup(cfg["device"], timeout_s=cfg["dist_timeout_s"])
        self.device = self.dist.device
        if self.device.type == "cuda":  # process-wide switches of torch's CUDA backends
            torch.backends.cuda.matmul.allow_tf32 = cfg["tf32"]
            torch.backends.cudnn.allow_tf32 = cfg["tf32"]
            torch.backends.cudnn.benchmark = cfg["cudnn_benchmark"]
        self.echo = echo if self.dist.is_main else (lambda _msg: None)
        self.command = command  # recorded in run_info.json (None: the process's command line)
        self.on_step = on_step
        self.out_dir = Path(cfg["out_dir"] or Path("runs") / str(cfg["name"]))
        self.ckpt_path = self.out_dir / CHECKPOINT
        self.dtype = DTYPES[cfg.get("dtype", "float32")]
        seed_everything(cfg["seed"])

        from ..data import DeviceLoader, default_std_factor, load_dataset
        opts = cfg["dataset_options"]
        if train_set is None:
            train_set = load_dataset(cfg["dataset"], "train", cfg["data_dir"], **opts)
        if test_set is None:
            test_set = load_dataset(cfg["dataset"], "test", cfg["data_dir"], **opts)
        if cfg["channels_last"] and train_set.kind != "image":
            raise ConfigError(f"channels_last=true lays out 4-d image batches; dataset {train_set.name!r} holds "
                              f"{train_set.kind}s: set channels_last=false")
        self.model = build_model(cfg, model_inputs(train_set)).to(self.device, self.dtype)
        fmt = torch.channels_last if cfg["channels_last"] else None
        if fmt is not None:
            self.model = self.model.to(memory_format=fmt)
        std = cfg["std_factor"] if cfg["std_factor"] is not None else default_std_factor(train_set.name)
        common = dict(device=self.device, std_factor=std, rank=self.dist.rank, world_size=self.dist.world_size,
                      dtype=self.dtype, memory_format=fmt)
        try:
            self.train_loader = DeviceLoader(train_set, cfg["batch_size"], train=True, augment=cfg["augment"],
                                             seed=cfg["seed"], limit=cfg["limit_train"], pad=cfg["augment_pad"],
                                             padding_mode=cfg["augment_padding"], flip=cfg["augment_flip"], **common)
            self.test_loader = DeviceLoader(test_set, cfg["eval_batch_size"], train=False, augment=False,
                                            limit=cfg["limit_test"], **common)
        except ValueError as e:  # limits or batch sizes that do not fit the data
            raise ConfigError(f"data loader: {e} (config keys batch_size, eval_batch_size, limit_train, "
                              f"limit_test)") from None
        unused = augment_settings_set(cfg)
        if unused and not self.train_loader.augment:
            raise ConfigError(f"config key(s) {unused} set, but {train_set.name} is not augmented (augment is "
                              f"{cfg['augment']!r}; null augments CIFAR and ImageNet32 only): set augment=true or "
                              f"drop them")
        if len(self.train_loader) == 0:
            raise ConfigError(f"batch_size {cfg['batch_size']} is larger than the {self.train_loader.num_examples} "
                              f"training examples (the last partial batch is dropped)")
        if self.dist.enabled:  # dropout masks and other draws differ per rank; rank 0 keeps the seed
            seed_everything(distributed.rank_seed(cfg["seed"], self.dist))
        self.train_set, self.test_set = train_set, test_set
        if cfg["sync_batchnorm"] and self.dist.enabled:
            self.model = distributed.sync_batchnorm(self.model, self.device)
        self.net: nn.Module = distributed.wrap(self.model, self.dist)
        self.optimizer = make_optimizer(self.model, cfg["optim"])
        # blocks with a device model: every optimizer step is a device write (eqprop.devices)
        self.device_hooks = attach_device_writes(self.optimizer, self.model)
        self.accountant = StepAccountant(self.model, self.optimizer)  # the step account, logged per epoch
        self.monitor = self._fidelity_monitor()  # monitor_fidelity: the estimator against ID on a fixed batch
        self.metrics_logger: MetricsLogger | None = None  # the open log of `fit` (per-step TensorBoard points)
        self.scheduler = make_scheduler(self.optimizer, cfg["optim"], cfg["epochs"], len(self.train_loader))
        self.autocast = AUTOCAST.get(cfg["precision"])  # energy-based blocks switch it off themselves
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg["precision"] == "fp16" else None
        self.epoch, self.step = 0, 0          # position: epochs done, steps done in the current epoch
        self.partial: torch.Tensor | None = None  # metric sums of a partly done epoch
        self.pending: dict | None = None      # the record of a trained epoch not yet evaluated and logged
        self._stop = False
        self.resumed = False
        self.resumed_from: Path | None = None
        self._rotate = True  # the next save keeps the current checkpoint as the previous one

    # ---- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": ckpt_io.FORMAT,
            "config": self.cfg,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": ckpt_io.rng_state(),
            "devices": ckpt_io.device_rng_state(self.model),  # the analog devices' noise generators
            "position": {"epoch": self.epoch, "step": self.step},
            "partial": None if self.partial is None else self.partial.cpu(),
            "pending": self.pending,
            "objective": type(self.objective).__name__,  # what `eqprop eval` computes the loss with
        }

    def save(self) -> Path | None:
        """Write the checkpoint (main rank), keeping the previous one; refused if any
        parameter is not finite."""
        bad = [n for n, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise TrainingError(f"parameters {bad[:3]} hold NaN/inf at epoch {self.epoch + 1}; checkpoint not "
                                f"written, the last good one ({self.ckpt_path}) is kept")
        path = None
        if self.dist.is_main:
            path = ckpt_io.save_rotating(self.state_dict(), self.ckpt_path, rotate=self._rotate)
            self._rotate = True
        distributed.barrier(self.dist)
        return path

    def _position(self) -> int:
        """The schedule's position: epochs done, or steps done when it advances per step."""
        if self.cfg["optim"]["schedule_unit"] == "epoch":
            return self.epoch
        return self.epoch * len(self.train_loader) + self.step

    def resume(self, path: str | os.PathLike | None = None, state: dict | None = None) -> None:
        """Restore everything from a checkpoint: `state` (already loaded from `path`), or the
        file `path` (default: <out_dir>/checkpoint.pt, falling back to the previous checkpoint
        when it is damaged). Loaded on the CPU, then moved to the device.

        The config given to the trainer stands: check_resume refuses settings that cannot
        change; the optimizer's lr, weight_decay, momentum and the schedule are taken from it
        and apply from the resumed step."""
        if state is None:
            state, path = ckpt_io.load_latest(path or self.ckpt_path, echo=self.echo)
        path = Path(path or self.ckpt_path)
        changes = check_resume(state["config"], self.cfg, path)
        ckpt_io.load_model_state(self.model, state["model"], path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            raise ckpt_io.CheckpointError(f"checkpoint {path}: the optimizer state does not fit the "
                                          f"{self.cfg['optim']['name']} optimizer of the model ({_cause(e)})") from None
        if self.scaler is not None and state.get("scaler"):
            try:
                self.scaler.load_state_dict(state["scaler"])
            except (ValueError, KeyError, RuntimeError, TypeError) as e:
                raise ckpt_io.CheckpointError(f"checkpoint {path}: the gradient scaler state cannot be restored "
                                              f"({_cause(e)})") from None
        ckpt_io.set_rng_state(state["rng"], path)
        for note in ckpt_io.restore_device_state(self.model, state, path):
            self.echo(note)
        self.epoch, self.step = int(state["position"]["epoch"]), int(state["position"]["step"])
        if self.step > len(self.train_loader):
            raise ckpt_io.CheckpointError(f"checkpoint {path}: position step {self.step} is beyond the "
                                          f"{len(self.train_loader)} steps of an epoch; the file was edited")
        partial = state.get("partial")
        if partial is not None and tuple(partial.shape) != (4,):
            raise ckpt_io.CheckpointError(f"checkpoint {path}: 'partial' has shape {tuple(partial.shape)}, "
                                          f"expected (4,); the file was edited or is damaged")
        self.partial = partial
        pending = state.get("pending")
        self.pending = dict(pending) if isinstance(pending, dict) and "epoch" in pending else None
        if self.pending is not None and self._pending_logged():
            self.pending = None  # the epoch was evaluated and logged after the checkpoint was written
        # the optimizer's settings and the schedule of the config, at the resumed position
        apply_optim_settings(self.optimizer, self.cfg["optim"])
        self.scheduler = make_scheduler(self.optimizer, self.cfg["optim"], self.cfg["epochs"], len(self.train_loader))
        self.scheduler.at(self._position())
        self.resumed = True
        self.resumed_from = path
        # resumed from the previous checkpoint because the newer one is damaged: the next save
        # replaces the damaged one and keeps the previous one
        self._rotate = path.resolve() != ckpt_io.previous_path(self.ckpt_path).resolve()
        shown = [c for c in changes if c[0] not in ("out_dir", "data_dir")]
        if shown:
            self.echo("resuming with changed settings: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in shown))
        if self.epoch < self.cfg["epochs"] or self.pending is not None:
            where = f"epoch {self.epoch + 1}, step {self.step}" if self.step else f"epoch {self.epoch + 1}"
            if self.pending is not None:
                where = f"the evaluation of epoch {self.pending.get('epoch', self.epoch)}"
            self.echo(f"resumed from {path}: continuing at {where} "
                      f"(learning rate {self.optimizer.param_groups[0]['lr']:.3g})")

    # ---- one step, one epoch, evaluation -------------------------------------------------
    def _forward_loss(self, x: Tensor, y: Tensor, net: nn.Module) -> tuple[Tensor, Tensor]:
        """(objective loss, output in at least float32); the labels go to the forward when the
        objective asks for it."""
        extra = {"target": y} if self.objective.target_in_forward else {}
        if self.autocast is not None:
            with torch.autocast(self.device.type, dtype=self.autocast):
                output = net(x, **extra)
        else:
            output = net(x, **extra)
        if output.dtype in (torch.float16, torch.bfloat16):
            output = output.float()
        return self.objective.loss(output, y), output

    def _kept(self) -> str:
        """What a failure leaves: the last checkpoint written (by this run or the one resumed)."""
        if self.ckpt_path.exists():
            return f"The last good checkpoint ({self.ckpt_path}) is kept"
        return f"No checkpoint was written yet (the first is written at the end of epoch 1, in {self.ckpt_path})"

    def train_step(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Forward, loss, backward (the estimators'), optimizer step; (loss, output) detached.
        A failure is a TrainingError that says where (epoch and step) and what."""
        where = f"epoch {self.epoch + 1}, step {self.step + 1}"
        kept = self._kept()
        try:
            try:
                if callable(getattr(self.model, "local_step", None)):
                    self.model.local_step(x)  # a model's own per-step update (e.g. DTP's feedback weights)
                loss, logits = self._forward_loss(x, y, self.net)
                local = None if math.isfinite(loss.item()) else TrainingError(
                    f"loss is NaN/inf at {where}; stopping. {kept}; lower optim.lr or check the data")
            except (DivergenceError, TrainingError, *STEP_ERRORS) as e:
                local = e
            # every rank learns of a failure on any rank before the backward's collectives
            failed = distributed.gather_errors(local, self.dist)
            if local is not None:
                raise local
            if failed:
                rank, message = failed[0]
                raise TrainingError(f"rank {rank} failed at {where}: {message}. {kept}")
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                ckpt_io.kill_point("step")
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                ckpt_io.kill_point("step")
                self.optimizer.step()
        except DivergenceError as e:
            raise TrainingError(f"relaxation diverged at {where}: {_cause(e)}. {kept}") from e
        except TrainingError:
            raise
        except STEP_ERRORS as e:
            raise TrainingError(f"training failed at {where}: {_cause(e)}. {kept}") from e
        return loss.detach(), logits.detach()

    def train_epoch(self) -> dict | None:
        """Train from the current position to the end of the epoch; None if stopped by Ctrl-C."""
        self.net.train()
        loader = self.train_loader
        loader.set_epoch(self.epoch)
        totals = EpochTotals(self.device)
        if self.partial is not None and self.dist.is_main:
            # the saved sums are over all ranks (reduced when the epoch stopped): rank 0
            # carries them, the others start from zero, so the epoch's reduction counts them once
            totals.sums.copy_(self.partial.to(totals.sums))
        batches = iter(loader)
        for _ in range(self.step):  # batches done before an interruption
            next(batches)
        per_step = self.cfg["optim"]["schedule_unit"] == "step"
        show = bool(self.cfg["progress"] and self.dist.is_main)
        bar = progress_bar(show, total=len(loader), initial=self.step, dynamic_ncols=True, leave=True,
                           desc=f"epoch {self.epoch + 1}/{self.cfg['epochs']}")
        every = 1 if self.device.type == "cpu" else 10
        data_time, relax_sums, health_sums, relax_n, t0 = 0.0, {}, {}, 0, time.perf_counter()
        trace: list[dict] = []  # per-step points: free-phase health (log_every) and fidelity (monitor_fidelity)
        run_loss = run_correct = run_n = 0.0
        try:
            while True:
                if distributed.any_flag(self._stop, self.dist):
                    self.partial = distributed.all_reduce_sum(totals.sums.clone(), self.dist)
                    return None
                t = time.perf_counter()
                batch = next(batches, None)
                data_time += time.perf_counter() - t
                if batch is None:
                    break
                x, y = batch
                loss, logits = self.train_step(x, y)
                totals.add(loss, self.objective.scores(logits), y)
                self.step += 1
                if per_step:
                    self.scheduler.step()
                for phase, iters in relax_summary(self.model).items():
                    relax_sums[phase] = relax_sums.get(phase, 0.0) + iters
                health = relax_health(self.model)
                for key, value in health.items():
                    health_sums[key] = health_sums.get(key, 0.0) + value
                relax_n += 1
                self.accountant.after_step()
                self._monitor_step(health, trace)
                if self.on_step is not None:
                    self.on_step(self)
                bar.update(1)
                if self.step % every == 0 and show:
                    n = y.shape[0]
                    run_loss += loss.item() * n
                    run_correct += (self.objective.predict(logits) == y).sum().item()
                    run_n += n
                    post = {"loss": f"{run_loss / run_n:.3f}", "acc": f"{100 * run_correct / run_n:.1f}"}
                    post.update({f"it_{k}": f"{v / relax_n:.1f}" for k, v in relax_sums.items()})
                    bar.set_postfix(post, refresh=False)
        finally:
            bar.close()
        elapsed = time.perf_counter() - t0
        sums = distributed.all_reduce_sum(totals.sums.clone(), self.dist)
        totals.sums = sums
        out = {f"train_{k}": v for k, v in totals.values().items() if k != "count"}
        out.update({f"iters_{k}": v / max(relax_n, 1) for k, v in relax_sums.items()})
        # equilibrium health per block and phase: mean iterations and last relative change, and the
        # fraction of steps whose phase met its tolerance (this rank's steps since the epoch (re)started)
        out.update({k: v / max(relax_n, 1) for k, v in health_sums.items()})
        out.update(trace_summary(trace))
        out.update({"train_time_s": elapsed, "data_share": data_time / max(elapsed, 1e-12)})
        out.update(self.accountant.epoch_totals())  # account_*: the mean step's MACs, bytes, conversions, energy
        self.partial = None
        return out

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Test loss, top-1 and top-5 over the whole test set (all ranks' shards)."""
        self.model.eval()
        totals = EpochTotals(self.device)
        t0 = time.perf_counter()
        show = bool(self.cfg["progress"] and self.dist.is_main)
        for i, (x, y) in enumerate(progress_bar(show, self.test_loader, desc="  test", leave=False,
                                                dynamic_ncols=True)):
            loss, output = self._forward_loss(x, y, self.model)
            totals.add(loss, self.objective.scores(output), y)
            if i == 0:
                ckpt_io.kill_point("eval")
        totals.sums = distributed.all_reduce_sum(totals.sums, self.dist)
        out = {f"test_{k}": v for k, v in totals.values().items() if k != "count"}
        out["eval_time_s"] = time.perf_counter() - t0
        return out

    # ---- monitoring: per-step equilibrium health and gradient fidelity ----------------------
    def _fidelity_monitor(self) -> FidelityMonitor | None:
        """The monitor of `monitor_fidelity` on the first training batch of epoch 0 (the
        loader draws its order from its own generator: no RNG stream moves), or None."""
        if not self.cfg.get("monitor_fidelity"):
            return None
        x, y = next(iter(self.train_loader))
        try:
            return FidelityMonitor(self.model, x, y, self.objective.loss, self.objective.target_in_forward)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def _monitor_step(self, health: dict[str, float], trace: list[dict]) -> None:
        """After a step: every `log_every` steps the free phase's health per block, every
        `monitor_fidelity` steps the estimator-vs-ID cosines (measured without side effects on
        training), appended to the epoch's trace and written to TensorBoard at the global step."""
        log_every, every = self.cfg.get("log_every", 0), self.cfg.get("monitor_fidelity", 0)
        n = len(self.train_loader)
        step = self.epoch * n + self.step
        point: dict = {}
        if log_every and step % log_every == 0:
            point.update({k: v for k, v in health.items() if "_free_" in k})
        if every and step % every == 0 and self.monitor is not None:
            try:
                point.update(self.monitor.measure())
            except (DivergenceError, *STEP_ERRORS) as e:
                raise TrainingError(f"monitor_fidelity failed at epoch {self.epoch + 1}, step {self.step}: "
                                    f"{_cause(e)}. {self._kept()}") from e
        if point:
            point = {"step": step, "epoch_progress": self.epoch + self.step / n, **point}
            trace.append(point)
            if self.metrics_logger is not None:
                self.metrics_logger.log_step(point, step)

    # ---- the whole run -------------------------------------------------------------------
    def request_stop(self) -> None:
        """Finish the current step, write a checkpoint and return from `fit` (what Ctrl-C does;
        e.g. from an `on_step` callback). Under DDP every rank stops at the same step."""
        self._stop = True

    def _on_sigint(self, signum, frame) -> None:
        if self._stop:
            raise KeyboardInterrupt
        self._stop = True
        self.echo("\ninterrupted: finishing this step, then writing a checkpoint "
                  "(press Ctrl-C again to quit without saving)")

    def describe(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        c = self.cfg
        return (f"config {c['name']}: {c['dataset']} ({self.train_loader.num_examples} train / "
                f"{self.test_loader.num_examples} test), model {c['model']['kind']} with {n:,} parameters, "
                f"algorithm {c['algorithm']}{self._objective_note()}, "
                f"{c['epochs']} epochs of {len(self.train_loader)} steps "
                f"(batch {c['batch_size']}), device {self.device} x{self.dist.world_size}, "
                f"threads {torch.get_num_threads()}, out_dir {self.out_dir}")

    def _objective_note(self) -> str:
        return "" if type(self.objective) is CrossEntropy else f" ({self.objective!r})"

    def _prepare_out_dir(self) -> MetricsLogger:
        """Main rank: remove stale temporary files; a new run replaces the run files of the
        folder (checkpoints first, so that no old checkpoint sits beside the new config); the
        config is written and the metrics log opened (a resumed run keeps its records up to
        the checkpoint's epoch)."""
        out = self.out_dir
        try:
            out.mkdir(parents=True, exist_ok=True)
            stale = ckpt_io.remove_stale_temporaries(out, (*RUN_FILES, PROBE))
        except OSError as e:
            raise _unwritable(out, e) from None
        if stale:
            self.echo(f"removed {len(stale)} temporary file(s) left in {out} by an interrupted write: "
                      f"{', '.join(p.name for p in stale)}")
        try:
            if not self.resumed:
                for name in (CHECKPOINT, ckpt_io.previous_path(CHECKPOINT).name, "metrics.jsonl", *OUTPUT_FILES):
                    (out / name).unlink(missing_ok=True)
                for events in (out / "tb").glob("events.out.tfevents.*"):
                    events.unlink(missing_ok=True)
            ckpt_io.write_text_atomic(out / "config.yaml", to_yaml(self.cfg))
            write_data_record(out / DATA_RECORD, self.train_set, self.test_set)
            record_session(out, fresh=not self.resumed, start_epoch=self.epoch, device=self.device,
                           world_size=self.dist.world_size, command=self.command)
            return MetricsLogger(out, self.cfg["tensorboard"], fresh=not self.resumed, keep_through=self.epoch)
        except OSError as e:
            raise _unwritable(out, e) from None
        except ValueError as e:  # a damaged metrics.jsonl
            raise TrainingError(f"cannot resume the metrics log: {_cause(e)}") from None

    def _pending_logged(self) -> bool:
        """Whether metrics.jsonl already holds the record of the pending epoch (the main rank
        reads it; every rank gets its answer)."""
        logged = False
        if self.dist.is_main:
            try:
                logged = int(self.pending["epoch"]) in {r.get("epoch") for r in read_metrics(self.out_dir /
                                                                                           "metrics.jsonl")}
            except ValueError as e:
                raise TrainingError(f"cannot resume the metrics log: {_cause(e)}") from None
        return distributed.any_flag(logged, self.dist)

    def _finish_epoch(self, logger: MetricsLogger | None) -> dict:
        """Evaluate the trained epoch (already saved, as `pending`) when due, log and print
        its record. An evaluation failure is a TrainingError with its cause; the checkpoint of
        the epoch stays, and a resumed run evaluates it first."""
        record = self.pending
        assert record is not None
        epoch = int(record["epoch"])
        if epoch % self.cfg["eval_every"] == 0 or epoch == self.cfg["epochs"]:
            try:
                record.update(self.evaluate())
            except (DivergenceError, *STEP_ERRORS) as e:
                raise TrainingError(f"evaluation after epoch {epoch} failed: {_cause(e)}. The trained epoch is saved "
                                    f"in {self.ckpt_path}; fix the cause and continue with --resume (the evaluation "
                                    f"runs first)") from e
            record["epoch_time_s"] = record.get("epoch_time_s", 0.0) + record["eval_time_s"]
        if logger is not None:
            logger.log(record)
        self.echo(_format_record(record, self.cfg["epochs"]))
        for line in health_warnings(record, self.cfg):
            self.echo(line)
        self.pending = None
        return record

    def fit(self) -> dict:
        """Train to `epochs`; returns a summary (status 'completed', 'interrupted', or
        'already_complete' for a resumed run that had nothing left to train)."""
        cfg = self.cfg
        summary = {"epoch": self.epoch, "step": self.step, "last": {}, "is_main": self.dist.is_main,
                   "checkpoint": str(self.ckpt_path), "curves": None}
        if self.resumed and self.epoch >= cfg["epochs"] and self.pending is None:
            done = self.epoch
            self.echo(f"the run in {self.out_dir} is complete: {done} epoch(s) trained, epochs={cfg['epochs']}; "
                      f"nothing to do. To train longer, resume with more epochs (e.g. epochs={done + max(done, 1)} "
                      f"--resume)")
            return {**summary, "status": "already_complete"}
        self.echo(self.describe())
        logger = self._prepare_out_dir() if self.dist.is_main else None
        self.metrics_logger = logger
        handler_set = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._on_sigint) if handler_set else None
        last: dict = {}
        status = "completed"
        try:
            if self.pending is not None:  # a saved epoch whose evaluation or log did not happen
                last = self._finish_epoch(logger)
            while self.epoch < cfg["epochs"]:
                t0, c0 = time.perf_counter(), time.process_time()
                lr = self.optimizer.param_groups[0]["lr"]  # at the start of the epoch
                train = self.train_epoch()
                if train is None:
                    status = "interrupted"
                    break
                record = {"epoch": self.epoch + 1, "lr": lr, **train}
                record.update({"epoch_time_s": time.perf_counter() - t0, "cpu_time_s": time.process_time() - c0,
                               "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None})
                self.epoch, self.step = self.epoch + 1, 0
                if cfg["optim"]["schedule_unit"] == "epoch":
                    self.scheduler.step()
                self.pending = record
                self.save()  # before the evaluation: a failing evaluation keeps the trained epoch
                last = self._finish_epoch(logger)
                if self._stop:
                    status = "interrupted"
                    break
            if status == "interrupted" and self.epoch < cfg["epochs"]:
                self.save()
                self.echo(f"checkpoint written to {self.ckpt_path} at epoch {self.epoch + 1}, step {self.step}; "
                          f"continue with --resume")
        finally:
            if handler_set:
                signal.signal(signal.SIGINT, previous)
            if logger is not None:
                logger.close()
            self.metrics_logger = None
        png = self._plot() if self.dist.is_main else None
        return {**summary, "status": status, "epoch": self.epoch, "step": self.step, "last": last,
                "curves": None if png is None else str(png)}

    def _plot(self) -> Path | None:
        """The learning-curve PNG; without matplotlib (the `plot` extra) a note instead."""
        try:
            png = plot_curves(self.out_dir / "metrics.jsonl", self.out_dir / "curves.png", self.cfg["name"])
        except ImportError as e:
            self.echo(f"note: no learning-curve plot: {e}")
            return None
        if png is not None:
            self.echo(f"learning curves: {png}")
        return png

    def close(self) -> None:
        """Leave the process group (DDP's wrapper is released first: it holds the group)."""
        self.net = self.model
        distributed.teardown(self.dist)


def trace_summary(trace: list[dict]) -> dict:
    """What an epoch record holds of its per-step points: the points themselves ('trace')
    and the last measured fidelity cosines (empty when nothing was traced)."""
    if not trace:
        return {}
    out: dict = {"trace": trace}
    for key in ("fidelity_flat_cos", "fidelity_worst_tensor_cos"):
        values = [p[key] for p in trace if key in p]
        if values:
            out[key] = values[-1]
    return out


FREE_CONVERGED_WARN = 0.95  # an epoch's share of free phases at tol below which the summary warns


def health_warnings(record: dict, cfg: dict) -> list[str]:
    """A warning per block whose free phases met their tolerance in fewer than
    FREE_CONVERGED_WARN of an epoch's steps: the rest stopped at T1, and EP's and ID's
    gradients assume the free equilibrium (free phases cut by T1 preceded the training
    collapses of docs/gradients.md and docs/performance.md). Nudged phases
    are not checked: stopping them at T2 is a common, deliberate setting."""
    out = []
    t1 = cfg.get("model", {}).get("T1")
    for key, value in record.items():
        if not (key.startswith("eq_") and key.endswith("_free_converged")) or value >= FREE_CONVERGED_WARN:
            continue
        block = key[3:-len("_free_converged")]
        out.append(f"warning: {block}'s free phases met their tolerance in {100 * value:.1f}% of this epoch's "
                   f"steps; the others stopped at the cap model.T1{'' if t1 is None else '=' + str(t1)}. Gradients "
                   f"from cut free phases can derail training: raise model.T1 or lower optim.lr "
                   f"(eq_{block}_free_iters in metrics.jsonl shows the trend)")
    return out


def _format_record(r: dict, epochs: int) -> str:
    parts = [f"epoch {r['epoch']}/{epochs}", f"train loss {r['train_loss']:.4f} top-1 {r['train_top1']:.2f}%"]
    if "test_top1" in r:
        parts.append(f"test loss {r['test_loss']:.4f} top-1 {r['test_top1']:.2f}% top-5 {r['test_top5']:.2f}%")
    iters = ", ".join(f"{k[6:]} {v:.1f}" for k, v in r.items() if k.startswith("iters_"))
    if iters:
        parts.append(f"iterations {iters}")
    parts.append(f"{r['epoch_time_s']:.0f} s (data {100 * r['data_share']:.1f}% of training)")
    return " | ".join(parts)
