"""Continual Equilibrium Propagation (C-EP): EP whose parameters move at every step of the
nudged phase, so that no state of the free phase has to be kept (local in space and time).

After the free phase (the block's forward) reaches s*, the nudged phase runs from s_0 = s*
and, at each step t, the parameters take the local update

    s_{t+1}     = step(s_t; theta_t) with the nudge on the last layer
    theta_{t+1} = theta_t + (eta / beta) * sum_b w_b (dPhi_b/dtheta(s_{t+1}; theta_t) - dPhi_b/dtheta(s_t; theta_t))

('positive' variant, the published algorithm; the dynamics of step t + 1 see theta_{t+1}).
Summed over the phase, at fixed theta, the updates telescope to EP's: as eta -> 0 the total
change divided by -eta is EP's gradient estimate (same beta, same T2, no tolerance). For
small eta and beta, the normalised update of step t follows the gradient that truncated
backprop assigns to the t-th last step of the free phase (docs/local_learning.md).

How it fits the estimator contract: the backward runs the nudged phase on a working copy of
the parameters (the dynamics use the moving copy through `torch.func.functional_call`; the
module itself is untouched) and returns

    grad = -(theta_T2 - theta_0) / eta

as the parameters' gradient, so that `torch.optim.SGD(params, lr=eta)` (no momentum, no
weight decay) leaves every parameter exactly where C-EP puts it. Another optimizer applies
its own step to this gradient; eta then only sets how far the weights drift within the
nudged phase. The input error current dl/du (for upstream modules of an ff-EBM) is the
contrast of the first layer's states, -w (s_1(T2) - s*_1) / beta, as for EP.

Variants: 'positive' (one phase nudged by +beta), 'negative' (one phase by -beta, updates of
the opposite sign) and 'centered' (two phases, +beta and -beta, run side by side from s* on
the same moving parameters; each step's update is the difference of their two increments
over 2 beta, which telescopes to centered EP). Registered as 'continual' ('cep' is the name of
centered EP).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .blocks import DivergenceError, EnergyBlock, RelaxRecord, RelaxStats, State, relative_change
from .estimators import NORMALIZE, VARIANTS, Estimator, ep_nudge, per_sample
from .validate import check_choice, check_positive, check_positive_int

__all__ = ["ContinualEP", "ContinualRun"]

SIGNS = {"positive": (1,), "negative": (-1,), "centered": (1, -1)}


class _Bound(nn.Module):
    """Calls a method of `block` by name, so that functional_call can swap its parameters."""

    def __init__(self, block: EnergyBlock):
        super().__init__()
        self.block = block

    def forward(self, method: str, *args):
        return getattr(self.block, method)(*args)


@dataclass(frozen=True)
class ContinualRun:
    """What one continual nudged phase did.

    states:  final state of each nudged phase, by sign (+1, -1)
    change:  theta_T2 - theta_0 per parameter (the sum of the per-step updates)
    weights: per-sample weights w of the loss (see eqprop.estimators.Contrast)
    denom:   beta (one-sided) or 2 beta (centered)
    stats:   RelaxStats of the phases, by phase name ('nudged+', 'nudged-')
    """

    states: dict[int, State]
    change: list[Tensor]
    weights: Tensor
    denom: float
    stats: dict[str, RelaxStats]


@dataclass(frozen=True, kw_only=True)
class ContinualEP(Estimator):
    """Continual EP (C-EP): parameters updated at every step of the nudged phase.

    beta:      nudging strength (> 0)
    eta:       learning rate of the per-step updates (> 0); the returned gradient is
               -(total change) / eta, so SGD with lr = eta applies C-EP exactly
    T2:        steps of the nudged phase (no tolerance: every step updates the parameters)
    variant:   'positive' (published C-EP), 'negative' or 'centered' (see the module)
    normalize: how the error current is normalised before nudging, as for EP

    Keep eta well below beta for the one-sided variants: the weights' own drift changes the
    states by O(eta), which they divide by beta (docs/local_learning.md measures it).

    Nudging is EP's: with a target, the cost 1/2 ||s_L - y||^2 (re-evaluated at every step);
    without one, the normalised error current that autograd delivers.
    """

    beta: float = 0.2
    eta: float = 0.01
    T2: int = 20
    variant: str = "positive"
    normalize: str = "sample"
    name: ClassVar[str] = "continual"

    def validate(self) -> None:
        check_positive(self.name, "beta", self.beta)
        check_positive(self.name, "eta", self.eta)
        check_positive_int(self.name, "T2", self.T2)
        check_choice(self.name, "variant", self.variant, VARIANTS)
        check_choice(self.name, "normalize", self.normalize, NORMALIZE)

    def attach(self, block: EnergyBlock, u: Tensor, s: State, *, target: Tensor | None = None,
               record: RelaxRecord | None = None) -> Tensor:
        if block.relax_dtype is not None and block.relax_dtype != u.dtype:
            raise ValueError(f"{self.name} ({block.block_name}): relax_dtype={block.relax_dtype} is not supported; "
                             f"the continual nudged phase runs in the parameters' dtype, set relax_dtype to None")
        return super().attach(block, u, s, target=target, record=record)

    def gradients(self, block: EnergyBlock, u: Tensor, s: State, delta: Tensor, target: Tensor | None,
                  record: RelaxRecord, need_input: bool) -> tuple[Tensor | None, list[Tensor | None]]:
        run = self.run(block, u, s, delta, target)
        record.update(run.stats)
        grad_u = None
        if need_input:
            diff = sum(sign * (run.states[sign][0] - s[0]) for sign in run.states)
            grad_u = -diff * (per_sample(run.weights, u) / run.denom)
        return grad_u, [-d / self.eta for d in run.change]

    def run(self, block: EnergyBlock, u: Tensor, s: State, delta: Tensor, target: Tensor | None = None,
            callback: Callable[[int, list[Tensor]], None] | None = None) -> ContinualRun:
        """The continual nudged phase(s) from the free equilibrium `s` for the error current
        `delta` = dl/ds_L (and the target, if any), on a working copy of the parameters.

        callback(t, update) is called after step t (1-based) with that step's parameter
        update theta_t - theta_{t-1} (for analyses: the per-step updates of the theorem).
        """
        u = u.detach()
        s = [x.detach() for x in s]
        signed, w = ep_nudge(self.name, self.beta, self.normalize, block, s, delta.detach(), target)

        def nudge(sign: int, sl: Tensor) -> Tensor:
            force = signed(sign)
            return force(sl) if callable(force) else force

        signs = SIGNS[self.variant]
        denom = self.beta * len(signs)
        named = [(f"block.{n}", p) for n, p in block.named_parameters() if p.requires_grad]
        names = [n for n, _ in named]
        theta0 = [p.detach() for _, p in named]
        change = [torch.zeros_like(p) for p in theta0]
        bound = _Bound(block)
        scale = (w * (self.eta / denom)).to(u.dtype).expand(u.shape[0])
        states = {sign: s for sign in signs}
        previous = states
        for t in range(self.T2):
            theta = [p + d for p, d in zip(theta0, change)]
            with torch.no_grad():
                new = {sign: functional_call(bound, dict(zip(names, theta)), ("step", x, u, nudge(sign, x[-1])))
                       for sign, x in states.items()}
            if named:
                leaves = [p.requires_grad_(True) for p in theta]
                with torch.enable_grad():
                    params = dict(zip(names, leaves))
                    diff = sum(sign * (functional_call(bound, params, ("phi", new[sign], u))
                                       - functional_call(bound, params, ("phi", states[sign], u)))
                               for sign in signs)
                    step = torch.autograd.grad(diff, leaves, grad_outputs=scale, allow_unused=True)
                update = [torch.zeros_like(p) if g is None else g for p, g in zip(theta0, step)]
                change = [c + g for c, g in zip(change, update)]
                if callback is not None:
                    callback(t + 1, update)
            previous, states = states, new
        # one synchronisation: each phase's last relative change, and whether its state is finite
        values = torch.stack([v for sign in signs for v in (
            relative_change(states[sign], previous[sign]).float(),
            torch.stack([torch.isfinite(x).all() for x in states[sign]]).all().float())]).tolist()
        stats = {}
        for k, sign in enumerate(signs):
            residual, finite = values[2 * k], values[2 * k + 1]
            phase = "nudged+" if sign > 0 else "nudged-"
            if not finite:
                raise DivergenceError(f"{block.block_name}: the continual nudged phase ({phase}) diverged; lower "
                                      f"{self.name}'s eta or beta, or the learning rate")
            stats[phase] = RelaxStats(self.T2, residual, None)
        return ContinualRun(states, change, w, denom, stats)

