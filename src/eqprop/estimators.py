"""Gradient estimators: how the backward of an energy-based block (or a Hamiltonian unit) is
computed. This module is the one place where the forward/backward cycle is wired.

An estimator is an immutable settings object, validated once when built. A block's forward
computes the free equilibrium s*, then calls

    estimator.attach(block, u, s*, target=..., record=...) -> output (the last layer)

which returns the output wired into autograd, so that an ordinary `loss.backward()` runs the
estimator: for EP, ID and the contrastive rules, one autograd.Function whose backward calls
`estimator.gradients(...)` (nothing of any trajectory is stored); BPTT and TBP run steps
with autograd instead. `record` is the forward's `RelaxRecord` (phase name -> RelaxStats):
the backward adds the statistics of the phases it runs to it, and `model.relax_stats()`
reads it.

  EP    Equilibrium Propagation in its three variants (centered, positive, negative): the
        nudged relaxations and the EP estimates for input and parameters;
  ID    implicit differentiation: the adjoint fixed point lambda = J^T lambda + delta;
  BPTT  T2 more steps from the free equilibrium with autograd on (for a Hamiltonian unit:
        autograd through every time step);
  RHEL  Recurrent Hamiltonian Echo Learning, for Hamiltonian units (eqprop.hamiltonian).

The theory of each is in docs/theory.md. More rules (contrastive learning, coupled
learning, truncated backprop) are in eqprop.rules; the registry of names is
eqprop.registry. To write a new rule, subclass `ContrastEstimator` and give `contrast`
(docs/extending.md).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from .blocks import EnergyBlock, RelaxRecord, RelaxStats, State, relative_change, target_like
from .couplings import is_channels_last
from .precision import check_precision, low_dtype, relax_with_precision
from .routing import held_routing
from .solvers import minres
from .validate import check_choice, check_nonnegative_int, check_positive, check_positive_int, check_tol

__all__ = ["Estimator", "ContrastEstimator", "Contrast", "EP", "ID", "BPTT", "RHEL", "VARIANTS", "NORMALIZE",
           "error_scale", "per_sample", "normalized_current", "loss_weights", "block_parameters", "ep_nudge"]

VARIANTS = ("centered", "positive", "negative")
NORMALIZE = ("sample", "batch", "none")
POOLS = ("free", "held")  # in-block pooling routes in the second phases (eqprop.routing)


def ep_nudge(owner: str, beta: float, normalize: str, block: EnergyBlock, s: State, delta: Tensor,
             target: Tensor | None) -> tuple[Callable[[int], Tensor | Callable[[Tensor], Tensor]], Tensor]:
    """EP's nudge of sign +1/-1 on the last layer, and the loss's per-sample weights w. With a
    target: the force of the cost 1/2 ||s_L - y||^2, -sign beta (s_L - y), a function of the
    last layer re-evaluated at every step; without one: -sign beta delta / |delta|, the error
    current normalised as `normalize` says (a tensor)."""
    if target is not None:
        y = target_like(block, target, s[-1], owner)
        w = loss_weights(delta, s[-1], y, owner, block)
        return (lambda sign: (lambda sl: -sign * beta * (sl - y))), w
    delta_hat, w = normalized_current(delta, normalize)
    return (lambda sign: -sign * beta * delta_hat), w


def block_parameters(block: torch.nn.Module) -> list[Tensor]:
    """The parameters of `block` that require gradients (what an estimator differentiates)."""
    return [p for p in block.parameters() if p.requires_grad]


def error_scale(delta: Tensor, mode: str) -> Tensor:
    """Scale c with delta = c * delta_hat: shape (batch,) or ().

    'sample': per-sample norm (the nudge no longer depends on the loss reduction or the
    batch size); 'batch': mean per-sample norm; 'none': 1.
    """
    if mode == "none":
        return torch.ones((), dtype=delta.dtype, device=delta.device)
    norms = torch.linalg.vector_norm(delta, dim=tuple(range(1, delta.dim())))  # no copy of a channels-last delta
    if mode == "batch":
        return norms.mean()
    return norms


def per_sample(scale: Tensor, x: Tensor) -> Tensor:
    """Reshape a (batch,) or () scale to broadcast against x."""
    return scale.view(-1, *([1] * (x.dim() - 1))) if scale.dim() else scale


def normalized_current(delta: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """(delta_hat, scale) with delta = scale * delta_hat (zero where the scale is zero)."""
    scale = error_scale(delta, mode)
    c = per_sample(scale, delta)
    hat = torch.where(c > 0, delta / c.clamp_min(torch.finfo(delta.dtype).tiny), torch.zeros_like(delta))
    return hat, scale


def loss_weights(delta: Tensor, out: Tensor, y: Tensor, rule: str, block: EnergyBlock) -> Tensor:
    """Per-sample weights w with delta = w * (out - y): what the loss's reduction did to the
    squared-error cost 1/2 ||out - y||^2. Raises if delta is not of that form."""
    e = (out - y).flatten(1)
    d = delta.flatten(1).to(e.dtype)
    ee = (e * e).sum(1)
    tiny = torch.finfo(e.dtype).tiny
    w = torch.where(ee > tiny, (d * e).sum(1) / ee.clamp_min(tiny), torch.zeros_like(ee))
    resid = torch.linalg.vector_norm(d - w[:, None] * e, dim=1)
    scale = torch.linalg.vector_norm(d, dim=1).amax().clamp_min(tiny)
    if bool((resid > 1e-3 * scale).any()):
        raise ValueError(f"{rule} ({block.block_name}): the error current dl/ds_L is not proportional to s_L - y; "
                         f"this rule needs the loss to be the squared error 1/2 ||s_L - y||^2 (summed per sample, "
                         f"any reduction) of the block's output against the target given to its forward")
    return w


# ---------------------------------------------------------------------------------------
# The contract
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Estimator:
    """Base of all estimators: frozen settings, validated once in `__post_init__`.

    `applies_to` says which modules can use it: 'block' (energy-based blocks) and/or
    'sequence' (Hamiltonian units).
    """

    name: ClassVar[str] = "estimator"
    applies_to: ClassVar[tuple[str, ...]] = ("block",)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the estimator and the setting for an invalid one."""

    def check_applicable(self, kind: str, owner: str) -> None:
        """Raise if this estimator cannot compute the backward of a module of `kind`."""
        if kind not in self.applies_to:
            what = {"block": "an energy-based block", "sequence": "a Hamiltonian unit"}.get(kind, kind)
            raise ValueError(f"{owner}: estimator {self.name!r} does not apply to {what}")

    def replace(self, **settings: Any) -> Estimator:
        """A copy with some settings changed (validated)."""
        return replace(self, **settings)

    def attach(self, block: EnergyBlock, u: Tensor, s: State, *, target: Tensor | None = None,
               record: RelaxRecord | None = None) -> Tensor:
        """The block's output s*_L, wired so that autograd's backward calls `gradients`.
        Estimators that differentiate through steps (BPTT, TBP) override this instead."""
        record = {} if record is None else record
        return _EquilibriumFunction.apply(u, block, self, s, target, record, *block_parameters(block))

    def gradients(self, block: EnergyBlock, u: Tensor, s: State, delta: Tensor, target: Tensor | None,
                  record: RelaxRecord, need_input: bool) -> tuple[Tensor | None, list[Tensor | None]]:
        """(dl/du or None, dl/dtheta for `block_parameters(block)`) at the free equilibrium s
        for the error current delta = dl/ds_L; adds the phases it runs to `record`."""
        raise NotImplementedError(f"{type(self).__name__} cannot compute the gradients of an energy-based block")


class _EquilibriumFunction(torch.autograd.Function):
    """The forward/backward cycle of an energy-based block, in one place. Forward: the free
    equilibrium's last layer (computed by the block). Backward: the estimator's `gradients`."""

    @staticmethod
    def forward(ctx, u, block, est, s, target, record, *params):
        ctx.block, ctx.est, ctx.target, ctx.record = block, est, target, record
        ctx.save_for_backward(u, *s)
        return s[-1].clone()

    @staticmethod
    def backward(ctx, grad_out):
        u, *s = ctx.saved_tensors
        if not bool(torch.isfinite(grad_out).all()):
            # an overflowed error current (a gradient scaler's step in float16): no relaxation can
            # use it; non-finite gradients make the scaler skip the step and lower its scale
            nan = float("nan")
            params = block_parameters(ctx.block)
            return (torch.full_like(u, nan) if ctx.needs_input_grad[0] else None, None, None, None, None, None,
                    *[torch.full_like(p, nan) for p in params])
        if is_channels_last(s[-1]) and not is_channels_last(grad_out):
            # autograd delivers the error current in its own layout (a readout's flatten gives a
            # contiguous one); every nudged sweep adds it to the state's pre-activation
            grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        grad_u, grads = ctx.est.gradients(ctx.block, u, s, grad_out, ctx.target, ctx.record, ctx.needs_input_grad[0])
        return (grad_u, None, None, None, None, None, *grads)


@dataclass(frozen=True)
class Contrast:
    """Two states of a block whose parameter derivatives of Phi, contrasted, estimate the
    gradient:  dl/dtheta = -sum_b w_b (dPhi_b/dtheta(first) - dPhi_b/dtheta(second)) / denom,
    dl/du = -w (s_1(first) - s_1(second)) / denom.  `stats` holds the phases that were run."""

    first: State
    second: State
    denom: float
    weights: Tensor  # per-sample weights, shape (batch,) or ()
    stats: dict[str, RelaxStats]


@dataclass(frozen=True, kw_only=True)
class ContrastEstimator(Estimator):
    """An estimator that contrasts two states of the block (EP and the energy-based rules).

    Subclasses give `contrast`. With a 16-bit `relax_dtype` on the block, `precision` says
    how the second phases run (see eqprop.precision; 'deviation' keeps the differences
    float32-accurate) and `refine` re-relaxes the 16-bit free state that many steps the same
    way first (that refined state is the block's output).

    pool: 'free' (default) lets every in-block max-pool choose its argmax anew in the second
    phases; 'held' holds each choice at its free-equilibrium value for the second phases and
    the parameter contrast (eqprop.routing; with a 16-bit relax_dtype it needs
    precision='full'). Blocks without in-block pooling are unaffected.
    """

    T2: int = 20
    tol: float | None = None
    precision: str = "deviation"
    refine: int = 10
    pool: str = "free"
    needs_target: ClassVar[bool] = False

    def validate(self) -> None:
        check_positive_int(self.name, "T2", self.T2)
        check_tol(self.name, self.tol)
        check_precision(self.name, self.precision)
        check_nonnegative_int(self.name, "refine", self.refine)
        check_choice(self.name, "pool", self.pool, POOLS)

    def attach(self, block: EnergyBlock, u: Tensor, s: State, *, target: Tensor | None = None,
               record: RelaxRecord | None = None) -> Tensor:
        record = {} if record is None else record
        if self.refine and self.precision != "block" and low_dtype(block, u) is not None:
            # bring the 16-bit free state to the precision of the second phases first
            s, record["refine"] = relax_with_precision(block, u.detach(), s, self.refine, None,
                                                       precision=self.precision)
        if not (torch.is_grad_enabled() and (u.requires_grad or block_parameters(block))):
            return s[-1]  # no backward will run: evaluation needs no target
        if target is None and self.needs_target:
            raise ValueError(f"{self.name} ({block.block_name}): no target given; {self.name} is only defined for "
                             f"a block that holds the output layer: call model(x, target=y) or wrap the forward "
                             f"in `with eqprop.targets(model, y): ...`")
        return super().attach(block, u, s, target=target, record=record)

    def gradients(self, block: EnergyBlock, u: Tensor, s: State, delta: Tensor, target: Tensor | None,
                  record: RelaxRecord, need_input: bool) -> tuple[Tensor | None, list[Tensor | None]]:
        c = self.contrast(block, u, s, delta, target)
        record.update(c.stats)
        # dPhi/du = s_1, so dl/du ~ -(s_1(first) - s_1(second)) / denom
        grad_u = -(c.first[0] - c.second[0]) * (per_sample(c.weights, u) / c.denom) if need_input else None
        params = block_parameters(block)
        if not params:
            return grad_u, []
        weights = (-c.weights / c.denom).to(u.dtype).expand(u.shape[0])
        held = held_routing(block, s, self.name) if self.pool == "held" else None
        phi = block.phi if held is None else held.phi
        with torch.enable_grad():
            diff = phi(c.first, u) - phi(c.second, u)
            return grad_u, list(torch.autograd.grad(diff, params, grad_outputs=weights, allow_unused=True))

    def contrast(self, block: EnergyBlock, u: Tensor, s: State, delta: Tensor, target: Tensor | None) -> Contrast:
        """The two states for the error current `delta` = dl/ds_L (and the target, if any)."""
        raise NotImplementedError

    # ---- helpers for subclasses --------------------------------------------------------
    def relax(self, block: EnergyBlock, u: Tensor, s: State, **kw: Any) -> tuple[State, RelaxStats]:
        """A second phase from the free state s (T2 steps, tolerance tol) under this
        estimator's precision, with the pooling routes of s held when pool='held'."""
        held = held_routing(block, s, self.name) if self.pool == "held" else None
        if held is not None:
            kw["preactivations"] = held.preactivations
        return relax_with_precision(block, u, s, self.T2, self.tol, precision=self.precision, **kw)

    def reference(self, block: EnergyBlock, u: Tensor, s: State, stats: dict[str, RelaxStats]) -> State:
        """The unperturbed state a one-sided contrast uses: s* itself, or, when the second
        phases run in another precision than the free phase, s* relaxed the same way."""
        if low_dtype(block, u) is None or self.precision == "block":
            return s
        s, stats["reference"] = self.relax(block, u, s)
        return s

    def by_variant(self, variant: str, phase: Callable[[int], State], strength: float, weights: Tensor,
                   block: EnergyBlock, u: Tensor, s: State, stats: dict[str, RelaxStats]) -> Contrast:
        """The contrast of a signed family of phases: phase(+1) against phase(-1) over
        2 strength ('centered'), or one of them against the reference state over strength."""
        if variant == "centered":
            return Contrast(phase(1), phase(-1), 2 * strength, weights, stats)
        ref = self.reference(block, u, s, stats)
        if variant == "positive":
            return Contrast(phase(1), ref, strength, weights, stats)
        return Contrast(ref, phase(-1), strength, weights, stats)

    def target_and_weights(self, block: EnergyBlock, s: State, delta: Tensor, target: Tensor
                           ) -> tuple[Tensor, Tensor]:
        """(y shaped like s_L, per-sample loss weights w with delta = w (s_L - y))."""
        y = target_like(block, target, s[-1], self.name)
        return y, loss_weights(delta, s[-1], y, self.name, block)


# ---------------------------------------------------------------------------------------
# EP, ID, BPTT, RHEL
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class EP(ContrastEstimator):
    """Equilibrium Propagation.

    beta:      nudging strength (> 0)
    variant:   'centered' (+beta and -beta, O(beta^2) bias), 'positive' (+beta against s*)
               or 'negative' (s* against -beta), both O(beta) bias
    T2:        iterations of each nudged phase (the cap when tol is set)
    tol:       stop a nudged phase earlier at this relative change (None: run T2)
    normalize: how the error current is normalised before nudging ('sample', 'batch', 'none')
    mirror:    centered only: start the -beta phase from 2 s* - s+, the mirror image of the
               +beta equilibrium about the free one, instead of from s*. s+- = s* +- beta v +
               O(beta^2), so that start is O(beta^2) from s- instead of O(beta): fewer steps to
               the same fixed point with tol set (with a fixed T2 the -beta phase gets closer
               to it). A simulation shortcut; a circuit starts its second phases from s*.
    precision, refine: second phases of a block with a 16-bit relax_dtype (ContrastEstimator)

    Nudging: with a target (the block holds the output layer, see eqprop.targets), the cost
    C = 1/2 ||s_L - y||^2 nudges with -beta (s_L - y), re-evaluated at every step; without
    one, with the normalised error current -beta delta/|delta| that autograd delivers.
    """

    beta: float = 0.2
    variant: str = "centered"
    normalize: str = "sample"
    mirror: bool = False
    name: ClassVar[str] = "ep"

    def validate(self) -> None:
        check_positive(self.name, "beta", self.beta)
        check_choice(self.name, "variant", self.variant, VARIANTS)
        check_choice(self.name, "normalize", self.normalize, NORMALIZE)
        if not isinstance(self.mirror, bool):
            raise ValueError(f"{self.name}: mirror must be true or false, got {self.mirror!r}")
        if self.mirror and self.variant != "centered":
            raise ValueError(f"{self.name}: mirror=True needs variant='centered' (it starts the -beta phase from the "
                             f"+beta one), got variant={self.variant!r}")
        super().validate()

    def contrast(self, block: EnergyBlock, u: Tensor, s: State, delta: Tensor, target: Tensor | None) -> Contrast:
        stats: dict[str, RelaxStats] = {}
        nudge, w = ep_nudge(self.name, self.beta, self.normalize, block, s, delta, target)
        ends: dict[int, State] = {}

        def nudged(sign: int) -> State:
            start = None
            if self.mirror and sign < 0 and 1 in ends:
                start = [2 * a - b for a, b in zip(s, ends[1])]
            state, stats["nudged+" if sign > 0 else "nudged-"] = self.relax(block, u, s, nudge=nudge(sign),
                                                                            start=start)
            ends[sign] = state
            return state

        return self.by_variant(self.variant, nudged, self.beta, w, block, u, s, stats)


@dataclass(frozen=True, kw_only=True)
class ID(Estimator):
    """Implicit differentiation (recurrent backprop) at the free equilibrium.

    dl/dtheta = lambda^T df/dtheta, with f the block's synchronous fixed-point map
    f(s) = sigma(a(s)), a = dPhi/ds, and lambda the adjoint: lambda = J^T lambda + delta,
    J = df/ds = D A (D = sigma'(a) diagonal, A = da/ds, symmetric as the Hessian of Phi).

    solver: how the adjoint is solved
      'fixed-point' (default): the iteration lambda <- J^T lambda + delta; it converges only
          when the spectral radius of J is below 1 (the synchronous map's linearisation),
          and slowly when it is close to 1.
      'minres': MINRES on the symmetric system (I - D^1/2 A D^1/2) x = D^1/2 delta with
          lambda = delta + A D^1/2 x: converges whenever the system is nonsingular (at any
          isolated fixed point, including those only the asynchronous sweep reaches), in
          about the square root of the fixed-point iteration's count when it is positive
          definite (at a stable equilibrium). Needs elementwise activations (all built-in ones).
    damping: mu >= 0 solves ((1 + mu) I - J^T) lambda = delta instead, i.e. the Neumann series
      sum_k gamma^(k+1) (J^T)^k delta discounted by gamma = 1 / (1 + mu) (an effective horizon of
      about 1/mu sweeps): the adjoint's gain along a slow mode of the sweep is bounded by 1/mu
      instead of growing without bound as the Jacobian nears marginal stability. 0 (default): the
      exact implicit gradient. The damped gradient is biased; docs/gradients.md measures it.
    At most `max_iter` iterations, stopping at relative change (fixed-point) or relative
    residual (minres) `tol`, checked every `check_every` iterations (each check is one
    host-device synchronisation; default 1 on CPU, 10 on GPU). The adjoint's iterations,
    residual and convergence are recorded as the phase 'adjoint'; an adjoint that diverges
    (non-finite, or the fixed-point iteration growing) raises.
    """

    max_iter: int = 200
    tol: float | None = 1e-6
    check_every: int | None = None
    solver: str = "fixed-point"
    damping: float = 0.0
    name: ClassVar[str] = "id"

    def validate(self) -> None:
        check_positive_int(self.name, "max_iter", self.max_iter)
        check_tol(self.name, self.tol)
        check_positive_int(self.name, "check_every", self.check_every, allow_none=True)
        check_choice(self.name, "solver", self.solver, ("fixed-point", "minres"))
        if isinstance(self.damping, bool) or self.damping != 0:
            check_positive(self.name, "damping", self.damping)
        if self.solver == "minres" and self.tol is None:
            raise ValueError("id: solver='minres' needs a tolerance tol (a number > 0), got None")

    def gradients(self, block: EnergyBlock, u: Tensor, s: State, delta: Tensor, target: Tensor | None,
                  record: RelaxRecord, need_input: bool) -> tuple[Tensor | None, list[Tensor | None]]:
        params = block_parameters(block)
        every = self.check_every or (1 if delta.device.type == "cpu" else 10)
        # Layers whose map does not depend on the states (e.g. one layer) get zero vjp.
        rhs = [torch.zeros_like(x) for x in s[:-1]] + [delta]
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(True) for x in s]
            u_in = u.detach().requires_grad_(need_input)
            inputs = ([u_in] if need_input else []) + params
            if self.solver == "minres":
                pre_map = block.preactivations(leaves, u_in, list(range(len(s))))
                pre = [pre_map[l] for l in range(len(s))]
                lam, stats = self._minres_adjoint(block, leaves, pre, rhs, every)
                # lambda^T df/dtheta = (D lambda)^T da/dtheta
                d = activation_slopes(block, pre)
                grads = list(torch.autograd.grad(pre, inputs, grad_outputs=[di * li for di, li in zip(d, lam)],
                                                 allow_unused=True)) if inputs else []
            else:
                f = block.fixed_point_map(leaves, u_in)
                lam, stats = self._fixed_point_adjoint(block, f, leaves, rhs, every)
                grads = list(torch.autograd.grad(f, inputs, grad_outputs=lam, allow_unused=True)) if inputs else []
        record["adjoint"] = stats
        grad_u = grads.pop(0) if need_input else None
        return grad_u, grads

    def _fixed_point_adjoint(self, block: EnergyBlock, f: State, leaves: State, rhs: State,
                             every: int) -> tuple[State, RelaxStats]:
        lam = [d.clone() for d in rhs]
        iters, converged, change = 0, None if self.tol is None else False, None
        while iters < self.max_iter:
            vjp = torch.autograd.grad(f, leaves, grad_outputs=lam, retain_graph=True, allow_unused=True)
            new = [d + (v if v is not None else 0) for d, v in zip(rhs, vjp)]
            if self.damping:
                new = [x / (1 + self.damping) for x in new]
            iters += 1
            check = self.tol is not None and (iters % every == 0 or iters == self.max_iter)
            if check or iters == self.max_iter:
                change = relative_change(new, lam)
            if check and change.item() < self.tol:
                lam, converged = new, True
                break
            lam = new
        residual = float(change)
        # lambda = (I - J^T)^-1 e: a norm beyond GROWTH times the error current's means the iteration
        # is diverging (spectral radius >= 1), not converging slowly
        growth = (_norm(lam) / _norm(rhs).clamp_min(torch.finfo(torch.float64).tiny)).item()
        if not math.isfinite(growth) or growth > ADJOINT_GROWTH:
            raise RuntimeError(f"{block.block_name}: id's fixed-point adjoint iteration diverged (|lambda| / |delta| = "
                               f"{growth:.3g} after {iters} iterations): the synchronous map's Jacobian has a "
                               f"spectral radius >= 1 at this state; use solver='minres' (estimator.id.solver"
                               f"=minres in a config)")
        return lam, RelaxStats(iters, residual, converged)

    def _minres_adjoint(self, block: EnergyBlock, leaves: State, pre: list[Tensor], rhs: State,
                        every: int) -> tuple[State, RelaxStats]:
        root = [d.sqrt() for d in activation_slopes(block, pre)]

        def hessian(v: State) -> State:  # A v (A symmetric: the vjp is the product)
            out = torch.autograd.grad(pre, leaves, grad_outputs=v, retain_graph=True, allow_unused=True)
            return [torch.zeros_like(x) if o is None else o for o, x in zip(out, leaves)]

        scale = 1 + self.damping

        def system(x: State) -> State:  # ((1 + mu) I - D^1/2 A D^1/2) x
            ax = hessian([r * xi for r, xi in zip(root, x)])
            return [scale * xi - r * a for xi, r, a in zip(x, root, ax)]

        x, st = minres(system, [r * d for r, d in zip(root, rhs)], max_iter=self.max_iter, tol=self.tol,
                       check_every=every)
        if not math.isfinite(st.residual):
            raise RuntimeError(f"{block.block_name}: id's MINRES adjoint produced a non-finite residual after "
                               f"{st.iters} iterations (non-finite states or parameters?)")
        ax = hessian([r * xi for r, xi in zip(root, x)])
        lam = [(d + a) / scale for d, a in zip(rhs, ax)]
        return lam, RelaxStats(st.iters, st.residual, st.converged)


ADJOINT_GROWTH = 1e8  # |lambda| / |delta| above which the fixed-point adjoint counts as diverged


def _norm(v: State) -> Tensor:
    return torch.sqrt(sum((x.double() ** 2).sum() for x in v))


def activation_slopes(block: EnergyBlock, pre: list[Tensor]) -> list[Tensor]:
    """sigma_l'(a_l) per layer, elementwise (the diagonal of df/da), from autograd on the
    block's activations at the preactivations `pre` (detached)."""
    out = []
    with torch.enable_grad():
        for act, a in zip(block.activations, pre):
            z = a.detach().requires_grad_(True)
            y = act(z * 1)  # `* 1`: activations may work in place on their input
            (g,) = torch.autograd.grad(y, z, torch.ones_like(y), allow_unused=True)
            g = torch.zeros_like(z) if g is None else g.detach()
            if bool((g < 0).any()):
                raise ValueError(f"{block.block_name}: id's solver='minres' needs non-decreasing activations "
                                 f"(sigma' >= 0); {act!r} has a negative slope at this state")
            out.append(g)
    return out


@dataclass(frozen=True, kw_only=True)
class BPTT(Estimator):
    """Backpropagation through time.

    Energy-based block: T2 steps run with autograd from the free equilibrium (memory grows
    with T2); T2=None (the default) unrolls as many steps as the block's T1. Hamiltonian
    unit: autograd through every time step; T2 must be None there (the sequence sets the
    number of steps; truncation is not implemented).
    """

    T2: int | None = None
    name: ClassVar[str] = "bptt"
    applies_to: ClassVar[tuple[str, ...]] = ("block", "sequence")

    def validate(self) -> None:
        check_positive_int(self.name, "T2", self.T2, allow_none=True)

    def check_applicable(self, kind: str, owner: str) -> None:
        super().check_applicable(kind, owner)
        if kind == "sequence" and self.T2 is not None:
            raise ValueError(f"{owner}: bptt on a Hamiltonian unit runs through every time step and takes no T2 "
                             f"(got T2={self.T2!r}); set it to None (null in a config)")

    def attach(self, block: EnergyBlock, u: Tensor, s: State, *, target: Tensor | None = None,
               record: RelaxRecord | None = None) -> Tensor:
        if not torch.is_grad_enabled():
            return s[-1]
        s = [x.detach() for x in s]
        cache: dict = {}  # reuse each pooled convolution between the two half-sweeps
        for _ in range(block.T1 if self.T2 is None else self.T2):
            s = block.step(s, u, None, cache)
        return s[-1]


@dataclass(frozen=True, kw_only=True)
class RHEL(Estimator):
    """Recurrent Hamiltonian Echo Learning, the backward of a Hamiltonian unit
    (eqprop.hamiltonian): the echo of the time-reversed dynamics, nudged by +-eps.

    eps:       nudging strength (> 0), relative to the per-sample error norm when
               normalize='sample' (the default), as for EP
    normalize: 'sample', 'batch' or 'none'
    """

    eps: float = 1e-2
    normalize: str = "sample"
    name: ClassVar[str] = "rhel"
    applies_to: ClassVar[tuple[str, ...]] = ("sequence",)

    def validate(self) -> None:
        check_positive(self.name, "eps", self.eps)
        check_choice(self.name, "normalize", self.normalize, NORMALIZE)
