"""Reduced-precision relaxation that keeps EP-style differences accurate.

In 16 bits the nudge's effect on the states (~beta * error) lies below the resolution of
the states, and a 16-bit free state is not a float32 fixed point. `relax_with_precision`
runs a phase in one of three ways:

  'deviation': relax s = s_ref + d with the state kept in the input's dtype (float32);
      every coupling is applied to the deviation d = s - s_ref in the block's 16-bit
      `relax_dtype` and added to its full-precision value at s_ref (computed once per
      phase), so rounding errors scale with |d|, not |s|. Needs a `HopfieldBlock` (its
      couplings give their linear parts); other blocks fall back to 'full'.
  'full':  the phase in the input's dtype, from the 16-bit free state.
  'block': the phase like the free phase (16-bit states under autocast).
Without a `relax_dtype` all three are the block's ordinary relaxation.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .blocks import EnergyBlock, HopfieldBlock, RelaxStats, State
from .validate import check_choice, check_positive_int, check_tol

__all__ = ["PRECISIONS", "check_precision", "low_dtype", "supports_deviation", "DeviationStepper",
           "relax_with_precision"]

PRECISIONS = ("deviation", "full", "block")


def check_precision(owner: str, precision: object) -> None:
    check_choice(owner, "precision", precision, PRECISIONS)


def low_dtype(block: EnergyBlock, u: Tensor) -> torch.dtype | None:
    """The block's reduced relaxation dtype, or None when it relaxes in u's dtype."""
    return block.relax_dtype if block.relax_dtype not in (None, u.dtype) else None


def supports_deviation(block: EnergyBlock) -> bool:
    """Deviation stepping needs the analytical step of a `HopfieldBlock` (any couplings)."""
    return isinstance(block, HopfieldBlock)


class DeviationStepper:
    """Fixed-point steps of a HopfieldBlock at s = ref + d, states in float32 (the input's
    dtype), each coupling's linear part applied to d in the low dtype and added to its
    value at ref; routing (max-pooling) and bias act on the full pre-activation."""

    def __init__(self, block: HopfieldBlock, u: Tensor, ref: State, low: torch.dtype):
        self.block, self.u, self.ref, self.low = block, u, ref, low
        self.scaled = low == torch.float16  # keep small deviations out of float16's subnormal range
        self.w, self.lin_ref, self.adj_ref, self.back_ref = [], [], [], []
        with torch.no_grad():
            for l, c in enumerate(block.couplings):
                self.w.append(c.weight.to(low))
                z = c.linear_map(ref[l])
                self.lin_ref.append(z)
                _, aux = c.route(z)
                y = c.route_adjoint(ref[l + 1], aux, z.shape)  # route^T at the reference's routing
                self.back_ref.append(y)
                self.adj_ref.append(c.linear_adjoint(y, ref[l].shape))

    def _apply(self, fn: Callable[[Tensor], Tensor], d: Tensor) -> Tensor:
        if not self.scaled:
            return fn(d.to(self.low)).to(d.dtype)
        k = d.abs().amax().clamp_min(torch.finfo(torch.float32).tiny).reciprocal()
        return fn((d * k).to(self.low)).to(d.dtype) / k

    def _forward(self, s: State, l: int, cache: dict) -> tuple[Tensor, object]:
        hit = cache.get(l)
        if hit is not None and hit[0] is s[l]:
            return hit[1]
        c, w = self.block.couplings[l], self.w[l]
        z = self.lin_ref[l] + self._apply(lambda x: c.linear_map(x, w), s[l] - self.ref[l])
        y, aux = c.route(z)
        out = (c.add_bias(y), (aux, z.shape))
        cache[l] = (s[l], out)
        return out

    def _adjoint(self, s: State, l: int, cache: dict) -> Tensor:
        c, w = self.block.couplings[l], self.w[l]
        if c.routed:
            aux, z_shape = self._forward(s, l, cache)[1]
            d = c.route_adjoint(s[l + 1], aux, z_shape) - self.back_ref[l]
        else:
            d = s[l + 1] - self.back_ref[l]
        return self.adj_ref[l] + self._apply(lambda x: c.linear_adjoint(x, s[l].shape, w), d)

    def preactivations(self, s: State, u: Tensor, layers, nudge: Tensor | None = None, cache: dict | None = None
                       ) -> dict[int, Tensor]:
        """Same signature as `EnergyBlock.preactivations` (u is the stepper's own)."""
        cache = {} if cache is None else cache
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


def relax_with_precision(block: EnergyBlock, u: Tensor, s0: State, T: int, tol: float | None, *,
                         nudge: Tensor | Callable[[Tensor], Tensor] | None = None, clamp: Tensor | None = None,
                         precision: str = "deviation", preactivations: Callable | None = None,
                         start: State | None = None) -> tuple[State, RelaxStats]:
    """`block.relax` from s0 (or from `start`) for at most T steps, with 16-bit handling `precision`.

    nudge: extra current on the last layer (tensor, or function of the last layer's state);
    clamp: hold the last layer at this value (it does not relax);
    preactivations: replaces the block's own (e.g. held pooling routes, eqprop.routing); with a
    16-bit relax_dtype only precision 'full' can take it.
    start: the state the iteration starts from when it is not s0 (s0 stays the free state
    that precision 'deviation' measures the deviations from).
    """
    check_precision(block.block_name, precision)
    check_positive_int(block.block_name, "T", T)
    check_tol(block.block_name, tol)
    if start is not None and [x.shape for x in start] != [x.shape for x in s0]:
        raise ValueError(f"{block.block_name}: the start state's shapes {[tuple(x.shape) for x in start]} differ "
                         f"from the free state's {[tuple(x.shape) for x in s0]}")
    s = [x.detach() for x in (s0 if start is None else start)]
    if clamp is not None:
        s[-1] = clamp
    kw = dict(T=T, tol=tol, nudge=nudge, hold_last=clamp is not None)
    low = low_dtype(block, u)
    if preactivations is not None:
        if low is not None and precision != "full":
            raise ValueError(f"{block.block_name}: these second phases replace the block's preactivations (held "
                             f"pooling routes), which a {low} relaxation with precision={precision!r} cannot; use "
                             f"precision='full'")
        return block.relax(u, s, preactivations=preactivations, **kw)
    if low is None or precision == "block":
        return block.relax(u, s, **kw)
    if precision == "deviation" and supports_deviation(block):
        stepper = DeviationStepper(block, u, [x.to(u.dtype) for x in s0], low)
        return block.relax(u, s, preactivations=stepper.preactivations, **kw)
    return block.relax(u, s, preactivations=block.preactivations, **kw)  # 'full': u's dtype, no autocast
