"""Spiking neurons that learn by equilibrium propagation (EqSpike), in a dense Hopfield block.

`SpikingDenseHopfield` has the energy and couplings of `DenseHopfield`, but its neurons
emit spikes: at every time step dt, neuron i of layer l is driven by the firing intensity
rho_i = sigma(dPhi/ds_i) (the rate-based network's update, computed from the *traces* of
its neighbours) and

  deterministic:  integrate-and-fire, v_i <- v_i + rate dt rho_i; a spike when v_i >= threshold,
                  then v_i <- v_i - threshold (reset by subtraction);
  stochastic:     a spike with probability rate dt rho_i / threshold (PyTorch's global RNG,
                  reproducible under torch.manual_seed).

Either way a neuron fires on average rate * rho_i / threshold spikes per unit time. Its
state, the one that enters the energy, is the low-pass filtered spike train

  s_i <- a s_i + (1 - a) h S_i,   a = exp(-dt / tau),  h = threshold / (rate dt),

(S_i = 1 on a spike, 0 otherwise) whose mean at a constant drive is rho_i: the spiking
network relaxes to the rate network's fixed point, up to fluctuations that shrink as
N = rate * tau / threshold (spikes per filter time constant at full drive) grows.

The EqSpike rule (`EqSpike`, registered as "eqspike") runs the nudged phase with the same
spiking dynamics and updates each synapse when one of its two neurons spikes: the spike
(h S_pre) times the change of the other neuron's trace in that step (s_post(t+1) - s_post(t)),
both directions of the symmetric synapse summed, over the nudged phase, divided by beta:

  dW_l += ( ds_{l+1}^t (h S_l^t)^T + (h S_{l+1}^t) ds_l^t^T ) / beta,   db_l += ds_{l+1}^t / beta,

which is continual EP's local difference d(s_{l+1} s_l^T) = ds_{l+1} s_l^T + s_{l+1} ds_l^T
with each trace that multiplies a change replaced by the spike train it filters (equal in
the mean). Summed over the phase, continual EP's differences telescope to EP's contrast;
with stochastic neurons the spike-triggered update tends to EP's as the rate grows, while
integrate-and-fire spike trains leave a coincidence bias (docs/spiking.md has the
measurements).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .activations import Activation, HardSigmoid, Logistic
from .blocks import RELAX_SETTINGS, DenseHopfield, EnergyBlock, RelaxRecord, RelaxStats, State, relative_change
from .estimators import EP, block_parameters, ep_nudge, per_sample
from .precision import low_dtype
from .routing import held_routing
from .validate import check_choice, check_positive, check_positive_int

__all__ = ["SPIKING", "SPIKE_SETTINGS", "SpikingDenseHopfield", "EqSpike", "spike_pair_update", "stdp_window",
           "trace_decay", "make_spiking_"]

SPIKING = ("deterministic", "stochastic")
SPIKE_SETTINGS = ("spiking", "threshold", "tau", "dt", "rate")

StepHook = Callable[[int, State, State, list[Tensor]], None]


def trace_decay(dt: float, tau: float) -> float:
    """a = exp(-dt / tau): how much of a trace is left after one step."""
    return math.exp(-dt / tau)


class SpikingDenseHopfield(DenseHopfield):
    """Dense Hopfield block of spiking neurons whose filtered spike trains are the states.

    Same widths, energy, couplings, initialisation and relaxation settings as `DenseHopfield`
    (T1 counts time steps of length dt), plus the spike settings:
      spiking:   'deterministic' (integrate-and-fire) or 'stochastic' (Bernoulli spikes)
      threshold: firing threshold of the membrane (> 0)
      tau:       time constant of the trace filter (> 0, same unit as dt)
      dt:        time step (> 0)
      rate:      gain of the membrane: full drive (rho = 1) fires rate / threshold spikes per
                 unit time; rate * dt <= threshold (at most one spike per neuron and step)
    Neurons fire at rate sigma(dPhi/ds) in [0, 1], so the activations must be 'hardsigmoid'
    or 'sigmoid' (no linear output layer), and the traces fluctuate, so the relaxation runs
    exactly T steps (`tol` must be None). Relaxations start with membranes at 0 (and traces
    at 0 or at the given state). `relax_dtype`, `omega` and `anderson` are not supported.

    Standard estimators apply: EP and the contrastive rules run their second phases with
    these spiking dynamics; ID, BPTT and TBP differentiate the rate-based map (a surrogate:
    spikes have no derivative). `EqSpike` is the spike-triggered, local-in-time rule.
    """

    def __init__(self, widths: Sequence[int], activation: str | Activation = "hardsigmoid", slope: float = 1.0,
                 init: str = "kaiming", alpha: float = 0.5, spiking: str = "deterministic", threshold: float = 1.0,
                 tau: float = 10.0, dt: float = 1.0, rate: float = 1.0, **kw):
        # set before the base class validates the settings
        self.spiking, self.threshold, self.tau, self.dt, self.rate = spiking, threshold, tau, dt, rate
        super().__init__(widths, activation=activation, slope=slope, last_linear=False, init=init, alpha=alpha, **kw)

    @classmethod
    def from_dense(cls, block: DenseHopfield, **spike) -> SpikingDenseHopfield:
        """A spiking copy of a `DenseHopfield` (same widths, weights, activations, relaxation
        settings, estimator and name) with the spike settings `spike`."""
        acts = block.activations
        if any(type(a) is not type(acts[0]) or getattr(a, "slope", None) != getattr(acts[0], "slope", None)
               for a in acts):
            raise ValueError(f"{block.block_name}: a spiking copy needs the same activation on every layer, got "
                             f"{acts}")
        unknown = set(spike) - set(SPIKE_SETTINGS)
        if unknown:
            raise ValueError(f"{block.block_name}: unknown spike setting(s) {sorted(unknown)}; valid: "
                             f"{', '.join(SPIKE_SETTINGS)}")
        relax = {k: getattr(block, k) for k in RELAX_SETTINGS}
        p = next(block.parameters())
        with torch.device(p.device):
            new = cls(block.widths, activation=acts[0], init="default", estimator=block.estimator,
                      name=block.block_name, **relax, **spike).to(p.dtype)
        new.load_state_dict(block.state_dict())
        return new

    # ---- settings ---------------------------------------------------------------------
    def validate(self) -> None:
        super().validate()
        owner = self.block_name
        check_choice(owner, "spiking", self.spiking, SPIKING)
        for name in ("threshold", "tau", "dt", "rate"):
            check_positive(owner, name, getattr(self, name))
        if self.rate * self.dt > self.threshold:
            raise ValueError(f"{owner}: rate * dt must be <= threshold (a neuron fires at most one spike per step), "
                             f"got rate={self.rate}, dt={self.dt}, threshold={self.threshold}")
        for l, act in enumerate(self.activations):
            if not isinstance(act, (HardSigmoid, Logistic)):
                raise ValueError(f"{owner}: spiking neurons fire at a rate sigma(z) in [0, 1]; layer {l + 1} has "
                                 f"activation {act!r}, use 'hardsigmoid' or 'sigmoid'")
        if self.tol is not None:
            raise ValueError(f"{owner}: tol must be None for spiking neurons (their traces fluctuate, so a "
                             f"relaxation runs exactly T1 / T2 steps), got {self.tol!r}")
        if self.relax_dtype is not None:
            raise ValueError(f"{owner}: relax_dtype is not supported by spiking neurons, got {self.relax_dtype!r}")
        if getattr(self, "device", None) is not None:
            raise ValueError(f"{owner}: analog device models are not supported by spiking neurons; set device to "
                             f"None")
        if self.omega != 1 or self.anderson:
            raise ValueError(f"{owner}: spiking dynamics are simulated as they are; omega and anderson (solvers of "
                             f"the rate-based fixed point) must stay 1 and 0, got omega={self.omega!r}, "
                             f"anderson={self.anderson!r}")
        if self.compile_sweep:
            raise ValueError(f"{owner}: compile_sweep compiles the rate-based sweep, which spiking neurons do not "
                             f"run; set compile_sweep=False")

    def configure(self, **settings) -> SpikingDenseHopfield:
        """Set relaxation and spike settings; nothing changes if one is invalid."""
        unknown = set(settings) - set(RELAX_SETTINGS) - set(SPIKE_SETTINGS)
        if unknown:
            raise ValueError(f"{self.block_name}: unknown setting(s) {sorted(unknown)}; valid: "
                             f"{', '.join(RELAX_SETTINGS + SPIKE_SETTINGS)}")
        old = {k: getattr(self, k) for k in settings}
        for k, v in settings.items():
            setattr(self, k, v)
        try:
            self.validate()
        except ValueError:
            for k, v in old.items():
                setattr(self, k, v)
            raise
        return self

    @property
    def spike_value(self) -> float:
        """h = threshold / (rate dt): a spike in the units of the trace (E[h S] = rho)."""
        return self.threshold / (self.rate * self.dt)

    @property
    def spikes_per_tau(self) -> float:
        """N = rate tau / threshold: spikes per filter time constant at full drive; the
        traces' fluctuations shrink as it grows."""
        return self.rate * self.tau / self.threshold

    # ---- dynamics ---------------------------------------------------------------------
    def initial_membranes(self, s: State) -> list[Tensor]:
        """Membranes at the start of a relaxation: 0 for stochastic neurons; for deterministic
        ones spread over [0, threshold) by neuron (golden-ratio sequence, the same for every
        sample), so that neurons driven alike do not fire in lockstep."""
        if self.spiking == "stochastic":
            return [torch.zeros_like(x) for x in s]
        out, offset = [], 0
        for x in s:
            n = x[0].numel()
            k = torch.arange(offset + 1, offset + n + 1, dtype=torch.float64, device=x.device)
            out.append(((k * 0.6180339887498949) % 1.0).to(x.dtype).view(1, *x.shape[1:]).expand_as(x)
                       * self.threshold)
            offset += n
        return out

    @torch.no_grad()
    def simulate(self, u: Tensor, s0: State | None = None, T: int | None = None,
                 nudge: Tensor | Callable[[Tensor], Tensor] | None = None, hold_last: bool = False,
                 on_step: StepHook | None = None, preactivations: Callable | None = None) -> tuple[State, RelaxStats]:
        """Run T time steps (T1 by default) of the spiking dynamics from traces `s0` (zeros by
        default), membranes at 0. `on_step(t, before, after, spikes)` is called after every
        step with the traces before and after it and the spikes (0/1 per neuron) it emitted.
        nudge, hold_last and preactivations as in `EnergyBlock.relax`."""
        self.validate()
        T = self.T1 if T is None else T
        check_positive_int(self.block_name, "T", T)
        s = self.init_state(u) if s0 is None else [x.detach() for x in s0]
        L = len(s)
        v = self.initial_membranes(s)
        a = trace_decay(self.dt, self.tau)
        jump = (1.0 - a) * self.spike_value
        gain, theta, p = self.rate * self.dt, self.threshold, self.rate * self.dt / self.threshold
        stochastic = self.spiking == "stochastic"
        if self.update == "sync":
            groups = [range(L)]
        else:
            odd, even = range(0, L, 2), range(1, L, 2)
            groups = [odd, even] if self.first == "odd" else [even, odd]
        pre_fn = preactivations or self.preactivations
        change = None
        for t in range(1, T + 1):
            current = nudge(s[-1]) if callable(nudge) else nudge
            before = s
            s = list(s)
            spikes = [torch.zeros_like(x) for x in s]
            cache: dict = {}
            for group in groups:
                layers = [l for l in group if not (hold_last and l == L - 1)]
                if not layers:
                    continue
                for l, z in pre_fn(s, u, layers, current, cache).items():
                    rho = self.activations[l](z)
                    if stochastic:
                        fired = (torch.rand_like(rho) < p * rho).to(rho.dtype)
                    else:
                        v[l] = v[l] + gain * rho
                        fired = (v[l] >= theta).to(rho.dtype)
                        v[l] = v[l] - theta * fired
                    spikes[l] = fired
                    s[l] = a * s[l] + jump * fired
            if on_step is not None:
                on_step(t, before, s, spikes)
            if t == T:
                change = relative_change(s, before)
        residual = float(change)
        if self.check_inputs and not bool(torch.isfinite(u).all()):
            raise ValueError(f"{self.block_name}: input current holds NaN or inf values")
        return s, RelaxStats(T, residual, None)

    @torch.no_grad()
    def relax(self, u: Tensor, s0: State | None = None, T: int | None = None, tol: float | None | str = "block",
              nudge: Tensor | Callable[[Tensor], Tensor] | None = None, hold_last: bool = False,
              callback: Callable[[int, State], None] | None = None, preactivations: Callable | None = None,
              ) -> tuple[State, RelaxStats]:
        """The spiking dynamics in place of the fixed-point iteration (same signature as
        `EnergyBlock.relax`; tol must be None); returns the traces."""
        tol = self.tol if tol == "block" else tol
        if tol is not None:
            raise ValueError(f"{self.block_name}: spiking dynamics run a fixed number of steps; tol must be None, "
                             f"got {tol!r}")
        hook = None if callback is None else (lambda t, before, after, spikes: callback(t, after))
        return self.simulate(u, s0, T, nudge, hold_last, hook, preactivations)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, spiking={self.spiking!r}, threshold={self.threshold}, tau={self.tau}, "
                f"dt={self.dt}, rate={self.rate}")


def make_spiking_(model: torch.nn.Module, **spike) -> torch.nn.Module:
    """Replace, in place, every (non-spiking) `DenseHopfield` inside `model` by its spiking
    copy (`SpikingDenseHopfield.from_dense`, same weights) with the spike settings `spike`;
    returns `model`. Raises if it holds none."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DenseHopfield) and not isinstance(child, SpikingDenseHopfield):
                setattr(parent, name, SpikingDenseHopfield.from_dense(child, **spike))
                count += 1
    if not count:
        raise ValueError(f"make_spiking_: {type(model).__name__} holds no dense Hopfield block")
    return model


# ---- the spike-triggered rule ----------------------------------------------------------

def spike_pair_update(pre_events: Tensor, pre_change: Tensor, post_events: Tensor, post_change: Tensor,
                      weights: Tensor | None = None) -> Tensor:
    """One step of the EqSpike rule for a dense coupling (post x pre weights):
    post_change^T pre_events + post_events^T pre_change, summed over the batch with per-sample
    `weights`. Events are spikes in trace units (h S), changes are s(t+1) - s(t)."""
    if weights is not None:
        w = per_sample(weights, post_change)
        post_change, post_events = post_change * w, post_events * w
    return post_change.flatten(1).t() @ pre_events.flatten(1) + post_events.flatten(1).t() @ pre_change.flatten(1)


def stdp_window(offsets: Sequence[int], tau: float = 10.0, dt: float = 1.0, rate: float = 1.0,
                threshold: float = 1.0, steps: int | None = None) -> Tensor:
    """Weight change of one synapse under the EqSpike rule (beta = 1) for one pre-synaptic
    spike at step t0 and one post-synaptic spike at t0 + offset, for each offset (in steps);
    traces filtered as in `SpikingDenseHopfield`, starting at 0, over `steps` steps (default:
    long enough for both traces to decay to e^-10)."""
    for name, value in (("tau", tau), ("dt", dt), ("rate", rate), ("threshold", threshold)):
        check_positive("stdp_window", name, value)
    offsets = [int(k) for k in offsets]
    span = max((abs(k) for k in offsets), default=0)
    steps = steps if steps is not None else span + 2 + int(math.ceil(10 * tau / dt))
    check_positive_int("stdp_window", "steps", steps)
    h = threshold / (rate * dt)
    a = trace_decay(dt, tau)
    t0 = 1 + max(0, -min(offsets, default=0))
    n = len(offsets)
    pre_s, post_s = torch.zeros(1, n, dtype=torch.float64), torch.zeros(1, n, dtype=torch.float64)
    dw = torch.zeros(n, dtype=torch.float64)
    post_times = torch.tensor([t0 + k for k in offsets])
    for t in range(t0 + span + steps):
        # one sample, n pre- and n post-synaptic neurons: synapse i (the diagonal) pairs offset i's
        pre_fired = torch.full((1, n), float(t == t0), dtype=torch.float64)
        post_fired = (post_times == t).to(torch.float64).view(1, n)
        new_pre = a * pre_s + (1 - a) * h * pre_fired
        new_post = a * post_s + (1 - a) * h * post_fired
        dw += spike_pair_update(h * pre_fired, new_pre - pre_s, h * post_fired, new_post - post_s).diagonal()
        pre_s, post_s = new_pre, new_post
    return dw


@dataclass(frozen=True, kw_only=True)
class EqSpike(EP):
    """EqSpike: the nudged phase runs the block's spiking dynamics and every synapse is updated
    when one of its neurons spikes, by the spike times the change of the other neuron's trace
    (see the module docstring), summed over the phase and divided by beta. The biases and the
    input's error current accumulate the change of their trace at every step.

    Settings are EP's (beta, T2, normalize, variant; tol must stay None on a spiking block):
    'positive' (the default) runs one phase nudged by +beta from the free state, 'negative'
    one by -beta, 'centered' both (divided by 2 beta). The nudge is EP's: the cost
    beta/2 ||s_L - y||^2 when the block holds the output layer and a target was given, else
    the normalised error current. On a rate-based (non-spiking) block there are no spikes:
    the rule then accumulates continual EP's local difference
    dPhi/dtheta(s_{t+1}) - dPhi/dtheta(s_t) at every step, which sums to EP's estimate
    (`pool='held'` holds in-block pooling routes there as for EP; a spiking block has none).
    Blocks with a 16-bit `relax_dtype` are refused; `precision` and `refine` only concern those.
    """

    variant: str = "positive"
    name: ClassVar[str] = "eqspike"

    def gradients(self, block: EnergyBlock, u: Tensor, s: State, delta: Tensor, target: Tensor | None,
                  record: RelaxRecord, need_input: bool) -> tuple[Tensor | None, list[Tensor | None]]:
        if low_dtype(block, u) is not None:
            raise ValueError(f"{self.name} ({block.block_name}): blocks with a 16-bit relax_dtype are not "
                             f"supported; set relax_dtype to None")
        nudge, w = ep_nudge(self.name, self.beta, self.normalize, block, s, delta, target)

        signs = {"centered": (1, -1), "positive": (1,), "negative": (-1,)}[self.variant]
        denom = 2 * self.beta if self.variant == "centered" else self.beta
        w = w.to(u.dtype)
        params = block_parameters(block)
        totals: list[Tensor] = [torch.zeros_like(p) for p in params]
        input_change = torch.zeros_like(u)
        for sign in signs:
            phase = self.spiking_phase if isinstance(block, SpikingDenseHopfield) else self.local_phase
            grads, ds1, record["nudged+" if sign > 0 else "nudged-"] = phase(block, u, s, nudge(sign), w)
            totals = [acc + sign * g for acc, g in zip(totals, grads)]
            input_change = input_change + sign * ds1
        grad_u = -input_change * per_sample(w, u) / denom if need_input else None
        return grad_u, [-g / denom for g in totals]

    def spiking_phase(self, block: SpikingDenseHopfield, u: Tensor, s: State, nudge, w: Tensor
                      ) -> tuple[list[Tensor], Tensor, RelaxStats]:
        """One nudged phase of spiking dynamics with the spike-triggered updates accumulated:
        (sum of updates per parameter of the block, change of the first layer's trace, stats)."""
        if self.tol is not None:
            raise ValueError(f"{self.name} ({block.block_name}): tol must be None on a spiking block (its traces "
                             f"fluctuate; the nudged phase runs exactly T2 steps), got {self.tol!r}")
        h = block.spike_value
        acc = {id(p): torch.zeros_like(p) for p in block.parameters()}

        def on_step(t: int, before: State, after: State, spikes: list[Tensor]) -> None:
            changes = [b - a for a, b in zip(before, after)]
            for l, c in enumerate(block.couplings):
                lin = c.linear
                acc[id(lin.weight)] += spike_pair_update(h * spikes[l], changes[l], h * spikes[l + 1],
                                                         changes[l + 1], w)
                if lin.bias is not None:
                    acc[id(lin.bias)] += (changes[l + 1] * per_sample(w, changes[l + 1])).sum(0)

        end, stats = block.simulate(u, s, self.T2, nudge, on_step=on_step)
        grads = [acc[id(p)] for p in block_parameters(block)]
        return grads, end[0] - s[0], stats

    def local_phase(self, block: EnergyBlock, u: Tensor, s: State, nudge, w: Tensor
                    ) -> tuple[list[Tensor], Tensor, RelaxStats]:
        """One nudged phase of a rate-based block with continual EP's local differences
        dPhi/dtheta(s_{t+1}) - dPhi/dtheta(s_t) accumulated at every step."""
        params = block_parameters(block)
        acc = [torch.zeros_like(p) for p in params]
        prev = [s]
        weights = w.expand(u.shape[0])
        held = held_routing(block, s, self.name) if self.pool == "held" else None
        phi = block.phi if held is None else held.phi

        def callback(t: int, new: State) -> None:
            if params:
                with torch.enable_grad():
                    diff = phi(new, u) - phi(prev[0], u)
                    grads = torch.autograd.grad(diff, params, grad_outputs=weights, allow_unused=True)
                for a, g in zip(acc, grads):
                    if g is not None:
                        a += g
            prev[0] = new

        end, stats = block.relax(u, s, T=self.T2, tol=self.tol, nudge=nudge, callback=callback,
                                 preactivations=None if held is None else held.preactivations)
        return acc, end[0] - s[0], stats
