"""The energy-based learning family beyond EP: contrastive learning (CL), coupled learning
(CpL) in all signs and truncated backprop (TBP), as estimators of the same contract as
eqprop.estimators. EP's one-sided variants and recurrent backprop are the core's EP and
ID; the registry (eqprop.registry) knows them by their names pep/nep/cep and rbp too.

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
layer. Give it to the forward, explicitly or through a context:

    out = model(x, target=y)                      # FFEBM: one-hot (B, K) or labels (B,)
    with eqprop.targets(model, y):                # any module holding the block
        out = model(x)
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
        Needs a `HopfieldBlock`; other blocks use 'full'.
    'full':  second phases in the input's dtype (float32), from the 16-bit free state.
    'block': second phases like the free phase (16-bit states).
  refine: iterations of the free phase re-run the same way ('deviation' or 'full') from
      the 16-bit free state before the second phases (default 10; 0 to skip). The refined
      state is the block's output.
Unless precision is 'block', a one-sided rule contrasts with a reference state relaxed
without perturbation from s* under the same precision and steps, not with s* itself.
With hard-sigmoid neurons and max-pooling the free dynamics can have several nearby
equilibria; a 16-bit free phase may settle in another one than the float32 phase, and no
handling of the second phases changes that (docs/algorithms.md has the measurements).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .blocks import EnergyBlock, RelaxRecord, RelaxStats, State
from .estimators import VARIANTS, Contrast, ContrastEstimator, Estimator
from .precision import low_dtype
from .validate import check_choice, check_positive, check_positive_int

__all__ = ["CL", "CpL", "TBP"]


@dataclass(frozen=True, kw_only=True)
class CL(ContrastEstimator):
    """Contrastive learning: second state with the output layer clamped to the target;
    update -(dPhi/dtheta(clamped) - dPhi/dtheta(free)), weighted like the loss.

    It does not follow the loss gradient (the clamped state does not tend to s* when the
    error is small relative to the network's response). Only for a block that holds the
    output layer."""

    name: ClassVar[str] = "cl"
    needs_target: ClassVar[bool] = True

    def contrast(self, block: EnergyBlock, u: Tensor, s: State, delta: Tensor, target: Tensor | None) -> Contrast:
        y, w = self.target_and_weights(block, s, delta, target)
        stats: dict[str, RelaxStats] = {}
        clamped, stats["clamped"] = self.relax(block, u, s, clamp=y)
        return Contrast(clamped, self.reference(block, u, s, stats), 1.0, w, stats)


@dataclass(frozen=True, kw_only=True)
class CpL(ContrastEstimator):
    """Coupled learning: the output layer is held a fraction eta of the way towards the
    target (variant 'positive'), away from it ('negative') or both ('centered') while the
    other layers relax; update from the difference of dPhi/dtheta divided by eta (2 eta).

    As eta -> 0 the update is the gradient of the loss with the error current S (s*_L - y)
    instead of (s*_L - y), S = [d s*_L / d(current on s_L)]^-1 (the output layer's inverse
    response): it follows the loss gradient when the output's response is close to a
    multiple of the identity. Only for a block that holds the output layer.
    """

    eta: float = 0.5
    variant: str = "centered"
    name: ClassVar[str] = "cpl"
    needs_target: ClassVar[bool] = True

    def validate(self) -> None:
        check_positive(self.name, "eta", self.eta, below=1)
        check_choice(self.name, "variant", self.variant, VARIANTS)
        super().validate()

    def contrast(self, block: EnergyBlock, u: Tensor, s: State, delta: Tensor, target: Tensor | None) -> Contrast:
        y, w = self.target_and_weights(block, s, delta, target)
        out = s[-1]
        stats: dict[str, RelaxStats] = {}

        def held(sign: int) -> State:
            state, stats["held+" if sign > 0 else "held-"] = self.relax(block, u, s,
                                                                        clamp=out + sign * self.eta * (y - out))
            return state

        return self.by_variant(self.variant, held, self.eta, w, block, u, s, stats)


@dataclass(frozen=True, kw_only=True)
class TBP(Estimator):
    """Truncated backprop: backpropagate through the last K iterations of the free phase.

    The block's forward has already run the free phase when the estimator is called, so
    TBP re-runs its first (iterations - K) steps without autograd (the same deterministic
    path) and the last K with autograd; the output is the free state of the forward.
    With a tolerance, the free phase's actual iteration count is used."""

    K: int = 10
    name: ClassVar[str] = "tbp"

    def validate(self) -> None:
        check_positive_int(self.name, "K", self.K)

    def attach(self, block: EnergyBlock, u: Tensor, s: State, *, target: Tensor | None = None,
               record: RelaxRecord | None = None) -> Tensor:
        record = {} if record is None else record
        if not torch.is_grad_enabled():
            return s[-1]
        iters = record["free"].iters if "free" in record else block.T1
        head = iters - self.K
        if head > 0:
            s, record["tbp-head"] = block.relax(u.detach(), None, head, tol=None)
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
