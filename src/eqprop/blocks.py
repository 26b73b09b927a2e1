"""Energy-based blocks: energies and their relaxation to equilibrium.

An `EnergyBlock` holds layers s = (s_1, ..., s_L), receives an input current u (shaped
like s_1) and has energy E(s; u) = sum_l G(s_l) - Phi(s; u). Its equilibrium is reached
by the fixed-point iteration s_l <- sigma_l(dPhi/ds_l), without autograd (docs/theory.md).

To define a new block, subclass `EnergyBlock` and write only `phi` (per-sample primitive
function) and `state_shapes`; the fixed-point steps then use autograd on `phi` as a
generic fallback. `HopfieldBlock` overrides `preactivations` with the analytical step
(couplings T_l and their adjoints).

How the block's backward is computed is the job of its `estimator` (eqprop.estimators),
an immutable object that can be swapped at run time: `block.estimator = EP(beta=0.1)` or
`eqprop.set_estimator(block, "ep", beta=0.1)`.
"""
from __future__ import annotations

import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import Activation, Identity, make_activation
from .couplings import ConvCoupling, Coupling, DenseCoupling, init_module_, is_channels_last
from .devices import Device, DeviceStepper, make_device
from .solvers import AndersonMixer
from .validate import check_choice, check_nonnegative_int, check_positive, check_positive_int, check_tol

State = list[Tensor]
RelaxRecord = dict  # phase name -> RelaxStats, one per forward (see EnergyBlock.forward)

__all__ = ["State", "RelaxStats", "RelaxRecord", "DivergenceError", "relative_change", "EnergyBlock",
           "HopfieldBlock", "DenseHopfield", "ConvHopfield", "targets", "current_target", "output_block", "target_like",
           "RELAX_SETTINGS"]

RELAX_SETTINGS = ("T1", "tol", "update", "first", "check_every", "relax_dtype", "check_inputs", "device", "omega",
                  "anderson", "compile_sweep")

# each block compiles its sweep once per (batch shape, nudged or not, held output, dtype);
# past this many graphs for one block, torch.compile would fall back to eager sweeps
COMPILE_RECOMPILE_LIMIT = 32


def _compiled_sweep(block: EnergyBlock, s: State, u: Tensor, nudge: Tensor | None, hold_last: bool) -> State:
    """One sweep as a pure function of the states (no memoised forward maps): the unit that
    `compile_sweep` hands to torch.compile, so the tolerance checks stay outside the graph."""
    return block.step(s, u, nudge, None, hold_last)


class DivergenceError(RuntimeError):
    """A relaxation produced a non-finite state."""


@dataclass(frozen=True)
class RelaxStats:
    """What one relaxation did: iterations run, last relative change, whether tol was met
    (None when no tolerance was asked for)."""

    iters: int
    residual: float
    converged: bool | None

    def as_dict(self) -> dict:
        return asdict(self)


def relative_change(new: State, old: State) -> Tensor:
    """mean over layers of ||new_l - old_l|| / ||old_l|| (a 0-dim tensor, no sync)."""
    tiny = torch.finfo(torch.float32).tiny
    terms = [torch.linalg.vector_norm((n - o).float()) / torch.linalg.vector_norm(o.float()).clamp_min(tiny)
             for n, o in zip(new, old)]
    return torch.stack(terms).mean()


def _memory_format(x: Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


# ---- targets of the rules that need one (cost on the output layer, clamping) -------------

_TARGETS: contextvars.ContextVar[tuple] = contextvars.ContextVar("eqprop_targets", default=())


def output_block(model: nn.Module) -> EnergyBlock:
    """The block that holds the model's output layer: the model itself, or the last module
    of a sequential model when it is an `EnergyBlock`."""
    if isinstance(model, EnergyBlock):
        return model
    if isinstance(model, nn.Sequential) and len(model) > 0:
        last = model[-1]
        if isinstance(last, EnergyBlock):
            return last
        if isinstance(last, nn.Sequential):
            return output_block(last)
        raise ValueError(f"targets: the model's last module is {type(last).__name__}, not an energy-based block; "
                         f"rules that need the target (cl, cpl, cost on the output layer) need a block that holds "
                         f"the output layer (no readout after it)")
    blocks = [m for m in model.modules() if isinstance(m, EnergyBlock)]
    if not blocks:
        raise ValueError(f"targets: {type(model).__name__} holds no energy-based block")
    return blocks[-1]


def check_target(y: object) -> Tensor:
    """A target is integer labels (batch,) or a real tensor shaped like the output layer."""
    if not isinstance(y, Tensor):
        raise TypeError(f"targets: y must be a tensor, got {type(y).__name__}")
    if y.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        if y.dim() != 1:
            raise ValueError(f"targets: integer labels must have shape (batch,), got {tuple(y.shape)}")
    elif not y.is_floating_point():
        raise ValueError(f"targets: y must hold integer labels or real targets, got dtype {y.dtype}")
    return y.detach()


@contextmanager
def targets(model: nn.Module, y: Tensor) -> Iterator[EnergyBlock]:
    """Within the context, forwards of the block holding `model`'s output layer see the
    target y (one-hot/real like the output layer, or int labels (batch,)).

    The target is read when the block's forward runs and kept with that forward's graph, so
    the backward may run after the context has closed. The context is a `contextvars`
    variable: each thread (and asyncio task) has its own. `FFEBM.forward(x, target=y)` and
    `block(u, target=y)` pass the target explicitly instead.
    """
    block = output_block(model)
    token = _TARGETS.set(_TARGETS.get() + ((block, check_target(y)),))
    try:
        yield block
    finally:
        _TARGETS.reset(token)


def target_like(block: EnergyBlock, y: Tensor, out: Tensor, rule: str = "target") -> Tensor:
    """The target as a tensor shaped like the output layer `out` (one-hot for labels);
    raises naming the block when it cannot be."""
    if not y.is_floating_point():
        if out.dim() != 2:
            raise ValueError(f"{rule} ({block.block_name}): integer labels need a flat output layer (batch, K), "
                             f"the output layer has shape {tuple(out.shape)}; give a target of that shape")
        if y.shape[0] != out.shape[0]:
            raise ValueError(f"{rule} ({block.block_name}): {y.shape[0]} labels for a batch of {out.shape[0]}")
        k = out.shape[1]
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= k):
            raise ValueError(f"{rule} ({block.block_name}): labels must lie in [0, {k}), got range "
                             f"[{int(y.min())}, {int(y.max())}]")
        return F.one_hot(y.long().to(out.device), k).to(out.dtype)
    if tuple(y.shape) != tuple(out.shape):
        raise ValueError(f"{rule} ({block.block_name}): target of shape {tuple(y.shape)} does not match the output "
                         f"layer of shape {tuple(out.shape)}")
    return y.to(device=out.device, dtype=out.dtype)


def current_target(block: EnergyBlock) -> Tensor | None:
    """The target set by the innermost `targets` context for this block, if any."""
    for b, y in reversed(_TARGETS.get()):
        if b is block:
            return y
    return None


class EnergyBlock(nn.Module):
    """Base class of energy-based (analog) blocks.

    Settings (plain attributes, changeable at any time, validated at every relaxation):
      T1:           iteration cap of the free phase
      tol:          stop earlier when the relative change falls below it (None: run T1)
      update:       'sync' (all layers at once) or 'async' (one parity, then the other)
      first:        'odd' or 'even': which parity an async sweep updates first
      check_every:  how often (in iterations) the tolerance is checked; each check is one
                    host-device synchronisation on a GPU (default: 1 on CPU, 10 on GPU)
      relax_dtype:  run relaxations in this dtype (e.g. torch.bfloat16) under autocast;
                    states come back in the input's dtype, so EP differences and
                    parameter gradients stay in full precision
      check_inputs: refuse input currents holding NaN/inf (checked with the relaxation's
                    one synchronisation, so it costs no extra one)
      device:       analog non-idealities (an eqprop.devices.Device, or a mapping of its
                    settings; None: the ideal circuit). They act in every relaxation,
                    free and nudged phases alike; None costs nothing
      estimator:    how the backward is computed (an eqprop.estimators object, or None for
                    a block used without gradients)
      omega:        over-relaxation factor of the sweep, in (0, 2): each updated layer moves
                    to s + omega * (sigma(dPhi/ds) - s), so later layers of an async sweep see
                    the over-relaxed ones (SOR); 1 is the plain iteration. Same fixed points
      anderson:     history length m of Anderson acceleration of the relaxation (0: off):
                    each iteration mixes the last m sweep outputs with per-sample weights
                    that minimise the combined residual; stops on the same criterion
                    (relative change of one plain sweep). Same fixed points
      omega and anderson are numerical solvers, not circuits: a device model refuses them.
      compile_sweep: run the relaxation's sweeps through torch.compile (one graph per sweep,
                    compiled on first use per batch shape and phase kind; fused bias,
                    activation and over-relaxation kernels on a GPU). The tolerance checks, the
                    nudge and Anderson mixing stay eager; forward maps are not memoised
                    across sweeps (a routed coupling re-pools once per sweep). Not with a
                    device model (its read noise is drawn per relaxation)
    After each forward, `last_relax` holds the `RelaxStats` of its phases: 'free', and the
    phases the estimator's backward ran ('nudged+', 'nudged-', 'adjoint', ...).

    Under torch.autocast (mixed-precision feedforward parts) the block runs with autocast
    off and an input current in its parameters' dtype, so forward and backward agree.
    """

    def __init__(self, activations: Sequence[Activation], T1: int = 20, tol: float | None = None,
                 update: str = "async", first: str = "odd", check_every: int | None = None,
                 estimator: object = None, name: str | None = None, relax_dtype: torch.dtype | None = None,
                 check_inputs: bool = True, device: Device | dict | None = None, omega: float = 1.0,
                 anderson: int = 0, compile_sweep: bool = False):
        super().__init__()
        self.activations = list(activations)
        self.omega, self.anderson = omega, anderson
        self.compile_sweep = compile_sweep
        self._compiled: Callable | None = None  # the torch.compile'd sweep, built at first use
        self.relax_dtype = relax_dtype
        self.T1, self.tol, self.update, self.first, self.check_every = T1, tol, update, first, check_every
        self.check_inputs = check_inputs
        self.block_name = name or type(self).__name__
        self.device = device
        self.validate()
        self.estimator = estimator
        self.last_relax: RelaxRecord = {}

    estimator_kind = "block"  # what an estimator's check_applicable is asked about

    # ---- analog device (eqprop.devices) ------------------------------------------------
    @property
    def device(self) -> Device | None:
        return self._device

    @device.setter
    def device(self, value: Device | dict | None) -> None:
        dev = make_device(value, getattr(self, "block_name", type(self).__name__))
        self._device = dev
        self._device_on = dev is not None and not dev.ideal          # any non-ideality: the hooks run
        self._device_reads = self._device_on and dev.on_reads        # relaxations read non-ideal weights
        self._device_gen: torch.Generator | None = None              # seeds of draws, created at first use
        self._device_step_seed: int | None = None                    # the read-noise draw of this step

    def device_weights(self) -> list[Tensor]:
        """The weights the device stores as conductances (none for a generic block)."""
        return []

    def _device_seed(self) -> int:
        """A fresh seed from the block's generator (seeded by the device's seed and the name)."""
        if self._device_gen is None:
            self._device_gen = torch.Generator().manual_seed(self.device.seed_for(self.block_name))
        return int(torch.randint(2 ** 62, (), generator=self._device_gen))

    def device_rng_state(self) -> tuple[Tensor | None, int | None]:
        """The device's random state, for checkpoints: its generator's state (a byte tensor;
        None before the first draw) and the current step's read-noise seed (None before the
        first forward)."""
        gen = self._device_gen
        return (None if gen is None else gen.get_state()), self._device_step_seed

    def set_device_rng_state(self, generator: Tensor | None, step_seed: int | None) -> None:
        """Restore `device_rng_state`'s values (RuntimeError for a byte tensor that is no
        generator state)."""
        gen = None
        if generator is not None:
            gen = torch.Generator()
            gen.set_state(generator.cpu())
        self._device_gen, self._device_step_seed = gen, step_seed

    def _device_generator(self, seed: int, like: Tensor) -> torch.Generator:
        return torch.Generator(device=like.device).manual_seed(seed)

    def device_stepper(self, seed: int | None = None) -> DeviceStepper:
        """A stepper whose couplings use the weights as the device reads them: the step's
        draw (resample='step') or `seed`'s."""
        if seed is None:
            if self._device_step_seed is None:
                self._device_step_seed = self._device_seed()
            seed = self._device_step_seed
        weights = self.device_weights()
        gen = self._device_generator(seed, weights[0]) if weights else None
        return DeviceStepper(self.couplings, [self.device.read(w, gen) for w in weights])

    @torch.no_grad()
    def program_(self, previous: list[Tensor] | None = None) -> None:
        """Write the device weights: `previous` are the stored values before the optimizer's
        step (None: program the current values from zero, as at the start)."""
        if not self._device_on:
            return
        weights = self.device_weights()
        if not weights:
            return
        if not all(isinstance(w, nn.Parameter) for w in weights):
            raise ValueError(f"{self.block_name}: device writes (g_max, levels, program_noise, asymmetry, drift) need "
                             f"weights stored as parameters; this block's weights are computed (e.g. binary "
                             f"weights): use only read_noise and the converters, or no device")
        gen = self._device_generator(self._device_seed(), weights[0])
        olds = [None] * len(weights) if previous is None else previous
        if len(olds) != len(weights):
            raise ValueError(f"{self.block_name}: program_ got {len(olds)} previous weights for {len(weights)}")
        for w, old in zip(weights, olds):
            w.copy_(self.device.write(old, w, gen))

    @property
    def estimator(self) -> object:
        return self._estimator

    @estimator.setter
    def estimator(self, est: object) -> None:
        if est is not None:
            if not (callable(getattr(est, "attach", None)) and callable(getattr(est, "check_applicable", None))):
                raise TypeError(f"{self.block_name}: an estimator must be an eqprop estimator object (e.g. "
                                f"eqprop.EP()), got {type(est).__name__}; build one by name with "
                                f"eqprop.make_estimator")
            est.check_applicable("block", self.block_name)
        self._estimator = est

    # ---- what a block must define ---------------------------------------------------
    def state_shapes(self, in_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Per-layer shapes (without batch) for an input current of shape `in_shape`."""
        raise NotImplementedError

    def phi(self, s: State, u: Tensor) -> Tensor:
        """Primitive function Phi(s; u, theta) per sample, shape (batch,)."""
        raise NotImplementedError

    # ---- derived quantities -----------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.activations)

    def energy(self, s: State, u: Tensor) -> Tensor:
        """E = sum_l G(s_l) - Phi per sample (batch,)."""
        g = sum(act.potential(x) for act, x in zip(self.activations, s))
        return g - self.phi(s, u)

    def preactivations(self, s: State, u: Tensor, layers: Sequence[int], nudge: Tensor | None = None,
                       cache: dict | None = None) -> dict[int, Tensor]:
        """dPhi/ds_l for each l in `layers` (0-based), plus `nudge` on the last layer.

        Generic fallback: autograd of `phi` at fixed s. Subclasses override it with the
        analytical form. Under grad mode (BPTT, ID) the result is itself differentiable in
        s, u and the parameters; in a relaxation (no grad) no graph is kept.
        """
        if torch.is_grad_enabled():
            # clones: partial derivatives at fixed other layers even when one layer's state was
            # computed from another's (an async sweep under BPTT)
            leaves = [x.clone() if x.requires_grad else x.detach().requires_grad_(True) for x in s]
            grads = torch.autograd.grad(self.phi(leaves, u).sum(), leaves, allow_unused=True, create_graph=True)
        else:
            with torch.enable_grad():
                leaves = [x.detach().requires_grad_(True) for x in s]
                grads = torch.autograd.grad(self.phi(leaves, u.detach()).sum(), leaves, allow_unused=True)
        out = {}
        for l in layers:
            g = grads[l] if grads[l] is not None else torch.zeros_like(s[l])
            if nudge is not None and l == len(s) - 1:
                g = g + nudge
            out[l] = g
        return out

    def fixed_point_map(self, s: State, u: Tensor, nudge: Tensor | None = None) -> State:
        """f(s) = sigma(dPhi/ds) for all layers at once: the map whose fixed point is s*."""
        pre = self.preactivations(s, u, list(range(len(s))), nudge)
        return [self.activations[l](pre[l]) for l in range(len(s))]

    def step(self, s: State, u: Tensor, nudge: Tensor | None = None, cache: dict | None = None,
             hold_last: bool = False, preactivations: Callable | None = None) -> State:
        """One sweep of the fixed-point iteration (sync or async); returns new states.

        hold_last keeps the last layer where it is (a clamped output); `preactivations`
        replaces the block's own (same signature), e.g. for a reduced-precision stepper.
        """
        L = len(s)
        if self.update == "sync":
            groups = [range(L)]
        else:
            odd, even = range(0, L, 2), range(1, L, 2)  # layers 1, 3, ... are indices 0, 2, ...
            groups = [odd, even] if self.first == "odd" else [even, odd]
        if preactivations is None and self._device_on:  # steps outside `relax` (BPTT, TBP)
            if cache is not None and "device" in cache:
                preactivations, u = cache["device"]
            else:
                u = self.device.dac(u)
                preactivations = self.device_stepper().preactivations if self._device_reads else None
                if cache is not None:
                    cache["device"] = (preactivations, u)
        pre_fn = preactivations or self.preactivations
        omega = self.omega
        s = list(s)
        for group in groups:
            layers = [l for l in group if not (hold_last and l == L - 1)]
            if layers:
                for l, z in pre_fn(s, u, layers, nudge, cache).items():
                    new = self.activations[l](z)
                    s[l] = new if omega == 1 else torch.lerp(s[l], new, omega)
        return s

    def compiled_sweep(self) -> Callable[[EnergyBlock, State, Tensor, Tensor | None, bool], State]:
        """This block's torch.compile'd sweep, `(block, s, u, nudge, hold_last) -> new s`.

        One compiled function per block with its own cache of graphs (isolated recompiles),
        so many blocks or phase kinds do not exhaust one shared recompile limit; a graph
        break is an error (fullgraph), never a silent fall back to eager sweeps."""
        if self._compiled is None:
            self._compiled = torch.compile(_compiled_sweep, fullgraph=True, recompile_limit=COMPILE_RECOMPILE_LIMIT,
                                           isolate_recompiles=True)
        return self._compiled

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        # a compiled sweep is rebuilt on use: never pickled, and a deep copy compiles its own
        return {**state, "_compiled": None}

    def init_state(self, u: Tensor) -> State:
        """Zero states; image-shaped layers take the memory format of an image-shaped u, so a
        channels-last input (e.g. the trainer's `channels_last=true`) keeps every convolution,
        pooling and un-pooling of the relaxation in that layout (no format copies per sweep)."""
        fmt = _memory_format(u)
        return [torch.empty((u.shape[0], *shape), dtype=u.dtype, device=u.device,
                            memory_format=fmt if len(shape) == 3 else torch.contiguous_format).zero_()
                for shape in self.state_shapes(tuple(u.shape[1:]))]

    @torch.no_grad()
    def relax(self, u: Tensor, s0: State | None = None, T: int | None = None, tol: float | None | str = "block",
              nudge: Tensor | Callable[[Tensor], Tensor] | None = None, hold_last: bool = False,
              callback: Callable[[int, State], None] | None = None, preactivations: Callable | None = None,
              ) -> tuple[State, RelaxStats]:
        """Run the fixed-point iteration from `s0` (zeros by default) for at most T steps.

        tol='block' uses the block's tolerance; None runs exactly T steps.
        nudge: extra current on the last layer, a tensor or a function of the last layer's
        state re-evaluated every step (e.g. -beta * dC/ds_L for a cost C on the output).
        hold_last: the last layer keeps its value from s0 (a clamped output).
        callback(t, s) is called after every step (for analyses; free when absent).
        preactivations: replaces the block's own in every step (see `step`).
        Returns the state and its `RelaxStats`; on a GPU this costs one host-device
        synchronisation (plus one per tolerance check).
        """
        self.validate()
        T = self.T1 if T is None else T
        tol = self.tol if tol == "block" else tol
        check_positive_int(self.block_name, "T", T)
        check_tol(self.block_name, tol)
        s = self.init_state(u) if s0 is None else [x.detach() for x in s0]
        if self._device_on:
            return self._device_relax(u, s, T, tol, nudge, hold_last, callback, preactivations)
        out_dtype = u.dtype
        if self.relax_dtype is not None and self.relax_dtype != u.dtype and preactivations is None:
            low = self.relax_dtype
            if callable(nudge):
                force = nudge

                def nudge(sl: Tensor) -> Tensor:
                    return force(sl.to(out_dtype)).to(low)
            elif nudge is not None:
                nudge = nudge.to(low)
            with torch.autocast(u.device.type, dtype=low):
                s, stats = self._relax_loop(u.to(low), [x.to(low) for x in s], T, tol, nudge, hold_last, callback,
                                            None, u)
            return [x.to(out_dtype) for x in s], stats
        return self._relax_loop(u, s, T, tol, nudge, hold_last, callback, preactivations, u)

    def _device_relax(self, u: Tensor, s: State, T: int, tol: float | None, nudge, hold_last: bool,
                      callback: Callable[[int, State], None] | None, preactivations: Callable | None
                      ) -> tuple[State, RelaxStats]:
        """A relaxation through the device: the input current through the DACs, the couplings
        with the weights as read, every layer's final state through the ADCs."""
        dev = self.device
        if preactivations is None and self._device_reads:
            seed = self._device_seed() if dev.resample == "relaxation" else None
            preactivations = self.device_stepper(seed).preactivations
        s, stats = self._relax_loop(dev.dac(u), s, T, tol, nudge, hold_last, callback, preactivations, u)
        return dev.adc(s), stats

    def _relax_loop(self, u: Tensor, s: State, T: int, tol: float | None, nudge, hold_last: bool,
                    callback: Callable[[int, State], None] | None, preactivations: Callable | None,
                    u_given: Tensor) -> tuple[State, RelaxStats]:
        every = self.check_every or (1 if u.device.type == "cpu" else 10)
        cache: dict = {}
        mixer = AndersonMixer(self.anderson) if self.anderson else None
        compiled = self.compiled_sweep() if self.compile_sweep and preactivations is None else None
        t = 0
        converged = None if tol is None else False
        change = None
        while t < T:
            current = nudge(s[-1]) if callable(nudge) else nudge
            if compiled is not None:
                new = compiled(self, s, u, current, hold_last)
            else:
                new = self.step(s, u, current, cache, hold_last, preactivations)
            t += 1
            if callback is not None:
                callback(t, new)
            if tol is not None and (t % every == 0 or t == T):
                change = relative_change(new, s)
                if change.item() < tol:
                    s, converged = new, True
                    break
            elif t == T:
                change = relative_change(new, s)
            if mixer is not None and t < T:
                mixed = mixer.mix(s, new)
                if hold_last:
                    mixed[-1] = new[-1]
                new = mixed
            s = new
        # the one synchronisation of a fixed-T relaxation: residual and input finiteness together
        flags = [change.float()]
        if self.check_inputs:  # a NaN or inf anywhere makes the sum non-finite: one pass, not isfinite's four
            flags.append(u_given.sum(dtype=torch.float32 if u_given.element_size() < 4 else None).float())
        values = torch.stack(flags).tolist()
        residual = values[0]
        if self.check_inputs and not math.isfinite(values[1]) and not torch.isfinite(u_given).all():
            raise ValueError(f"{self.block_name}: input current holds NaN or inf values")
        if not math.isfinite(residual):
            bad = [i + 1 for i, x in enumerate(s) if not torch.isfinite(x).all()]
            if bad:
                raise DivergenceError(
                    f"{self.block_name}: relaxation diverged (non-finite state in layer(s) {bad} after {t} "
                    f"iterations); lower the learning rate or the weight scale, or use a smaller slope"
                    + (f" (over-relaxation omega={self.omega} can diverge where omega=1 converges)"
                       if self.omega != 1 else "")
                )
        return s, RelaxStats(t, residual, converged)

    # ---- settings and input checks --------------------------------------------------
    def validate(self) -> None:
        """Raise a ValueError naming this block for any invalid setting."""
        check_positive_int(self.block_name, "T1", self.T1)
        check_tol(self.block_name, self.tol)
        check_positive_int(self.block_name, "check_every", self.check_every, allow_none=True)
        check_choice(self.block_name, "update", self.update, ("sync", "async"))
        check_choice(self.block_name, "first", self.first, ("odd", "even"))
        check_positive(self.block_name, "omega", self.omega, below=2)
        check_nonnegative_int(self.block_name, "anderson", self.anderson)
        if not isinstance(self.compile_sweep, bool):
            raise ValueError(f"{self.block_name}: compile_sweep must be True or False, got {self.compile_sweep!r}")
        if not isinstance(self.check_inputs, bool):
            raise ValueError(f"{self.block_name}: check_inputs must be True or False, got {self.check_inputs!r}")
        if self.relax_dtype is not None and not (isinstance(self.relax_dtype, torch.dtype)
                                                 and self.relax_dtype.is_floating_point):
            raise ValueError(f"{self.block_name}: relax_dtype must be a floating-point torch.dtype or None, "
                             f"got {self.relax_dtype!r}")
        if self._device_on:
            if self.omega != 1 or self.anderson:
                raise ValueError(f"{self.block_name}: omega and anderson are numerical solvers, not circuits; a "
                                 f"device model runs the plain iteration (got omega={self.omega!r}, "
                                 f"anderson={self.anderson!r}): set omega=1 and anderson=0, or device=None")
            if self.compile_sweep:
                raise ValueError(f"{self.block_name}: compile_sweep does not apply to a device model (its couplings "
                                 f"read noisy weights drawn per relaxation); set compile_sweep=False or device=None")
            if self.relax_dtype is not None:
                raise ValueError(f"{self.block_name}: a device model runs the relaxation in the parameters' dtype; "
                                 f"set relax_dtype=None (got {self.relax_dtype!r}) or device=None")
            if (self.device.on_reads or self.device.on_writes) and not self.device_weights():
                raise ValueError(f"{self.block_name}: device settings on weights (g_max, levels, read_noise, "
                                 f"program_noise, asymmetry, drift) need a block with couplings (a HopfieldBlock); "
                                 f"{type(self).__name__} can take only the converters (adc_bits, dac_bits)")

    def configure(self, **settings) -> EnergyBlock:
        """Set relaxation settings (see the class docstring); nothing changes if one is invalid."""
        unknown = set(settings) - set(RELAX_SETTINGS)
        if unknown:
            raise ValueError(f"{self.block_name}: unknown relaxation setting(s) {sorted(unknown)}; "
                             f"valid: {', '.join(RELAX_SETTINGS)}")
        old = {k: getattr(self, k) for k in settings}
        try:
            for k, v in settings.items():
                setattr(self, k, v)
            self.validate()
        except ValueError:
            for k, v in old.items():
                setattr(self, k, v)
            raise
        return self

    def check_input(self, u: Tensor) -> None:
        """Raise a ValueError if u does not fit the block's first layer."""
        if not isinstance(u, Tensor) or not u.is_floating_point():
            raise TypeError(f"{self.block_name}: the input current must be a floating-point tensor, got "
                            f"{getattr(u, 'dtype', type(u).__name__)}")
        if u.dim() < 2:
            raise ValueError(f"{self.block_name}: the input current must be (batch, ...), got shape {tuple(u.shape)}")
        try:
            self.state_shapes(tuple(u.shape[1:]))
        except ValueError as e:
            raise ValueError(f"{self.block_name}: input current of shape {tuple(u.shape)} does not fit: {e}") from None

    # ---- forward: free phase, then the estimator wires the backward -------------------
    def forward(self, u: Tensor, target: Tensor | None = None) -> Tensor:
        """The free equilibrium's last layer, with the estimator's backward.

        target: for rules that need one (see `targets`); defaults to the innermost
        `targets` context naming this block.
        """
        if torch.is_autocast_enabled(u.device.type):
            dtype = next((p.dtype for p in self.parameters()), u.dtype)
            with torch.autocast(u.device.type, enabled=False):
                return self.forward(u.to(dtype), target)
        self.check_input(u)  # the settings are validated by the relaxation
        target = check_target(target) if target is not None else current_target(self)
        if self._device_reads:
            self._device_step_seed = self._device_seed()  # the read noise of this step (resample='step')
        s, stats = self.relax(u.detach())
        if target is not None:
            target_like(self, target, s[-1])  # shape and label range, before any backward
        record: RelaxRecord = {"free": stats}
        self.last_relax = record
        if self.estimator is None:
            if torch.is_grad_enabled() and (u.requires_grad or any(p.requires_grad for p in self.parameters())):
                raise RuntimeError(f"{self.block_name}: no estimator is set, so no gradient can flow through this "
                                   f"block; set one with eqprop.set_estimator(block, 'ep') or block.estimator = "
                                   f"eqprop.EP(), or run under torch.no_grad()")
            return s[-1]
        return self.estimator.attach(self, u, s, target=target, record=record)

    def extra_repr(self) -> str:
        dev = "" if self.device is None else f", device={self.device!r}"
        return (f"T1={self.T1}, tol={self.tol}, update={self.update!r}, first={self.first!r}, "
                f"estimator={self.estimator!r}{dev}")


class HopfieldBlock(EnergyBlock):
    """Layered deep Hopfield block: Phi = <s_1, u> + sum_l <s_{l+1}, T_l(s_l) + b_l>.

    `couplings[l]` maps layer l to layer l+1; the relaxation uses their forward maps and
    adjoints only (the reference code's "analytical" stepper).
    """

    def __init__(self, couplings: Sequence[Coupling], activations: Sequence[Activation], **kw):
        if len(activations) != len(couplings) + 1:
            raise ValueError(f"HopfieldBlock: {len(couplings)} couplings need {len(couplings) + 1} activations, "
                             f"got {len(activations)}")
        device = kw.pop("device", None)
        super().__init__(activations, **kw)
        self.couplings = nn.ModuleList(couplings)
        if device is not None:
            self.configure(device=device)

    def device_weights(self) -> list[Tensor]:
        return [c.weight for c in self.couplings]

    def state_shapes(self, in_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        shapes = [tuple(in_shape)]
        for c in self.couplings:
            shapes.append(tuple(c.out_shape(shapes[-1])))
        return shapes

    def phi(self, s: State, u: Tensor) -> Tensor:
        out = (s[0] * u).flatten(1).sum(1)
        for l, c in enumerate(self.couplings):
            out = out + c.pairing(s[l], s[l + 1])
        return out

    def _forward_map(self, s: State, l: int, cache: dict | None) -> tuple[Tensor, object]:
        """T_l(s_l), memoised on the identity of s_l (valid until s_l is replaced)."""
        if cache is not None:
            hit = cache.get(l)
            if hit is not None and hit[0] is s[l]:
                return hit[1]
        out = self.couplings[l](s[l])
        if cache is not None:
            cache[l] = (s[l], out)
        return out

    def preactivations(self, s: State, u: Tensor, layers: Sequence[int], nudge: Tensor | None = None,
                       cache: dict | None = None) -> dict[int, Tensor]:
        L = len(s)
        out = {}
        for l in layers:
            z = u if l == 0 else self._forward_map(s, l - 1, cache)[0]
            if l < L - 1:
                coupling = self.couplings[l]
                aux = self._forward_map(s, l, cache)[1] if coupling.routed else None
                z = z + coupling.adjoint(s[l + 1], aux, s[l].shape)
            if nudge is not None and l == L - 1:
                z = z + nudge
            out[l] = z
        return out


def _layer_activations(n: int, activation: str | Activation, slope: float, last_linear: bool) -> list[Activation]:
    acts = [make_activation(activation, slope) for _ in range(n)]
    if last_linear:
        acts[-1] = Identity()
    return acts


class DenseHopfield(HopfieldBlock):
    """Dense deep Hopfield block with layers of the given widths (widths[0] = input size)."""

    def __init__(self, widths: Sequence[int], activation: str | Activation = "hardsigmoid", slope: float = 1.0,
                 last_linear: bool = False, init: str = "kaiming", alpha: float = 0.5, **kw):
        widths = list(widths)
        if len(widths) < 1 or any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for w in widths):
            raise ValueError(f"DenseHopfield: widths must be positive integers, got {widths}")
        couplings = [DenseCoupling(a, b) for a, b in zip(widths[:-1], widths[1:])]
        super().__init__(couplings, _layer_activations(len(widths), activation, slope, last_linear), **kw)
        self.widths = widths
        init_module_(self, init, alpha)


class ConvHopfield(HopfieldBlock):
    """Convolutional deep Hopfield block: 3x3 convolutions with optional 2x2 max-pooling
    per coupling, then optional dense layers.

    channels: per-layer channel counts, channels[0] is the input current's channels.
    pools:    one character per coupling between conv layers, 'm' (max-pool) or '-'.
    fc:       widths of dense layers after the last conv layer (needs `in_size`).
    in_size:  spatial size (H, W) of the input current; required only when fc is given.
    """

    def __init__(self, channels: Sequence[int], pools: str = "", fc: Sequence[int] = (),
                 in_size: int | tuple[int, int] | None = None, activation: str | Activation = "hardsigmoid",
                 slope: float = 1.0, last_linear: bool = False, init: str = "goe", variance: float = 8.351e-5,
                 alpha: float = 0.5, **kw):
        channels, fc = list(channels), list(fc)
        if not channels or any(isinstance(c, bool) or not isinstance(c, int) or c <= 0 for c in channels + fc):
            raise ValueError(f"ConvHopfield: channels (at least one) and fc must be positive integers, got "
                             f"channels={channels} fc={fc}")
        if len(pools) != len(channels) - 1 or any(p not in "m-" for p in pools):
            raise ValueError(f"ConvHopfield: pools must have one 'm' or '-' per conv coupling "
                             f"({len(channels) - 1}), got {pools!r}")
        couplings: list[Coupling] = [ConvCoupling(a, b, p == "m")
                                     for a, b, p in zip(channels[:-1], channels[1:], pools)]
        if fc:
            if in_size is None:
                raise ValueError("ConvHopfield: dense layers (fc) need in_size, the input's spatial size")
            h, w = (in_size, in_size) if isinstance(in_size, int) else in_size
            if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
                raise ValueError(f"ConvHopfield: in_size must be a positive int or (H, W), got {in_size!r}")
            for p in pools:
                h, w = (h // 2, w // 2) if p == "m" else (h, w)
            if h < 1 or w < 1:
                raise ValueError(f"ConvHopfield: pools {pools!r} halve an input of size {in_size} below one pixel; "
                                 f"in_size must allow {pools.count('m')} 2x2 poolings")
            widths = [channels[-1] * h * w, *fc]
            couplings += [DenseCoupling(a, b) for a, b in zip(widths[:-1], widths[1:])]
        n_layers = len(channels) + len(fc)
        super().__init__(couplings, _layer_activations(n_layers, activation, slope, last_linear), **kw)
        self.channels, self.pools, self.fc = channels, pools, fc
        init_module_(self, init, alpha, variance)
