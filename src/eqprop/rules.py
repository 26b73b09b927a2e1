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
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import (DivergenceError, EnergyBlock, HopfieldBlock, RelaxStats, State, _check_positive_int,
                     _check_tol, relative_change)
from .couplings import ConvCoupling, DenseCoupling
from .estimators import ESTIMATORS, ID, NORMALIZE, Estimator, _block_params, _like, error_scale

PRECISIONS = ("deviation", "full", "block")

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
# Relaxation of the second phases
# ---------------------------------------------------------------------------------------

def _supports_deviation(block: EnergyBlock) -> bool:
    return isinstance(block, HopfieldBlock) and all(type(c) in (DenseCoupling, ConvCoupling) for c in block.couplings)


class _DeviationStepper:
    """Fixed-point steps of a HopfieldBlock at s = ref + d, states in float32 (the input's
    dtype), couplings applied to d in the low dtype and added to their values at ref."""

    def __init__(self, block: HopfieldBlock, u: Tensor, ref: State, low: torch.dtype):
        self.block, self.u, self.ref, self.low = block, u, ref, low
        self.scaled = low == torch.float16  # keep small deviations out of float16's subnormal range
        self.w, self.fwd_ref, self.adj_ref, self.unpool_ref = [], [], [], []
        with torch.no_grad():
            for l, c in enumerate(block.couplings):
                if isinstance(c, DenseCoupling):
                    self.w.append(c.linear.weight.to(low))
                    self.fwd_ref.append(c.linear(ref[l].flatten(1)))
                    self.adj_ref.append((ref[l + 1] @ c.linear.weight).view(ref[l].shape))
                    self.unpool_ref.append(None)
                else:
                    conv = c.conv
                    self.w.append(conv.weight.to(low))
                    z = F.conv2d(ref[l], conv.weight, None, padding=conv.padding)
                    if c.pool:
                        _, idx = F.max_pool2d(z, 2, 2, return_indices=True)
                        y = F.max_unpool2d(ref[l + 1], idx, 2, 2, output_size=z.shape[-2:])
                        self.fwd_ref.append(z)
                        self.unpool_ref.append(y)
                    else:
                        self.fwd_ref.append(z if conv.bias is None else z + conv.bias.view(1, -1, 1, 1))
                        self.unpool_ref.append(None)
                        y = ref[l + 1]
                    self.adj_ref.append(F.conv_transpose2d(y, conv.weight, None, padding=conv.padding))

    def _low(self, d: Tensor) -> tuple[Tensor, Tensor | None]:
        if not self.scaled:
            return d.to(self.low), None
        k = d.abs().amax().clamp_min(torch.finfo(torch.float32).tiny).reciprocal()
        return (d * k).to(self.low), k

    def _apply(self, fn: Callable[[Tensor], Tensor], d: Tensor) -> Tensor:
        x, k = self._low(d)
        out = fn(x).to(d.dtype)
        return out if k is None else out / k

    def _forward(self, s: State, l: int, cache: dict) -> tuple[Tensor, object]:
        hit = cache.get(l)
        if hit is not None and hit[0] is s[l]:
            return hit[1]
        c, w, ref = self.block.couplings[l], self.w[l], self.ref[l]
        d = s[l] - ref
        if isinstance(c, DenseCoupling):
            out = (self.fwd_ref[l] + self._apply(lambda x: x.flatten(1) @ w.t(), d), None)
        else:
            z = self.fwd_ref[l] + self._apply(lambda x: F.conv2d(x, w, None, padding=c.conv.padding), d)
            if c.pool:
                p, idx = F.max_pool2d(z, 2, 2, return_indices=True)
                if c.conv.bias is not None:
                    p = p + c.conv.bias.view(1, -1, 1, 1)
                out = (p, (idx, z.shape))
            else:
                out = (z, None)
        cache[l] = (s[l], out)
        return out

    def _adjoint(self, s: State, l: int, cache: dict) -> Tensor:
        c, w = self.block.couplings[l], self.w[l]
        if isinstance(c, DenseCoupling):
            d = s[l + 1] - self.ref[l + 1]
            return self.adj_ref[l] + self._apply(lambda x: x @ w, d).view(s[l].shape)
        if c.pool:
            idx, z_shape = self._forward(s, l, cache)[1]
            d = F.max_unpool2d(s[l + 1], idx, 2, 2, output_size=z_shape[-2:]) - self.unpool_ref[l]
        else:
            d = s[l + 1] - self.ref[l + 1]
        return self.adj_ref[l] + self._apply(lambda x: F.conv_transpose2d(x, w, None, padding=c.conv.padding), d)

    def preactivations(self, s: State, layers, nudge: Tensor | None, cache: dict) -> dict[int, Tensor]:
        L = len(s)
        out = {}
        for l in layers:
            z = self.u if l == 0 else self._forward(s, l - 1, cache)[0]
            if l < L - 1:
                z = z + self._adjoint(s, l, cache)
            if nudge is not None and l == L - 1:
                z = z + nudge
            out[l] = z
        return out


def sweep(block: EnergyBlock, s: State, preactivations, nudge: Tensor | None, cache: dict, held: bool) -> State:
    """One sweep of the fixed-point iteration, as `EnergyBlock.step` (sync, or async by
    parity), with `preactivations(s, layers, nudge, cache)`; with `held` the last layer keeps
    its value (it is never updated, so layers updated after it in a sweep see it)."""
    L = len(s)
    if block.update == "sync":
        groups = [range(L)]
    else:
        odd, even = range(0, L, 2), range(1, L, 2)
        groups = [odd, even] if block.first == "odd" else [even, odd]
    s = list(s)
    for group in groups:
        layers = [l for l in group if not (held and l == L - 1)]
        if not layers:
            continue
        pre = preactivations(s, layers, nudge, cache)
        for l, z in pre.items():
            s[l] = block.activations[l](z)
    return s


def relax_phase(block: EnergyBlock, u: Tensor, s0: State, T: int, tol: float | None, *,
                force: Callable[[Tensor], Tensor] | None = None, clamp: Tensor | None = None,
                precision: str = "block") -> tuple[State, RelaxStats]:
    """Relax from s0 for at most T steps with an output force and/or a held output layer.

    force(s_L) -> extra current on the last layer, re-evaluated at every step (EP's nudge);
    clamp: the value at which the last layer is held (CL, CpL); it does not relax.
    precision: 'deviation', 'full' or 'block' (see the module docstring).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"relax_phase: precision must be one of {PRECISIONS}, got {precision!r}")
    _check_positive_int(block.block_name, "T", T)
    _check_tol(block.block_name, tol)
    out_dtype = u.dtype
    low = block.relax_dtype if block.relax_dtype not in (None, u.dtype) else None
    s = [x.detach() for x in s0]
    if clamp is not None:
        s[-1] = clamp
    if low is not None and precision == "deviation" and _supports_deviation(block):
        stepper = _DeviationStepper(block, u, [x.to(out_dtype) for x in s0], low)
        return _loop(block, stepper.preactivations, s, T, tol, force, clamp is not None)
    if low is not None and precision == "block":
        with torch.autocast(u.device.type, dtype=low):
            u_l = u.to(low)
            s, stats = _loop(block, lambda st, layers, n, c: block.preactivations(st, u_l, layers, n, c),
                             [x.to(low) for x in s], T, tol,
                             None if force is None else (lambda sl: force(sl.to(out_dtype)).to(low)),
                             clamp is not None)
        return [x.to(out_dtype) for x in s], stats
    return _loop(block, lambda st, layers, n, c: block.preactivations(st, u, layers, n, c), s, T, tol, force,
                 clamp is not None)


@torch.no_grad()
def _loop(block: EnergyBlock, preactivations, s: State, T: int, tol: float | None, force, held: bool
          ) -> tuple[State, RelaxStats]:
    cache: dict = {}
    every = block.check_every or (1 if s[0].device.type == "cpu" else 10)
    converged = None if tol is None else False
    t = 0
    change = torch.zeros(())
    while t < T:
        new = sweep(block, s, preactivations, None if force is None else force(s[-1]), cache, held)
        t += 1
        if tol is not None and (t % every == 0 or t == T):
            change = relative_change(new, s)
            if change.item() < tol:
                s, converged = new, True
                break
        elif t == T:
            change = relative_change(new, s)
        s = new
    residual = float(change)
    if not math.isfinite(residual):
        bad = [i + 1 for i, x in enumerate(s) if not torch.isfinite(x).all()]
        if bad:
            raise DivergenceError(f"{block.block_name}: a second phase diverged (non-finite state in layer(s) {bad} "
                                  f"after {t} iterations); lower beta/eta, the learning rate or the weight scale")
    return s, RelaxStats(t, residual, converged)


# ---------------------------------------------------------------------------------------
# The two-state rules
# ---------------------------------------------------------------------------------------

def _check_precision(rule: str, precision) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"{rule}: precision must be one of {PRECISIONS}, got {precision!r}")


class TwoStateRule(Estimator):
    """Base of the energy-based rules: `contrast` gives the two states, the denominator and
    the per-sample weights; the backward turns them into gradients for u and theta."""

    needs_target = True
    T2: int
    tol: float | None
    precision: str
    refine: int

    def attach(self, block: EnergyBlock, u: Tensor, s: State) -> Tensor:
        self.validate()
        if self.refine and self.precision != "block" and block.relax_dtype not in (None, u.dtype):
            s, block.stats["refine"] = relax_phase(block, u.detach(), s, self.refine, None, precision=self.precision)
            block.free_state = s
        return _TwoStateFunction.apply(u, block, self, s, *_block_params(block))

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
        state, block.stats[phase] = relax_phase(block, u, s, self.T2, self.tol, precision=self.precision, **kw)
        return state

    def _reference(self, block: EnergyBlock, u: Tensor, s: State) -> State:
        """The unperturbed state to contrast with: s* itself, or (when the second phases run
        in another precision than the free phase) s* relaxed under the same precision."""
        low = block.relax_dtype not in (None, u.dtype)
        if low and self.precision != "block":
            return self._relax(block, u, s, "reference")
        return s

    def _validate_common(self) -> None:
        if isinstance(self.refine, bool) or not isinstance(self.refine, int) or self.refine < 0:
            raise ValueError(f"{self.name}: refine must be a non-negative integer, got {self.refine!r}")
        _check_positive_int(self.name, "T2", self.T2)
        _check_tol(self.name, self.tol)
        _check_precision(self.name, self.precision)


class _TwoStateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, block, rule, s, *params):
        ctx.block, ctx.rule = block, rule
        ctx.save_for_backward(u, *s)
        return s[-1].clone()

    @staticmethod
    def backward(ctx, grad_out):
        u, *s = ctx.saved_tensors
        block, rule = ctx.block, ctx.rule
        first, second, denom, w = rule.contrast(block, u, s, grad_out)
        grad_u = None
        if ctx.needs_input_grad[0]:
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
        return clamped, self._reference(block, u, s), 1.0, w


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
                                   force=lambda sl: -beta * (sl - y))
        else:
            w = error_scale(delta, self.normalize)
            c = _like(w, delta)
            delta_hat = torch.where(c > 0, delta / c.clamp_min(torch.finfo(delta.dtype).tiny), torch.zeros_like(delta))

            def nudged(sign: int) -> State:
                current = -sign * self.beta * delta_hat
                return self._relax(block, u, s, "nudged+" if sign > 0 else "nudged-", force=lambda sl: current)
        if self.signs == (1, -1):
            return nudged(1), nudged(-1), 2 * self.beta, w
        if self.signs == (1,):
            return nudged(1), self._reference(block, u, s), self.beta, w
        return self._reference(block, u, s), nudged(-1), self.beta, w


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
            return held(1), self._reference(block, u, s), self.eta, w
        return self._reference(block, u, s), held(-1), self.eta, w


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
        low = block.relax_dtype if block.relax_dtype not in (None, u.dtype) else None
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
           "set_target", "clear_target", "get_target", "output_block", "relax_phase", "loss_weights"]
