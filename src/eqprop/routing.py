"""Held pooling routes: the second phases of a contrast with every in-block max-pool's choice
held at its free-equilibrium value.

Between two nudged states an in-block 2x2 max-pool may switch its argmax; the switched unit
then sends its whole top-down signal elsewhere, a jump of the size of the state divided by
the nudging strength in the contrast. Holding the switches where the free phase left them (a
sample-and-hold of the pooling choice, which an analog circuit can do) makes the nudged
dynamics and the parameter contrast those of one linear routing, so the contrast follows the
gradient at that routing (docs/gradients.md has the measurements). As beta -> 0 nothing
switches and held and free routing give the same limit (implicit differentiation).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .blocks import EnergyBlock, HopfieldBlock, State

__all__ = ["HeldRouting", "held_routing"]


class HeldRouting:
    """A Hopfield block's preactivations and Phi with each coupling's routing fixed at the
    state `s` (same signatures as the block's, so `block.relax(..., preactivations=...)`
    runs a phase with the routes held)."""

    def __init__(self, block: HopfieldBlock, s: State):
        self.block = block
        with torch.no_grad():
            self.aux = [c(x)[1] if c.routed else None for c, x in zip(block.couplings, s)]

    def forward_map(self, l: int, x: Tensor) -> Tensor:
        """T_l(x) + b_l with coupling l's routing held."""
        return self.block.couplings[l].forward_held(x, self.aux[l])

    def preactivations(self, s: State, u: Tensor, layers: Sequence[int], nudge: Tensor | None = None,
                       cache: dict | None = None) -> dict[int, Tensor]:
        L, out = len(s), {}
        for l in layers:
            z = u if l == 0 else self._memo(s, l - 1, cache)
            if l < L - 1:
                z = z + self.block.couplings[l].adjoint(s[l + 1], self.aux[l], s[l].shape)
            if nudge is not None and l == L - 1:
                z = z + nudge
            out[l] = z
        return out

    def _memo(self, s: State, l: int, cache: dict | None) -> Tensor:
        """T_l(s_l), memoised on the identity of s_l within one relaxation (its `cache`)."""
        key = ("held", l)
        if cache is not None:
            hit = cache.get(key)
            if hit is not None and hit[0] is s[l]:
                return hit[1]
        y = self.forward_map(l, s[l])
        if cache is not None:
            cache[key] = (s[l], y)
        return y

    def phi(self, s: State, u: Tensor) -> Tensor:
        """Phi per sample with the routes held (its parameter derivative is the contrast's)."""
        out = (s[0] * u).flatten(1).sum(1)
        for l in range(len(s) - 1):
            out = out + (s[l + 1] * self.forward_map(l, s[l])).flatten(1).sum(1)
        return out


def held_routing(block: EnergyBlock, s: State, owner: str) -> HeldRouting | None:
    """The held routing of `block` at the free state `s`, or None when the block routes
    nothing (no in-block pooling: held and free are the same). Raises for a block whose
    dynamics are not the Hopfield block's own (held routes are defined for those)."""
    couplings = getattr(block, "couplings", None)
    if couplings is None or not any(getattr(c, "routed", False) for c in couplings):
        return None
    if not isinstance(block, HopfieldBlock) or type(block).preactivations is not HopfieldBlock.preactivations:
        raise ValueError(f"{owner} ({block.block_name}): pool='held' needs a HopfieldBlock with its own "
                         f"preactivations; {type(block).__name__} defines other dynamics")
    if block.device is not None and not block.device.ideal:
        raise ValueError(f"{owner} ({block.block_name}): pool='held' is not available with a device model yet "
                         f"(its relaxations read the weights through the device); use pool='free'")
    return HeldRouting(block, s)
