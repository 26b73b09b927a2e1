"""Gradient estimators of an energy-based block (SPEC §3-4).

Each estimator takes the free equilibrium computed by the block and returns the block's
output (its last layer) wired into autograd so that an ordinary `loss.backward()` runs:

  EP   the nudged relaxations and the EP estimates for input and parameters (a custom
       autograd.Function: nothing of any trajectory is stored);
  ID   implicit differentiation: the adjoint fixed point lambda = J^T lambda + delta;
  BPTT T2 more steps from the free equilibrium with autograd on.

Swap them at run time: `block.estimator = ID()` or `model.set_estimator("ep", beta=0.1)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .blocks import EnergyBlock, RelaxStats, State, _check_positive_int, _check_tol, relative_change
from .precision import check_precision, low_dtype, relax_with_precision

VARIANTS = ("centered", "positive", "negative")
NORMALIZE = ("sample", "batch", "none")


def _block_params(block: EnergyBlock) -> list[Tensor]:
    return [p for p in block.parameters() if p.requires_grad]


def error_scale(delta: Tensor, mode: str) -> Tensor:
    """Scale c with delta = c * delta_hat: shape (batch,) or () (SPEC §3, last paragraph).

    'sample': per-sample norm (the nudge no longer depends on the loss reduction or the
    batch size); 'batch': mean per-sample norm; 'none': 1.
    """
    if mode == "none":
        return torch.ones((), dtype=delta.dtype, device=delta.device)
    norms = torch.linalg.vector_norm(delta.flatten(1), dim=1)
    if mode == "batch":
        return norms.mean()
    return norms


def _like(scale: Tensor, x: Tensor) -> Tensor:
    """Reshape a (batch,) or () scale to broadcast against x."""
    return scale.view(-1, *([1] * (x.dim() - 1))) if scale.dim() else scale


class Estimator:
    """Base class: `attach(block, u, free_state) -> output` with the right backward."""

    name = "estimator"

    def attach(self, block: EnergyBlock, u: Tensor, s: State) -> Tensor:
        raise NotImplementedError

    def validate(self) -> None:
        pass


class ContrastEstimator(Estimator):
    """An estimator that contrasts two states of the block (EP and the energy-based rules).

    `contrast(block, u, free_state, delta)` returns (first, second, denom, weights); the
    backward then gives
        dl/dtheta = -sum_b w_b (dPhi_b/dtheta(first) - dPhi_b/dtheta(second)) / denom
        dl/du     = -w (s_1(first) - s_1(second)) / denom
    with per-sample weights w of shape (batch,) or ().

    With a 16-bit `relax_dtype` on the block, `precision` says how the second phases run
    (see eqprop.precision; 'deviation' keeps the differences float32-accurate) and
    `refine` re-relaxes the 16-bit free state that many steps the same way first.
    """

    precision: str = "deviation"
    refine: int = 0

    def attach(self, block: EnergyBlock, u: Tensor, s: State) -> Tensor:
        self.validate()
        if self.refine and self.precision != "block" and low_dtype(block, u) is not None:
            # bring the 16-bit free state to the precision of the second phases first
            s, block.stats["refine"] = relax_with_precision(block, u.detach(), s, self.refine, None,
                                                            precision=self.precision)
            block.free_state = s
        return _ContrastFunction.apply(u, block, self, s, *_block_params(block))

    def reference(self, block: EnergyBlock, u: Tensor, s: State, T: int, tol: float | None) -> State:
        """The unperturbed state a one-sided contrast uses: s* itself, or, when the second
        phases run in another precision than the free phase, s* relaxed the same way."""
        if low_dtype(block, u) is None or self.precision == "block":
            return s
        s, block.stats["reference"] = relax_with_precision(block, u, s, T, tol, precision=self.precision)
        return s

    def contrast(self, block: EnergyBlock, u: Tensor, s: State, delta: Tensor
                 ) -> tuple[State, State, float, Tensor]:
        raise NotImplementedError


class _ContrastFunction(torch.autograd.Function):
    """Forward: the free equilibrium's last layer. Backward: the estimator's two states."""

    @staticmethod
    def forward(ctx, u, block, est, s, *params):
        ctx.block, ctx.est = block, est
        ctx.save_for_backward(u, *s)
        return s[-1].clone()

    @staticmethod
    def backward(ctx, grad_out):
        u, *s = ctx.saved_tensors
        block, est = ctx.block, ctx.est
        first, second, denom, w = est.contrast(block, u, s, grad_out)
        grad_u = None
        if ctx.needs_input_grad[0]:
            # dPhi/du = s_1, so dl/du ~ -(s_1(first) - s_1(second)) / denom
            grad_u = -(first[0] - second[0]) * (_like(w, u) / denom)
        params = _block_params(block)
        grads = [None] * len(params)
        if params:
            weights = (-w / denom).to(u.dtype).expand(u.shape[0])
            with torch.enable_grad():
                diff = block.phi(first, u) - block.phi(second, u)
                grads = torch.autograd.grad(diff, params, grad_outputs=weights, allow_unused=True)
        return (grad_u, None, None, None, *grads)


@dataclass
class EP(ContrastEstimator):
    """Equilibrium Propagation (SPEC §3).

    beta:      nudging strength (> 0)
    variant:   'centered' (+beta and -beta, O(beta^2) bias), 'positive' or 'negative'
    T2:        iterations of each nudged phase (the cap when tol is set)
    tol:       stop a nudged phase earlier at this relative change (None: run T2)
    normalize: how the error current is normalised before nudging ('sample', 'batch', 'none')
    precision, refine: second phases of a block with a 16-bit relax_dtype (ContrastEstimator)
    """

    beta: float = 0.2
    variant: str = "centered"
    T2: int = 20
    tol: float | None = None
    normalize: str = "sample"
    precision: str = "deviation"
    refine: int = 10
    name = "ep"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not (isinstance(self.beta, (int, float)) and self.beta > 0 and math.isfinite(self.beta)):
            raise ValueError(f"EP: beta must be a positive number, got {self.beta!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"EP: unknown variant {self.variant!r}, expected one of {VARIANTS}")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"EP: unknown normalize {self.normalize!r}, expected one of {NORMALIZE}")
        _check_positive_int("EP", "T2", self.T2)
        _check_tol("EP", self.tol)
        check_precision("EP", self.precision)
        if isinstance(self.refine, bool) or not isinstance(self.refine, int) or self.refine < 0:
            raise ValueError(f"EP: refine must be a non-negative integer, got {self.refine!r}")

    def contrast(self, block: EnergyBlock, u: Tensor, s: State, delta: Tensor):
        """Nudged equilibria for the error current `delta` = dl/ds_L, normalised to
        delta / scale; returns (first, second, denom, scale) (see ContrastEstimator)."""
        scale = error_scale(delta, self.normalize)
        c = _like(scale, delta)
        delta_hat = torch.where(c > 0, delta / c.clamp_min(torch.finfo(delta.dtype).tiny), torch.zeros_like(delta))
        if self.variant == "centered":
            first = second = None
        else:
            first = second = self.reference(block, u, s, self.T2, self.tol)
        if self.variant in ("centered", "positive"):
            first, block.stats["nudged+"] = relax_with_precision(block, u, s, self.T2, self.tol,
                                                                 nudge=-self.beta * delta_hat, precision=self.precision)
        if self.variant in ("centered", "negative"):
            second, block.stats["nudged-"] = relax_with_precision(block, u, s, self.T2, self.tol,
                                                                  nudge=self.beta * delta_hat, precision=self.precision)
        denom = 2 * self.beta if self.variant == "centered" else self.beta
        return first, second, denom, scale


@dataclass
class ID(Estimator):
    """Implicit differentiation (recurrent backprop) at the free equilibrium (SPEC §4).

    Solves lambda = J^T lambda + delta by fixed-point iteration (at most `max_iter`
    steps, stopping at relative change `tol`), then dl/dtheta = lambda^T df/dtheta.
    """

    max_iter: int = 200
    tol: float | None = 1e-6
    name = "id"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _check_positive_int("ID", "max_iter", self.max_iter)
        _check_tol("ID", self.tol)

    def attach(self, block: EnergyBlock, u: Tensor, s: State) -> Tensor:
        self.validate()
        return _IDFunction.apply(u, block, self, s, *_block_params(block))


def sync_map(block: EnergyBlock, s: State, u: Tensor, nudge: Tensor | None = None) -> State:
    """f(s) = sigma(dPhi/ds) for all layers at once: the map whose fixed point is s*."""
    pre = block.preactivations(s, u, list(range(len(s))), nudge)
    return [block.activations[l](pre[l]) for l in range(len(s))]


class _IDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, block, est, s, *params):
        ctx.block, ctx.est = block, est
        ctx.save_for_backward(u, *s)
        return s[-1].clone()

    @staticmethod
    def backward(ctx, grad_out):
        u, *s = ctx.saved_tensors
        block, est = ctx.block, ctx.est
        params = _block_params(block)
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(True) for x in s]
            u_in = u.detach().requires_grad_(ctx.needs_input_grad[0])
            f = sync_map(block, leaves, u_in)
            # Layers whose map does not depend on the states (e.g. one layer) get zero vjp.
            delta = [torch.zeros_like(x) for x in s[:-1]] + [grad_out]
            lam = [d.clone() for d in delta]
            iters, converged = 0, None if est.tol is None else False
            for iters in range(1, est.max_iter + 1):
                vjp = torch.autograd.grad(f, leaves, grad_outputs=lam, retain_graph=True, allow_unused=True)
                new = [d + (v if v is not None else 0) for d, v in zip(delta, vjp)]
                if est.tol is not None and relative_change(new, lam).item() < est.tol:
                    lam, converged = new, True
                    break
                lam = new
            inputs = ([u_in] if ctx.needs_input_grad[0] else []) + params
            grads = torch.autograd.grad(f, inputs, grad_outputs=lam, allow_unused=True) if inputs else []
        block.stats["adjoint"] = RelaxStats(iters, float("nan"), converged)
        grads = list(grads)
        grad_u = grads.pop(0) if ctx.needs_input_grad[0] else None
        return (grad_u, None, None, None, *grads)


@dataclass
class BPTT(Estimator):
    """Backprop through T2 steps run with autograd from the free equilibrium (SPEC §4).

    Memory grows with T2 (the unrolled steps are stored)."""

    T2: int = 20
    name = "bptt"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _check_positive_int("BPTT", "T2", self.T2)

    def attach(self, block: EnergyBlock, u: Tensor, s: State) -> Tensor:
        self.validate()
        if not torch.is_grad_enabled():
            return s[-1]
        s = [x.detach() for x in s]
        cache: dict = {}  # reuse each pooled convolution between the two half-sweeps
        for _ in range(self.T2):
            s = block.step(s, u, None, cache)
        return s[-1]


ESTIMATORS = {"ep": EP, "id": ID, "bptt": BPTT}


def make_estimator(name: str | Estimator, **kwargs) -> Estimator:
    """Build an estimator from its name ('ep', 'id', 'bptt') and settings."""
    if isinstance(name, Estimator):
        if kwargs:
            raise ValueError(f"make_estimator: settings {sorted(kwargs)} given with an estimator instance")
        return name
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}, expected one of {sorted(ESTIMATORS)}")
    cls = ESTIMATORS[name]
    allowed = set(cls.__dataclass_fields__)
    unknown = set(kwargs) - allowed
    if unknown:
        raise ValueError(f"estimator {name!r} has no setting(s) {sorted(unknown)}; it takes {sorted(allowed)}")
    return cls(**kwargs)
