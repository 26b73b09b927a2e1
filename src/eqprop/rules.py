"""The energy-based learning family (SPEC §7): CL, EP and coupled learning in all signs,
truncated and recurrent backprop, as estimators with the core's switch.

All energy-based rules contrast two states of the block and estimate

    dl/dtheta ~ -w * ( dPhi/dtheta(first) - dPhi/dtheta(second) ) / denom
    dl/du     ~ -w * ( s_1(first) - s_1(second) ) / denom

with per-sample weights w. What differs is how the two states are obtained:

  name   first state                          second state                denom
  cl     output clamped to the target y       free state s*               1
  pep    nudged by +beta (cost on output)     s*                          beta
  nep    s*                                   nudged by -beta             beta
  cep    nudged by +beta                      nudged by -beta             2 beta
  pcpl   output held at s*_L + eta (y - s*_L) s*                          eta
  ncpl   s*                                   output at s*_L - eta (y-s*_L) eta
  ccpl   output at s*_L + eta (y - s*_L)      output at s*_L - eta(y-s*_L) 2 eta
  tbp    backprop through the last K iterations of the free phase
  rbp    recurrent backprop (the core's implicit differentiation, `id`)

"Nudged by +beta" relaxes the total energy E + beta * C with the squared-error cost
C = 1/2 ||s_L - y||^2 on the block's last layer (the nudge -beta (s_L - y) is re-evaluated
at every step). Clamped and held output layers do not relax; the other layers do.

Targets. CL and CpL need the target, and so do PEP/NEP/CEP for the cost on the output
layer. Register it around the backward:

    with eqprop.rules.targets(model, y):          # one-hot (B, K) or labels (B,)
        out = model(x)                            # the last block's last layer
        loss = 0.5 * ((out - y_onehot) ** 2).sum(1).mean()
        loss.backward()

The target goes to the block that holds the output layer (the model's last module). The
rules read the per-sample weights w of the loss (1/B for a mean, 1 for a sum) from the
error current the backward receives, dl/ds_L = w (s_L - y), and raise a ValueError when
it is not of that form (e.g. a readout or cross-entropy after the block). CL and CpL are
only defined for a block that holds the output layer; PEP/NEP/CEP also work in a block
with no target (e.g. followed by a readout, or upstream in an ff-EBM): they then nudge
with the error current that autograd delivers, exactly like the core's EP. In an ff-EBM
the error current passed to the block's input follows from the same two states, so
upstream blocks keep learning by EP through the feedforward maps.

Reduced precision. When the block relaxes in 16 bits (`block.relax_dtype`), the nudge's
effect on the states (~beta * error) lies below the resolution of 16-bit states, and the
16-bit free state is not a float32 fixed point. The energy-based rules therefore take
  precision: how their second phases run
    'deviation' (default): relax s = s* + d with the state kept in float32, where every
        coupling is applied to the deviation d = s - s* in 16 bits and added to its float32
        value at s* (computed once per phase): rounding errors scale with |d|, not |s|.
        Needs a `HopfieldBlock` of dense/conv couplings; other blocks use 'full'.
    'full':  second phases in the input's dtype (float32), from the 16-bit free state.
    'block': second phases like the free phase (16-bit states: the core's behaviour).
  refine: iterations of the free phase re-run the same way ('deviation' or 'full') from
      the 16-bit free state before the second phases (default 10; 0 to skip). The refined
      state is the block's output and `free_state`.
Unless precision is 'block', a one-sided rule contrasts with a reference state relaxed
without perturbation from s* under the same precision and steps, not with s* itself.
With hard-sigmoid neurons and max-pooling the free dynamics can have several nearby
equilibria; a 16-bit free phase may settle in another one than the float32 phase, and no
handling of the second phases changes that (docs/algorithms.md has the measurements).
"""
from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import EnergyBlock, State, _check_positive_int, _check_tol
from .estimators import ESTIMATORS, ID, NORMALIZE, ContrastEstimator, Estimator, _like, error_scale
from .precision import check_precision, low_dtype, relax_with_precision


# ---------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------

_TARGETS: "weakref.WeakKeyDictionary[EnergyBlock, Tensor]" = weakref.WeakKeyDictionary()


def output_block(model: nn.Module) -> EnergyBlock:
    """The block that holds the model's output layer: the model itself, or the last module
    of a sequential model when it is an `EnergyBlock`."""
    if isinstance(model, EnergyBlock):
        return model
    if isinstance(model, nn.Sequential) and len(model) > 0:
        last = model[-1]
        if isinstance(last, EnergyBlock):
            return last
        raise ValueError(f"targets: the model's last module is {type(last).__name__}, not an energy-based block; "
                         f"rules that need the target (cl, cpl, cost on the output layer) need a block that holds "
                         f"the output layer (no readout after it)")
    blocks = [m for m in model.modules() if isinstance(m, EnergyBlock)]
    if not blocks:
        raise ValueError(f"targets: {type(model).__name__} holds no energy-based block")
    return blocks[-1]


def set_target(model: nn.Module, y: Tensor) -> EnergyBlock:
    """Register the target y (one-hot/real (B, ...) like the output layer, or int labels (B,))
    for the block holding the output layer; returns that block."""
    if not isinstance(y, Tensor):
        raise TypeError(f"targets: y must be a tensor, got {type(y).__name__}")
    if y.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        if y.dim() != 1:
            raise ValueError(f"targets: integer labels must have shape (batch,), got {tuple(y.shape)}")
    elif not y.is_floating_point():
        raise ValueError(f"targets: y must hold integer labels or real targets, got dtype {y.dtype}")
    block = output_block(model)
    _TARGETS[block] = y.detach()
    return block


def clear_target(model: nn.Module) -> None:
    """Forget the target registered for the model's output block."""
    _TARGETS.pop(output_block(model), None)


@contextmanager
def targets(model: nn.Module, y: Tensor) -> Iterator[EnergyBlock]:
    """Within the context, the output block's rules use y as target (see module docstring)."""
    block = set_target(model, y)
    try:
        yield block
    finally:
        _TARGETS.pop(block, None)


def get_target(block: EnergyBlock) -> Tensor | None:
    return _TARGETS.get(block)


def target_like(block: EnergyBlock, y: Tensor, out: Tensor, rule: str) -> Tensor:
    """The target as a tensor shaped like the output layer `out` (one-hot for labels)."""
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
        return F.one_hot(y.long(), k).to(out.dtype)
    if tuple(y.shape) != tuple(out.shape):
        raise ValueError(f"{rule} ({block.block_name}): target of shape {tuple(y.shape)} does not match the output "
                         f"layer of shape {tuple(out.shape)}")
    return y.to(device=out.device, dtype=out.dtype)


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
                         f"any reduction) of the block's output against the target registered with "
                         f"eqprop.rules.targets")
    return w


# ---------------------------------------------------------------------------------------
# The two-state rules
# ---------------------------------------------------------------------------------------

class TwoStateRule(ContrastEstimator):
    """Base of the energy-based rules: `contrast` gives the two states, the denominator and
    the per-sample weights; the backward turns them into gradients for u and theta."""

    needs_target = True
    T2: int
    tol: float | None
    precision: str
    refine: int

    def contrast(self, block: EnergyBlock, u: Tensor, s: State, delta: Tensor
                 ) -> tuple[State, State, float, Tensor]:
        raise NotImplementedError

    # helpers ---------------------------------------------------------------------------
    def _target(self, block: EnergyBlock, s: State, delta: Tensor) -> tuple[Tensor, Tensor] | None:
        """(y shaped like s_L, per-sample loss weights), or None when no target is registered."""
        y = get_target(block)
        if y is None:
            if self.needs_target:
                raise ValueError(f"{self.name} ({block.block_name}): no target registered; {self.name} is only "
                                 f"defined for a block that holds the output layer: wrap the backward in "
                                 f"`with eqprop.rules.targets(model, y): ...`")
            return None
        y = target_like(block, y, s[-1], self.name)
        return y, loss_weights(delta, s[-1], y, self.name, block)

    def _relax(self, block, u, s, phase: str, **kw) -> State:
        state, block.stats[phase] = relax_with_precision(block, u, s, self.T2, self.tol, precision=self.precision,
                                                         **kw)
        return state

    def _validate_common(self) -> None:
        if isinstance(self.refine, bool) or not isinstance(self.refine, int) or self.refine < 0:
            raise ValueError(f"{self.name}: refine must be a non-negative integer, got {self.refine!r}")
        _check_positive_int(self.name, "T2", self.T2)
        _check_tol(self.name, self.tol)
        check_precision(self.name, self.precision)


@dataclass
class CL(TwoStateRule):
    """Contrastive learning: second state with the output layer clamped to the target;
    update -(dPhi/dtheta(clamped) - dPhi/dtheta(free)), weighted like the loss.

    It does not follow the loss gradient (the clamped state does not tend to s* when the
    error is small relative to the network's response). Only for a block that holds the
    output layer."""

    T2: int = 20
    tol: float | None = None
    precision: str = "deviation"
    refine: int = 10
    name = "cl"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        self._validate_common()

    def contrast(self, block, u, s, delta):
        y, w = self._target(block, s, delta)
        clamped = self._relax(block, u, s, "clamped", clamp=y)
        return clamped, self.reference(block, u, s, self.T2, self.tol), 1.0, w


def _check_beta(rule: str, beta) -> None:
    if isinstance(beta, bool) or not (isinstance(beta, (int, float)) and beta > 0 and math.isfinite(beta)):
        raise ValueError(f"{rule}: beta must be a positive number, got {beta!r}")


@dataclass
class _EPRule(TwoStateRule):
    """EP with the squared-error cost on the output layer when a target is registered,
    otherwise with the error current that autograd delivers (like the core's EP).

    beta:      nudging strength (> 0)
    T2, tol:   iterations (cap) and tolerance of each nudged phase
    normalize: without target, how the error current is normalised ('sample', 'batch', 'none')
    precision: 'deviation', 'full' or 'block' (see the module docstring)
    """

    beta: float = 0.2
    T2: int = 20
    tol: float | None = None
    normalize: str = "sample"
    precision: str = "deviation"
    refine: int = 10
    needs_target = False
    signs = (1, -1)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _check_beta(self.name, self.beta)
        if self.normalize not in NORMALIZE:
            raise ValueError(f"{self.name}: unknown normalize {self.normalize!r}, expected one of {NORMALIZE}")
        self._validate_common()

    def contrast(self, block, u, s, delta):
        tgt = self._target(block, s, delta)
        if tgt is not None:
            y, w = tgt

            def nudged(sign: int) -> State:
                beta = sign * self.beta
                return self._relax(block, u, s, "nudged+" if sign > 0 else "nudged-",
                                   nudge=lambda sl: -beta * (sl - y))
        else:
            w = error_scale(delta, self.normalize)
            c = _like(w, delta)
            delta_hat = torch.where(c > 0, delta / c.clamp_min(torch.finfo(delta.dtype).tiny), torch.zeros_like(delta))

            def nudged(sign: int) -> State:
                current = -sign * self.beta * delta_hat
                return self._relax(block, u, s, "nudged+" if sign > 0 else "nudged-", nudge=current)
        if self.signs == (1, -1):
            return nudged(1), nudged(-1), 2 * self.beta, w
        if self.signs == (1,):
            return nudged(1), self.reference(block, u, s, self.T2, self.tol), self.beta, w
        return self.reference(block, u, s, self.T2, self.tol), nudged(-1), self.beta, w


@dataclass
class PEP(_EPRule):
    """EP with positive nudging (+beta against the free state): O(beta) bias."""
    name = "pep"
    signs = (1,)


@dataclass
class NEP(_EPRule):
    """EP with negative nudging (the free state against -beta): O(beta) bias."""
    name = "nep"
    signs = (-1,)


@dataclass
class CEP(_EPRule):
    """Centered EP (+beta against -beta): O(beta^2) bias."""
    name = "cep"
    signs = (1, -1)


def _check_eta(rule: str, eta) -> None:
    if isinstance(eta, bool) or not (isinstance(eta, (int, float)) and 0 < eta < 1):
        raise ValueError(f"{rule}: eta must lie in (0, 1) (the fraction of the way from the output towards "
                         f"the target), got {eta!r}")


@dataclass
class _CpLRule(TwoStateRule):
    """Coupled learning: the output layer is held a fraction eta of the way towards the
    target (positive), away from it (negative) or both (centered) while the other layers
    relax; update from the difference of dPhi/dtheta divided by eta (or 2 eta).

    As eta -> 0 the update is the gradient of the loss with the error current S (s*_L - y)
    instead of (s*_L - y), S = [d s*_L / d(current on s_L)]^-1 (the output layer's inverse
    response): it follows the loss gradient when the output's response is close to a
    multiple of the identity. Only for a block that holds the output layer.
    """

    eta: float = 0.5
    T2: int = 20
    tol: float | None = None
    precision: str = "deviation"
    refine: int = 10
    signs = (1, -1)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _check_eta(self.name, self.eta)
        self._validate_common()

    def contrast(self, block, u, s, delta):
        y, w = self._target(block, s, delta)
        out = s[-1]

        def held(sign: int) -> State:
            return self._relax(block, u, s, "held+" if sign > 0 else "held-",
                               clamp=out + sign * self.eta * (y - out))
        if self.signs == (1, -1):
            return held(1), held(-1), 2 * self.eta, w
        if self.signs == (1,):
            return held(1), self.reference(block, u, s, self.T2, self.tol), self.eta, w
        return self.reference(block, u, s, self.T2, self.tol), held(-1), self.eta, w


@dataclass
class PCpL(_CpLRule):
    """Coupled learning, output pulled towards the target."""
    name = "pcpl"
    signs = (1,)


@dataclass
class NCpL(_CpLRule):
    """Coupled learning, output pushed away from the target."""
    name = "ncpl"
    signs = (-1,)


@dataclass
class CCpL(_CpLRule):
    """Coupled learning, both pulls (centered)."""
    name = "ccpl"
    signs = (1, -1)


# ---------------------------------------------------------------------------------------
# Backprop baselines
# ---------------------------------------------------------------------------------------

@dataclass
class TBP(Estimator):
    """Truncated backprop: backpropagate through the last K iterations of the free phase.

    The block's forward has already run the free phase when the estimator is called, so
    TBP re-runs its first (iterations - K) steps without autograd (the same deterministic
    path) and the last K with autograd; the output is the free state of the forward.
    With a tolerance, the free phase's actual iteration count is used."""

    K: int = 10
    name = "tbp"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        _check_positive_int("tbp", "K", self.K)

    def attach(self, block: EnergyBlock, u: Tensor, s: State) -> Tensor:
        self.validate()
        if not torch.is_grad_enabled():
            return s[-1]
        iters = block.stats["free"].iters if "free" in block.stats else block.T1
        head = iters - self.K
        if head > 0:
            s, block.stats["tbp-head"] = block.relax(u.detach(), None, head, tol=None)
        else:
            s = block.init_state(u)
        low = low_dtype(block, u)
        steps = min(self.K, iters)
        if low is None:
            for _ in range(steps):
                s = block.step(s, u)
            return s[-1]
        with torch.autocast(u.device.type, dtype=low):
            s = [x.to(low) for x in s]
            u_l = u.to(low)
            for _ in range(steps):
                s = block.step(s, u_l)
        return s[-1].to(u.dtype)


@dataclass
class RBP(ID):
    """Recurrent backprop: the core's implicit differentiation (adjoint fixed point)."""
    name = "rbp"


RULES: dict[str, type[Estimator]] = {"cl": CL, "pep": PEP, "nep": NEP, "cep": CEP, "pcpl": PCpL, "ncpl": NCpL,
                                     "ccpl": CCpL, "tbp": TBP, "rbp": RBP}
ESTIMATORS.update(RULES)

__all__ = ["CL", "PEP", "NEP", "CEP", "PCpL", "NCpL", "CCpL", "TBP", "RBP", "RULES", "TwoStateRule", "targets",
           "set_target", "clear_target", "get_target", "output_block", "loss_weights"]
