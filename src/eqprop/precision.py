"""Reduced-precision relaxation that keeps EP-style differences accurate.

In 16 bits the nudge's effect on the states (~beta * error) lies below the resolution of
the states, and a 16-bit free state is not a float32 fixed point. `relax_with_precision`
runs a phase in one of three ways:

  'deviation': relax s = s_ref + d with the state kept in the input's dtype (float32);
      every coupling is applied to the deviation d = s - s_ref in the block's 16-bit
      `relax_dtype` and added to its full-precision value at s_ref (computed once per
      phase), so rounding errors scale with |d|, not |s|. Needs a `HopfieldBlock` of
      dense/conv couplings; other blocks fall back to 'full'.
  'full':  the phase in the input's dtype, from the 16-bit free state.
  'block': the phase like the free phase (16-bit states under autocast).
Without a `relax_dtype` all three are the block's ordinary relaxation.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .blocks import EnergyBlock, HopfieldBlock, RelaxStats, State, _check_positive_int, _check_tol
from .couplings import ConvCoupling, DenseCoupling

PRECISIONS = ("deviation", "full", "block")


def check_precision(owner: str, precision) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"{owner}: precision must be one of {PRECISIONS}, got {precision!r}")


def low_dtype(block: EnergyBlock, u: Tensor) -> torch.dtype | None:
    """The block's reduced relaxation dtype, or None when it relaxes in u's dtype."""
    return block.relax_dtype if block.relax_dtype not in (None, u.dtype) else None


def supports_deviation(block: EnergyBlock) -> bool:
    return isinstance(block, HopfieldBlock) and all(type(c) in (DenseCoupling, ConvCoupling) for c in block.couplings)


class DeviationStepper:
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
                         precision: str = "deviation") -> tuple[State, RelaxStats]:
    """`block.relax` from s0 for at most T steps, with 16-bit handling `precision`.

    nudge: extra current on the last layer (tensor, or function of the last layer's state);
    clamp: hold the last layer at this value (it does not relax).
    """
    check_precision(block.block_name, precision)
    _check_positive_int(block.block_name, "T", T)
    _check_tol(block.block_name, tol)
    s = [x.detach() for x in s0]
    if clamp is not None:
        s[-1] = clamp
    kw = dict(T=T, tol=tol, nudge=nudge, hold_last=clamp is not None)
    low = low_dtype(block, u)
    if low is None or precision == "block":
        return block.relax(u, s, **kw)
    if precision == "deviation" and supports_deviation(block):
        stepper = DeviationStepper(block, u, [x.to(u.dtype) for x in s0], low)
        return block.relax(u, s, preactivations=stepper.preactivations, **kw)
    return block.relax(u, s, preactivations=block.preactivations, **kw)  # 'full': u's dtype, no autocast
