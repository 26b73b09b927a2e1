"""An account of one training step: what runs where, and what it costs.

For every module of a model, per training step (forward, loss, the estimators' backward,
optimizer step):

  MACs         multiply-accumulates of matrix products and convolutions (elementwise work:
               activations, pooling, batch-norm, biases, is not counted as MACs)
  memory       bytes read and written, under this model of the traffic: a digital module
               reads its parameters and its input and writes its output in the forward;
               its backward reads the output's gradient, the input (for the weight
               gradient) and the parameters (for the input gradient) and writes the
               gradients it computes. An energy-based block is an analog circuit: its
               weights and states stay in the circuit; the digital side reads the input
               current once per phase (for the DACs) and writes every layer's state once
               per phase (from the ADCs). The optimizer reads each parameter, its gradient
               and its state, and writes the parameter and the state.
  iterations   per energy-based block, the relaxation iterations of each phase (from the
               step's `RelaxRecord`, i.e. `model.relax_stats()`); MACs = iterations x the
               MACs of one sweep (each coupling's W and W^T once per sample), plus the
               parameter update of the contrast rules (dPhi/dtheta at two states: each
               coupling applied and its weight gradient taken, at both states)
  conversions  DAC conversions (the input current, once per phase, and the nudging or
               clamping current on the output layer of a second phase) and ADC
               conversions (every layer's state at the end of each phase)
  writes       conductance writes: every parameter of a block written once per step

The work is split into digital (feedforward parts, readout, optimizer) and analog (the
energy-based blocks) totals, and an energy estimate is made from per-operation costs
(`DEFAULT_COSTS`, overridable; docs/hardware.md says where each default comes from and
which are assumptions).

    acct = account_config(load_config("fmnist_cpu"))        # one real step on random inputs
    print(format_account(acct))
    eqprop account fmnist_cpu                                # the same from the shell

`StepAccountant` keeps the account during training (the Trainer logs its totals per epoch).
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..blocks import EnergyBlock
from ..estimators import BPTT, ContrastEstimator
from ..rules import TBP

__all__ = ["DEFAULT_COSTS", "OPTIMIZER_OPS", "Unit", "ModuleAccount", "Account", "units", "ShapeRecorder",
           "digital_macs", "sweep_macs", "account_step", "account_config", "format_account", "StepAccountant",
           "add_arguments", "run"]

# Energy per operation in picojoules. Digital entries: Horowitz, "Computing's energy problem
# (and what we can do about it)", ISSCC 2014 (45 nm). Analog entries: assumptions.
DEFAULT_COSTS: dict[str, float] = {
    "digital_mac_pj": 4.6,        # 32-bit float multiply (3.7 pJ) + add (0.9 pJ)
    "memory_pj_per_byte": 12.5,   # 100 pJ per 64-bit access of a 1 MB on-chip SRAM
    "analog_mac_pj": 0.05,        # assumption: one multiply-accumulate in a crossbar
    "adc_pj_per_step": 0.01,      # assumption: 10 fJ per conversion step, x 2**bits per conversion
    "dac_pj_per_step": 0.01,      # assumption: as the ADC
    "write_pj": 10.0,             # assumption: one conductance write (programming pulse)
    "converter_bits": 8,          # bits assumed for converters a block's device does not set
}

# optimizer work per parameter: (multiply-accumulates, tensors read, tensors written)
OPTIMIZER_OPS = {"adam": (5, 4, 3), "sgd": (2, 3, 2), "sgd-no-momentum": (1, 2, 1)}

VIEWS = (nn.Flatten, nn.Unflatten, nn.Identity)  # no data moved


@dataclass
class Unit:
    """A module as the account sees it: an energy-based block or a digital leaf module."""

    name: str
    module: nn.Module
    is_block: bool


def units(model: nn.Module) -> list[Unit]:
    """Energy-based blocks (as wholes) and the leaf modules outside them, in order."""
    out: list[Unit] = []

    def walk(m: nn.Module, prefix: str) -> None:
        if isinstance(m, EnergyBlock):
            out.append(Unit(f"{prefix} ({m.block_name})" if prefix else m.block_name, m, True))
            return
        children = list(m.named_children())
        if not children:
            out.append(Unit(prefix or type(m).__name__, m, False))
            return
        for n, c in children:
            walk(c, f"{prefix}.{n}" if prefix else n)

    walk(model, "")
    return out


@dataclass
class Seen:
    """What one forward of a unit showed: per-sample sizes and whether the input needed grad."""

    batch: int
    in_shape: tuple[int, ...]   # without batch
    out_numel: int              # per sample
    input_grad: bool
    itemsize: int
    calls: int = 1              # forwards in the recorded step (a module applied at every time step)


class ShapeRecorder:
    """Records the first forward of every unit of `model` (inputs, outputs) with forward hooks,
    counting its calls, under grad mode only (forwards under no_grad are evaluations); a
    context manager that removes its hooks on exit."""

    def __init__(self, model: nn.Module):
        self.units = units(model)
        self.seen: dict[str, Seen] = {}
        self.handles = [u.module.register_forward_hook(self._hook(u.name)) for u in self.units]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if not torch.is_grad_enabled():
                return  # an evaluation (e.g. of a resumed run's pending epoch), not a training step
            if name in self.seen:
                self.seen[name].calls += 1
                return
            if not args or not isinstance(args[0], Tensor):
                return
            x = args[0]
            out = output if isinstance(output, Tensor) else x
            b = x.shape[0] if x.dim() else 1
            self.seen[name] = Seen(b, tuple(x.shape[1:]), out.numel() // max(b, 1), bool(x.requires_grad),
                                   x.element_size())
        return hook

    @property
    def complete(self) -> bool:
        return all(u.name in self.seen for u in self.units)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> ShapeRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def digital_macs(module: nn.Module, in_shape: tuple[int, ...], out_numel: int) -> int:
    """MACs of one forward of a digital module on one sample (linear maps and convolutions)."""
    if isinstance(module, nn.Linear):
        return (math.prod(in_shape) // module.in_features) * module.in_features * module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        k = math.prod(module.kernel_size)
        if module.transposed:
            return math.prod(in_shape) * (module.out_channels // module.groups) * k
        return out_numel * (module.in_channels // module.groups) * k
    return 0


def sweep_macs(block: EnergyBlock, in_shape: tuple[int, ...]) -> int:
    """MACs of one sweep of a Hopfield block on one sample: each coupling's W and W^T once."""
    couplings = getattr(block, "couplings", None)
    if couplings is None:
        return 0
    shapes = block.state_shapes(tuple(in_shape))
    return 2 * sum(c.macs(s) for c, s in zip(couplings, shapes))


@dataclass
class ModuleAccount:
    """One row of the account: totals of one module over one training step."""

    name: str
    kind: str                 # module type
    role: str                 # feedforward | readout | energy block | optimizer
    domain: str               # digital | analog
    macs: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    iterations: dict[str, int] = field(default_factory=dict)
    sweep_macs: int = 0       # per sweep, whole batch
    update_macs: int = 0
    dac: int = 0
    adc: int = 0
    converter_bits: int = 0
    writes: int = 0
    energy_pj: float = 0.0


@dataclass
class Account:
    """The account of one training step: rows, totals per domain, settings."""

    rows: list[ModuleAccount]
    batch: int
    costs: dict[str, float]
    optimizer: str
    notes: list[str] = field(default_factory=list)

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for dom in ("digital", "analog"):
            rs = [r for r in self.rows if r.domain == dom]
            out[f"{dom}_macs"] = sum(r.macs for r in rs)
            out[f"{dom}_bytes"] = sum(r.bytes_read + r.bytes_written for r in rs)
            out[f"{dom}_energy_uj"] = sum(r.energy_pj for r in rs) * 1e-6
        out["relax_iterations"] = sum(sum(r.iterations.values()) for r in self.rows)
        out["dac_conversions"] = sum(r.dac for r in self.rows)
        out["adc_conversions"] = sum(r.adc for r in self.rows)
        out["conductance_writes"] = sum(r.writes for r in self.rows)
        out["energy_uj"] = out["digital_energy_uj"] + out["analog_energy_uj"]
        return out

    def as_dict(self) -> dict:
        return {"batch": self.batch, "optimizer": self.optimizer, "costs": self.costs, "notes": self.notes,
                "rows": [asdict(r) for r in self.rows], "totals": self.totals()}


def _param_bytes(m: nn.Module, recurse: bool = True) -> tuple[int, int]:
    """(bytes of the parameters, bytes of those that require grad)."""
    ps = list(m.parameters(recurse=recurse))
    return (sum(p.numel() * p.element_size() for p in ps),
            sum(p.numel() * p.element_size() for p in ps if p.requires_grad))


def _digital_row(u: Unit, seen: Seen, batch: int, role: str, costs: dict) -> ModuleAccount:
    m = u.module
    row = ModuleAccount(u.name, type(m).__name__, role, "digital")
    if isinstance(m, VIEWS):
        return row
    fwd = digital_macs(m, seen.in_shape, seen.out_numel) * batch
    p_all, p_grad = _param_bytes(m)
    w = getattr(m, "weight", None)
    weight_grad = isinstance(w, Tensor) and w.requires_grad
    in_b = math.prod(seen.in_shape) * batch * seen.itemsize
    out_b = seen.out_numel * batch * seen.itemsize
    row.macs = fwd + (fwd if weight_grad else 0) + (fwd if seen.input_grad else 0)
    row.bytes_read = p_all + in_b
    row.bytes_written = out_b
    if seen.input_grad or p_grad:  # the backward runs through it
        row.bytes_read += out_b + (in_b if p_grad or not fwd else 0) + (p_all if seen.input_grad and fwd else 0)
        row.bytes_written += (in_b if seen.input_grad else 0) + p_grad
    if seen.calls > 1:
        row.macs, row.bytes_read, row.bytes_written = (v * seen.calls for v in (row.macs, row.bytes_read,
                                                                               row.bytes_written))
    row.energy_pj = costs["digital_mac_pj"] * row.macs + costs["memory_pj_per_byte"] * (row.bytes_read +
                                                                                        row.bytes_written)
    return row


SECOND_PHASES_WITHOUT_CURRENT = ("free", "refine", "reference", "tbp-head")


def _block_row(u: Unit, seen: Seen, batch: int, phases: dict[str, float], costs: dict,
               notes: list[str]) -> ModuleAccount:
    b: EnergyBlock = u.module
    row = ModuleAccount(u.name, type(b).__name__, "energy block", "analog")
    per_sweep = sweep_macs(b, seen.in_shape)
    if per_sweep == 0:
        notes.append(f"{u.name}: {type(b).__name__} has no couplings; its MACs are not counted")
    row.sweep_macs = per_sweep * batch
    row.iterations = {k: v for k, v in phases.items()}
    sweeps = float(sum(phases.values()))
    est = b.estimator
    trainable = any(p.requires_grad for p in b.parameters())
    unrolled = 0
    if isinstance(est, BPTT):
        unrolled = b.T1 if est.T2 is None else est.T2
    elif isinstance(est, TBP):
        unrolled = min(est.K, int(phases.get("free", b.T1)))
    if unrolled:  # steps re-run with autograd: forward, then gradients of states and weights
        row.iterations["unrolled (x3)"] = unrolled
        sweeps += 3 * unrolled
        notes.append(f"{u.name}: {est.name} unrolls {unrolled} steps with autograd, counted as 3 sweeps each")
    elif isinstance(est, ContrastEstimator) and trainable:
        row.update_macs = 2 * per_sweep * batch  # dPhi/dtheta at two states: map and weight gradient each
    elif est is not None and not isinstance(est, ContrastEstimator):
        notes.append(f"{u.name}: {est.name}'s recorded iterations are counted as sweeps (an estimate)")
    row.macs = round(sweeps * per_sweep * batch) + row.update_macs
    shapes = b.state_shapes(seen.in_shape)
    in_n = math.prod(seen.in_shape)
    states_n = sum(math.prod(s) for s in shapes)
    out_n = math.prod(shapes[-1])
    n_phases = len(phases)
    second = [k for k in phases if k not in SECOND_PHASES_WITHOUT_CURRENT]
    row.dac = batch * (in_n * n_phases + out_n * len(second))
    row.adc = batch * states_n * n_phases
    item = seen.itemsize
    row.bytes_read = row.dac * item
    row.bytes_written = row.adc * item
    row.writes = sum(p.numel() for p in b.parameters() if p.requires_grad)
    dev = getattr(b, "device", None)
    adc_bits = dev.adc_bits if dev is not None and dev.adc_bits else int(costs["converter_bits"])
    dac_bits = dev.dac_bits if dev is not None and dev.dac_bits else int(costs["converter_bits"])
    row.converter_bits = adc_bits
    row.energy_pj = (costs["analog_mac_pj"] * row.macs + costs["adc_pj_per_step"] * 2 ** adc_bits * row.adc
                     + costs["dac_pj_per_step"] * 2 ** dac_bits * row.dac + costs["write_pj"] * row.writes
                     + costs["memory_pj_per_byte"] * (row.bytes_read + row.bytes_written))
    return row


def optimizer_kind(optimizer: torch.optim.Optimizer | str) -> str:
    """'adam', 'sgd' or 'sgd-no-momentum' for an optimizer (or its config name)."""
    if isinstance(optimizer, str):
        return optimizer
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd" if any(g.get("momentum", 0) for g in optimizer.param_groups) else "sgd-no-momentum"
    return "adam"


def account_step(model: nn.Module, seen: dict[str, Seen], phases: dict[str, dict[str, float]], optimizer: str,
                 batch: int | None = None, costs: dict | None = None) -> Account:
    """The account of one step from what a `ShapeRecorder` saw and the relaxation iterations
    of each block (block unit name -> phase -> iterations). `batch` scales every per-sample
    count (default: the recorded batch)."""
    costs = {**DEFAULT_COSTS, **(costs or {})}
    unknown = set(costs) - set(DEFAULT_COSTS)
    if unknown:
        raise ValueError(f"account: unknown cost(s) {sorted(unknown)}; valid: {', '.join(DEFAULT_COSTS)}")
    bad = [k for k, v in costs.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)]
    if bad:
        raise ValueError(f"account: cost {bad[0]} must be a finite number >= 0, got {costs[bad[0]]!r}")
    if optimizer not in OPTIMIZER_OPS:
        raise ValueError(f"account: optimizer must be one of {sorted(OPTIMIZER_OPS)}, got {optimizer!r}")
    us = units(model)
    missing = [u.name for u in us if u.name not in seen]
    rows: list[ModuleAccount] = []
    notes: list[str] = []
    if missing:
        notes.append(f"modules that did not run in the step (not counted): {', '.join(missing)}")
    block_names = [u.name for u in us if u.is_block]
    last_block = us.index(next(u for u in us if u.name == block_names[-1])) if block_names else -1
    for i, u in enumerate(us):
        if u.name not in seen:
            continue
        s = seen[u.name]
        B = s.batch if batch is None else batch
        if u.is_block:
            rows.append(_block_row(u, s, B, phases.get(u.name, {}), costs, notes))
        else:
            rows.append(_digital_row(u, s, B, "readout" if i > last_block >= 0 else "feedforward", costs))
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    ops, reads, writes = OPTIMIZER_OPS[optimizer]
    opt = ModuleAccount("optimizer", optimizer, "optimizer", "digital", macs=ops * n, bytes_read=reads * nbytes,
                        bytes_written=writes * nbytes)
    opt.energy_pj = costs["digital_mac_pj"] * opt.macs + costs["memory_pj_per_byte"] * (opt.bytes_read +
                                                                                        opt.bytes_written)
    rows.append(opt)
    first = next(iter(seen.values()), None)
    return Account(rows, batch if batch is not None else (first.batch if first else 0), costs, optimizer, notes)


def block_phases(model: nn.Module) -> dict[str, dict[str, float]]:
    """Block unit name -> phase -> iterations of the last step (from each block's record)."""
    return {u.name: {k: float(st.iters) for k, st in u.module.last_relax.items()}
            for u in units(model) if u.is_block}


# ---- an account of a config: one real step on random inputs -----------------------------

DATA_SHAPES = {"mnist": ((1, 28, 28), 10), "fashion_mnist": ((1, 28, 28), 10), "cifar10": ((3, 32, 32), 10),
               "cifar100": ((3, 32, 32), 100), "svhn": ((3, 32, 32), 10), "imagenet32": ((3, 32, 32), 1000)}


def account_config(cfg: dict, measure_batch: int | None = None, costs: dict | None = None, seed: int = 0
                   ) -> Account:
    """Build the config's model and run one training step (cross-entropy on its output, the
    config's optimizer) on a batch of `measure_batch` random inputs (default: the config's
    batch size), recording shapes and relaxation iterations; the account is for the
    config's batch size (counts scale with the batch; the iterations are the measured ones)."""
    from ..training.config import ConfigError
    from ..training.models import build_model

    if cfg["dataset"] not in DATA_SHAPES or cfg["model"].get("kind") not in ("conv", "dense"):
        raise ConfigError(f"account: image datasets ({', '.join(DATA_SHAPES)}) with model.kind conv or dense only; "
                          f"got dataset {cfg['dataset']!r}, model.kind {cfg['model'].get('kind')!r}")
    shape, k = DATA_SHAPES[cfg["dataset"]]
    torch.manual_seed(seed)
    model = build_model(cfg, {"num_classes": k, "kind": "image", "shape": shape})
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    model = model.to(dtype).train()
    b = measure_batch or cfg["batch_size"]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *shape, generator=gen).to(dtype)
    y = torch.randint(0, k, (b,), generator=gen)
    o = cfg["optim"]
    opt = (torch.optim.Adam(model.parameters(), lr=o["lr"], weight_decay=o["weight_decay"]) if o["name"] == "adam"
           else torch.optim.SGD(model.parameters(), lr=o["lr"], momentum=o["momentum"],
                                weight_decay=o["weight_decay"]))
    with ShapeRecorder(model) as rec:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    name = cfg["optim"]["name"]
    if name == "sgd" and not cfg["optim"].get("momentum"):
        name = "sgd-no-momentum"
    acct = account_step(model, rec.seen, block_phases(model), name, cfg["batch_size"], costs)
    acct.notes.append(f"relaxation iterations measured on one step of {b} random inputs at initialisation; "
                      f"counts for a batch of {cfg['batch_size']}")
    return acct


def _si(v: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def format_account(acct: Account, title: str = "") -> str:
    """The account as a markdown table, with totals per domain."""
    head = "| module | type | domain | MACs | read (B) | written (B) | iterations | DAC | ADC | writes | energy (uJ) |"
    lines = [f"### {title}" if title else "", "", head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in acct.rows:
        its = ", ".join(f"{k} {v:g}" for k, v in r.iterations.items())
        lines.append(f"| {r.name} | {r.kind} ({r.role}) | {r.domain} | {_si(r.macs)} | {_si(r.bytes_read)} | "
                     f"{_si(r.bytes_written)} | {its} | {_si(r.dac)} | {_si(r.adc)} | {_si(r.writes)} | "
                     f"{r.energy_pj * 1e-6:.4g} |")
    t = acct.totals()
    lines += ["", f"per step (batch {acct.batch}, optimizer {acct.optimizer}): digital {_si(t['digital_macs'])} MACs, "
              f"{_si(t['digital_bytes'])} B moved, {t['digital_energy_uj']:.4g} uJ; analog "
              f"{_si(t['analog_macs'])} MACs, {_si(t['relax_iterations'])} relaxation iterations, "
              f"{_si(t['dac_conversions'])} DAC and {_si(t['adc_conversions'])} ADC conversions, "
              f"{_si(t['conductance_writes'])} conductance writes, {t['analog_energy_uj']:.4g} uJ; "
              f"total {t['energy_uj']:.4g} uJ"]
    lines += [f"note: {n}" for n in acct.notes]
    return "\n".join(lines).lstrip()


# ---- during training ------------------------------------------------------------------------

class StepAccountant:
    """The account of a model's training steps, kept while training: shapes are recorded at
    the first step (forward hooks, removed after it), the iterations of every step are
    summed, and `epoch_totals()` gives the mean step's totals (then starts afresh)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | str, costs: dict | None = None):
        self.model, self.optimizer, self.costs = model, optimizer_kind(optimizer), costs
        self.recorder: ShapeRecorder | None = ShapeRecorder(model)
        self.seen: dict[str, Seen] = {}
        self.sums: dict[str, dict[str, float]] = {}
        self.steps = 0

    def after_step(self) -> None:
        """Call after each training step (forward and backward done)."""
        if self.recorder is not None:
            self.seen = dict(self.recorder.seen)
            self.recorder.remove()
            self.recorder = None
        for name, phases in block_phases(self.model).items():
            acc = self.sums.setdefault(name, {})
            for k, v in phases.items():
                acc[k] = acc.get(k, 0.0) + v
        self.steps += 1

    def epoch_totals(self, prefix: str = "account_") -> dict[str, float]:
        """The mean step's totals since the last call (empty before any step)."""
        if not self.steps or not self.seen:
            return {}
        phases = {n: {k: v / self.steps for k, v in p.items()} for n, p in self.sums.items()}
        acct = account_step(self.model, self.seen, phases, self.optimizer, None, self.costs)
        self.sums, self.steps = {}, 0
        return {prefix + k: float(v) for k, v in acct.totals().items()}

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.remove()
            self.recorder = None


@contextmanager
def recording(model: nn.Module) -> Iterator[ShapeRecorder]:
    """`with recording(model) as rec: <one step>`: the shapes of that step in rec.seen."""
    rec = ShapeRecorder(model)
    try:
        yield rec
    finally:
        rec.remove()


# ---- command line ----------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="config name (eqprop/configs) or YAML path")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--measure-batch", type=int, default=None,
                        help="run the measured step on this many random inputs (default: the config's batch size); "
                             "counts are reported for the config's batch size")
    parser.add_argument("--cost", nargs="+", action="extend", default=[], metavar="NAME=PJ",
                        help="per-operation costs in pJ replacing the defaults: " + ", ".join(DEFAULT_COSTS))
    parser.add_argument("--json", default=None, help="also write the account to this JSON file")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def parse_costs(items: list[str]) -> dict[str, float]:
    from ..training.config import ConfigError

    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"account: --cost {item!r} is not NAME=VALUE")
        k, v = item.split("=", 1)
        if k not in DEFAULT_COSTS:
            raise ConfigError(f"account: unknown cost {k!r}; valid: {', '.join(DEFAULT_COSTS)}")
        try:
            out[k] = float(v)
        except ValueError:
            raise ConfigError(f"account: --cost {k} must be a number, got {v!r}") from None
    return out


def run(args: argparse.Namespace) -> int:
    from ..training.config import ConfigError, load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    if args.measure_batch is not None and args.measure_batch < 1:
        raise ConfigError(f"account: --measure-batch must be a positive integer, got {args.measure_batch}")
    try:
        acct = account_config(cfg, args.measure_batch, parse_costs(args.cost))
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None
    print(format_account(acct, f"one training step of {cfg['name']} ({cfg['algorithm']})"))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        data = {"config": cfg["name"], "algorithm": cfg["algorithm"], "overrides": list(args.overrides),
                "measure_batch": args.measure_batch or cfg["batch_size"], "threads": torch.get_num_threads(),
                **acct.as_dict()}
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0
