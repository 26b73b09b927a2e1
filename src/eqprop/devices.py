"""Analog device non-idealities: one immutable setting of an energy-based block.

An energy-based block stands for an analog circuit. `Device` describes how that circuit
departs from the ideal one; it is set on a block like any relaxation setting,

    block.configure(device=Device(read_noise=0.02, adc_bits=6))
    eqprop.configure_blocks(model, device={"g_max": 2.0, "levels": 32})   # every block
    eqprop train fmnist_cpu model.device='{read_noise: 0.02, adc_bits: 6}'

and acts wherever the block computes: in the free relaxation and in every nudged (or
clamped, held) phase of the estimators, which all run through `EnergyBlock.relax`. Each
phase of one training step sees the same converters and, with `resample='step'`, the
same noisy weights, as one physical circuit would.

What each field models (all off by default; `Device()` is the ideal circuit):

  reads (every relaxation; the weights W of the block's couplings, biases are exact)
    g_max       conductance range: weights clipped to [-g_max, g_max] (in `g_unit`s)
    levels      finite conductance levels: weights rounded to `levels` evenly spaced
                values over [-g_max, g_max] (needs g_max)
    read_noise  Gaussian noise on each read: W + read_noise * unit * N(0, 1)
                ('additive') or W * (1 + read_noise * N(0, 1)) ('multiplicative')
    resample    'step': one noise draw per forward, shared by all phases of that step;
                'relaxation': a fresh draw for every relaxation (every phase)
  writes (when the optimizer writes the weights, see `attach_device_writes`)
    asymmetry   an increase of a weight is scaled by (1 + asymmetry), a decrease by
                (1 - asymmetry)
    program_noise  noise of a write: delta + program_noise * unit * N(0, 1) on every
                written weight ('additive') or delta * (1 + program_noise * N(0, 1))
                ('multiplicative'), delta being the optimizer's update
    drift       multiplicative conductance drift between two writes: the stored weight
                becomes W * (1 - drift) per step before the update is added
  the block's boundaries (analog/digital converters)
    dac_bits    the input current u is quantised to 2**dac_bits levels over
                [-dac_range, dac_range] (values beyond saturate)
    adc_bits    every layer's state is quantised to 2**adc_bits levels over adc_range
                (default [0, 1], the range of hard-sigmoid units) when a relaxation ends

  g_unit  'fan_in' (default): g_max and the additive noises are in units of
          1/sqrt(fan_in) of each coupling (the scale of its initial weights), so one
          setting fits layers of every width; 'absolute': in weight units
  noise   'additive' or 'multiplicative' (both read and program noise)
  seed    seeds the block's generator (with the block's name), so runs are reproducible

The random state of a block's device (its generator and the read-noise draw of the current
step; drift, asymmetry and the converters keep no state of their own, the stored weights
being parameters) is `device_state(model)`; training checkpoints save it and
`load_device_state` restores it, so a resumed noisy run goes on with the same draws.

Weight quantisation and clipping at reads use a straight-through estimator under autograd
(BPTT and TBP differentiate through the rounded, noisy weights as if they were W).
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor

__all__ = ["Device", "DEVICE_FIELDS", "make_device", "quantize", "fan_in_unit", "DeviceStepper", "device_blocks",
           "attach_device_writes", "program_blocks", "device_state", "load_device_state"]

NOISE_MODES = ("additive", "multiplicative")
RESAMPLE = ("step", "relaxation")
G_UNITS = ("fan_in", "absolute")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True, kw_only=True)
class Device:
    """Non-idealities of the analog circuit an energy-based block stands for (module
    docstring); immutable, validated when built."""

    g_max: float | None = None
    levels: int | None = None
    read_noise: float = 0.0
    resample: str = "step"
    program_noise: float = 0.0
    asymmetry: float = 0.0
    drift: float = 0.0
    dac_bits: int | None = None
    dac_range: float = 4.0
    adc_bits: int | None = None
    adc_range: tuple[float, float] = (0.0, 1.0)
    g_unit: str = "fan_in"
    noise: str = "additive"
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.adc_range, list):
            object.__setattr__(self, "adc_range", tuple(self.adc_range))
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the setting for an invalid one."""
        o = "device"
        if self.g_max is not None and not (_is_number(self.g_max) and self.g_max > 0):
            raise ValueError(f"{o}: g_max must be a finite number > 0 (or None: no range limit), got {self.g_max!r}")
        if self.levels is not None:
            if isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 2:
                raise ValueError(f"{o}: levels must be an integer >= 2 (or None: continuous), got {self.levels!r}")
            if self.g_max is None:
                raise ValueError(f"{o}: levels={self.levels} needs g_max, the range the levels span")
        for name in ("read_noise", "program_noise"):
            v = getattr(self, name)
            if not (_is_number(v) and v >= 0):
                raise ValueError(f"{o}: {name} must be a finite number >= 0, got {v!r}")
        if not (_is_number(self.drift) and 0 <= self.drift < 1):
            raise ValueError(f"{o}: drift must be a number in [0, 1) (fraction lost per step), got {self.drift!r}")
        if not (_is_number(self.asymmetry) and -1 < self.asymmetry < 1):
            raise ValueError(f"{o}: asymmetry must be a number in (-1, 1), got {self.asymmetry!r}")
        for name in ("dac_bits", "adc_bits"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 24):
                raise ValueError(f"{o}: {name} must be an integer in [1, 24] (or None: no converter), got {v!r}")
        if not (_is_number(self.dac_range) and self.dac_range > 0):
            raise ValueError(f"{o}: dac_range must be a finite number > 0, got {self.dac_range!r}")
        r = self.adc_range
        if not (isinstance(r, tuple) and len(r) == 2 and all(_is_number(v) for v in r) and r[0] < r[1]):
            raise ValueError(f"{o}: adc_range must be two finite numbers [low, high] with low < high, got {r!r}")
        for name, value, choices in (("resample", self.resample, RESAMPLE), ("noise", self.noise, NOISE_MODES),
                                     ("g_unit", self.g_unit, G_UNITS)):
            if value not in choices:
                raise ValueError(f"{o}: {name} must be one of {choices}, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"{o}: seed must be an integer, got {self.seed!r}")

    # ---- what is on ----------------------------------------------------------------------
    @property
    def on_reads(self) -> bool:
        """Whether weights read by a relaxation differ from the stored ones."""
        return self.g_max is not None or self.read_noise > 0

    @property
    def on_writes(self) -> bool:
        """Whether a write differs from storing the optimizer's value."""
        return self.g_max is not None or self.program_noise > 0 or self.asymmetry != 0 or self.drift > 0

    @property
    def ideal(self) -> bool:
        """No non-ideality at all: the block behaves exactly as without a device."""
        return not (self.on_reads or self.on_writes or self.dac_bits or self.adc_bits)

    def as_dict(self) -> dict:
        return asdict(self)

    def __repr__(self) -> str:
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                   if getattr(self, f.name) != f.default]
        return f"Device({', '.join(changed)})"

    # ---- weights ---------------------------------------------------------------------------
    def unit(self, weight: Tensor) -> float:
        """The weight unit of g_max and the additive noises for this weight tensor."""
        return fan_in_unit(weight) if self.g_unit == "fan_in" else 1.0

    def store(self, w: Tensor, unit: float) -> Tensor:
        """What the conductances can hold: w clipped to +-g_max and rounded to the levels."""
        if self.g_max is None:
            return w
        g = self.g_max * unit
        w = w.clamp(-g, g)
        if self.levels is not None:
            w = quantize(w, -g, g, self.levels)
        return w

    def read(self, w: Tensor, generator: torch.Generator | None) -> Tensor:
        """The weights a relaxation uses (straight-through under autograd)."""
        unit = self.unit(w)
        stored = self.store(w, unit)
        if stored is not w and w.requires_grad and torch.is_grad_enabled():
            stored = w + (stored - w).detach()
        if self.read_noise > 0:
            n = torch.randn(w.shape, generator=generator, device=w.device, dtype=w.dtype)
            if self.noise == "additive":
                stored = stored + (self.read_noise * unit) * n
            else:
                stored = stored * (1 + self.read_noise * n)
        return stored

    def write(self, old: Tensor | None, new: Tensor, generator: torch.Generator | None) -> Tensor:
        """The stored weight after the optimizer asked to change `old` into `new` (old=None:
        the first programming of the initial weights, `new` written from zero)."""
        unit = self.unit(new)
        if old is None:  # programmed to its value: only the write's noise and what the device can hold
            return self.store(self._program_noise(new, new, unit, generator), unit)
        delta = new - old
        if self.asymmetry:
            delta = torch.where(delta > 0, delta * (1 + self.asymmetry), delta * (1 - self.asymmetry))
        delta = self._program_noise(delta, delta, unit, generator)
        base = old * (1 - self.drift) if self.drift else old
        return self.store(base + delta, unit)

    def _program_noise(self, value: Tensor, written: Tensor, unit: float, generator: torch.Generator | None
                       ) -> Tensor:
        """`value` with the noise of a write (only where `written` is non-zero when additive)."""
        if self.program_noise <= 0:
            return value
        n = torch.randn(value.shape, generator=generator, device=value.device, dtype=value.dtype)
        if self.noise == "multiplicative":
            return value * (1 + self.program_noise * n)
        return value + torch.where(written != 0, (self.program_noise * unit) * n, torch.zeros_like(n))

    # ---- converters ------------------------------------------------------------------------
    def dac(self, u: Tensor) -> Tensor:
        """The input current after the block's DACs (straight-through under autograd)."""
        if self.dac_bits is None:
            return u
        q = quantize(u, -self.dac_range, self.dac_range, 2 ** self.dac_bits)
        return u + (q - u).detach() if u.requires_grad and torch.is_grad_enabled() else q

    def adc(self, s: Sequence[Tensor]) -> list[Tensor]:
        """Every layer's state after the block's ADCs."""
        if self.adc_bits is None:
            return list(s)
        lo, hi = self.adc_range
        return [quantize(x, lo, hi, 2 ** self.adc_bits) for x in s]

    def seed_for(self, owner: str) -> int:
        """The seed of a block's generator: this device's seed and the block's name."""
        return (self.seed * 1_000_003 + zlib.crc32(owner.encode())) % (2 ** 63)


DEVICE_FIELDS = tuple(f.name for f in fields(Device))


def fan_in_unit(weight: Tensor) -> float:
    """1/sqrt(fan_in) of a weight (out, in, ...): the scale of its initial values."""
    return 1.0 / math.sqrt(max(math.prod(weight.shape[1:]), 1))


def quantize(x: Tensor, lo: float, hi: float, levels: int) -> Tensor:
    """x clamped to [lo, hi] and rounded to the nearest of `levels` evenly spaced values."""
    step = (hi - lo) / (levels - 1)
    return torch.round((x.clamp(lo, hi) - lo) / step) * step + lo


def make_device(value: Device | dict | None, owner: str = "block") -> Device | None:
    """A `Device` from a Device, a mapping of its fields (a config's `model.device`) or None."""
    if value is None or isinstance(value, Device):
        return value
    if isinstance(value, dict):
        unknown = set(value) - set(DEVICE_FIELDS)
        if unknown:
            raise ValueError(f"{owner}: unknown device setting(s) {sorted(unknown)}; valid: {', '.join(DEVICE_FIELDS)}")
        try:
            return Device(**value)
        except ValueError as e:
            raise ValueError(f"{owner}: {e}") from None
    raise ValueError(f"{owner}: device must be an eqprop.devices.Device, a mapping of its settings or None, got "
                     f"{type(value).__name__}")


class DeviceStepper:
    """Fixed-point steps of a layered block (its `couplings`) with the weights `weights` in
    place of the stored ones: the same maps as the block's analytical step, through each
    coupling's linear part, routing and bias (see eqprop.couplings.Coupling)."""

    def __init__(self, couplings: Sequence, weights: Sequence[Tensor]):
        self.couplings, self.weights = list(couplings), list(weights)

    def _forward(self, s: list[Tensor], l: int, cache: dict) -> tuple[Tensor, object]:
        hit = cache.get(l)
        if hit is not None and hit[0] is s[l]:
            return hit[1]
        c = self.couplings[l]
        z = c.linear_map(s[l], self.weights[l])
        y, aux = c.route(z)
        out = (c.add_bias(y), (aux, z.shape))
        cache[l] = (s[l], out)
        return out

    def preactivations(self, s: list[Tensor], u: Tensor, layers, nudge: Tensor | None = None,
                       cache: dict | None = None) -> dict[int, Tensor]:
        """Same signature as `EnergyBlock.preactivations`."""
        cache = {} if cache is None else cache
        L = len(s)
        out = {}
        for l in layers:
            z = u if l == 0 else self._forward(s, l - 1, cache)[0]
            if l < L - 1:
                c = self.couplings[l]
                y = s[l + 1]
                if c.routed:
                    aux, z_shape = self._forward(s, l, cache)[1]
                    y = c.route_adjoint(y, aux, z_shape)
                z = z + c.linear_adjoint(y, s[l].shape, self.weights[l])
            if nudge is not None and l == L - 1:
                z = z + nudge
            out[l] = z
        return out


def device_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of `model` (itself included) that carry a non-ideal device and can be
    programmed (energy-based blocks with a `device` and a `program_` method)."""
    out = []
    for m in model.modules():
        dev = getattr(m, "device", None)
        if isinstance(dev, Device) and not dev.ideal and callable(getattr(m, "program_", None)):
            out.append(m)
    return out


def program_blocks(model: torch.nn.Module) -> int:
    """Program every device block's weights once (as written from zero: range, levels,
    programming noise); returns how many blocks were programmed."""
    blocks = device_blocks(model)
    for b in blocks:
        b.program_(None)
    return len(blocks)


def attach_device_writes(optimizer: torch.optim.Optimizer, model: torch.nn.Module, program: bool = True) -> list:
    """Make every step of `optimizer` a device write for the device blocks of `model`: before
    the step the stored weights are remembered, after it each block's `program_` turns the
    optimizer's update into what its device stores (asymmetry, programming noise, drift,
    range, levels). With `program`, the current weights are programmed once now.
    Returns the hook handles (`handle.remove()` detaches). Blocks whose device only
    acts on reads or converters are left alone."""
    blocks = [b for b in device_blocks(model) if b.device.on_writes]
    if not blocks:
        return []
    if program:
        for b in blocks:
            b.program_(None)
    saved: dict[int, list[Tensor]] = {}

    def before(opt, args, kwargs) -> None:
        for b in blocks:
            if b.device is not None and b.device.on_writes:
                saved[id(b)] = [w.detach().clone() for w in b.device_weights()]

    def after(opt, args, kwargs) -> None:
        for b in blocks:
            old = saved.pop(id(b), None)
            if old is not None and b.device is not None and b.device.on_writes:
                b.program_(old)

    return [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)]


# ---- the random state of the devices (checkpoints) ------------------------------------------
# A block keeps its device's generator (created from the device's seed at the first draw) and
# the read-noise seed of the current step; it hands them out and takes them back through
# `device_rng_state()` / `set_device_rng_state(generator, step_seed)` (eqprop.blocks.EnergyBlock).

def _named_device_blocks(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    names = {id(m): (n or "model") for n, m in model.named_modules()}
    return {names[id(b)]: b for b in device_blocks(model)}


def device_state(model: torch.nn.Module) -> dict[str, dict]:
    """The random state of every non-ideal device of `model`, by module name: the device's
    settings, its generator's state (a byte tensor; None before the first draw) and the seed of
    the current step's read noise (None before the first forward). Plain values and tensors
    (safe to store in a checkpoint)."""
    out = {}
    for name, b in _named_device_blocks(model).items():
        gen_state, step_seed = b.device_rng_state()
        settings = b.device.as_dict()
        settings["adc_range"] = list(settings["adc_range"])
        out[name] = {"device": settings, "generator": gen_state,
                     "step_seed": step_seed}
    return out


def load_device_state(model: torch.nn.Module, state: dict[str, dict]) -> list[str]:
    """Restore `device_state`'s output into the non-ideal devices of `model`. A block whose
    device settings differ from the saved ones, or that has no saved state, keeps the state
    it has (its generator starts from its own seed); a saved block whose device is off now is
    dropped. Returns one note per such block; a state that does not fit raises ValueError."""
    if not isinstance(state, dict):
        raise ValueError(f"device state: expected a mapping of block names to states, got {type(state).__name__}")
    blocks = _named_device_blocks(model)
    modules = {(n or "model") for n, _ in model.named_modules()}
    notes = []
    for name, saved in state.items():
        if name not in modules:
            raise ValueError(f"device state: the model has no block {name!r} (a state for another architecture)")
        if not (isinstance(saved, dict) and {"device", "generator", "step_seed"} <= set(saved)):
            raise ValueError(f"device state of {name}: expected a mapping with device, generator and step_seed, "
                             f"got {saved!r}")
        gen, step_seed = saved["generator"], saved["step_seed"]
        if gen is not None and not (isinstance(gen, Tensor) and gen.dtype == torch.uint8 and gen.dim() == 1):
            raise ValueError(f"device state of {name}: generator must be a byte tensor (a generator's state) or "
                             f"None, got {gen!r}")
        if step_seed is not None and (isinstance(step_seed, bool) or not isinstance(step_seed, int)):
            raise ValueError(f"device state of {name}: step_seed must be an integer or None, got {step_seed!r}")
        if name not in blocks:
            notes.append(f"{name}: the saved device state is dropped (the block has no non-ideal device now)")
            continue
        b = blocks[name]
        now = b.device.as_dict()
        now["adc_range"] = list(now["adc_range"])
        if saved["device"] != now:
            notes.append(f"{name}: device settings changed since the checkpoint; its noise draws start from the "
                         f"new device's seed, not from the saved state")
            continue
        try:
            b.set_device_rng_state(gen, step_seed)
        except RuntimeError as e:
            raise ValueError(f"device state of {name}: generator state cannot be restored "
                             f"({str(e).splitlines()[0]})") from None
    for name in blocks:
        if name not in state:
            notes.append(f"{name}: no saved device state; its noise draws restart from the device's seed")
    return notes
