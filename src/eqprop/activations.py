"""Neuron activations sigma and their convex potentials G (G' = sigma^-1).

The fixed point of an energy-based block is s = sigma(dPhi/ds); the energy
E = sum G(s) - Phi is only needed to report its value, never to relax.
"""
from __future__ import annotations

import torch
from torch import Tensor


class Activation:
    """Base class: `__call__` is sigma, `potential` is G summed per sample."""

    name = "activation"

    def __call__(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def potential(self, s: Tensor) -> Tensor:
        """Sum over all non-batch dimensions of G(s): shape (batch,)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SlopedActivation(Activation):
    """An activation sigma(a z) with a slope a > 0."""

    def __init__(self, slope: float = 1.0):
        if isinstance(slope, bool) or not isinstance(slope, (int, float)) or not slope > 0:
            raise ValueError(f"{type(self).__name__}: slope must be a number > 0, got {slope!r}")
        self.slope = float(slope)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(slope={self.slope})"


class HardSigmoid(SlopedActivation):
    """sigma(z) = clamp(a z, 0, 1), the published activation (slope a = 0.5, 0.65 or 1)."""

    name = "hardsigmoid"

    def __call__(self, z: Tensor) -> Tensor:
        return (z * self.slope).clamp_(0.0, 1.0)

    def potential(self, s: Tensor) -> Tensor:
        return (s * s).flatten(1).sum(1) / (2 * self.slope)


class Logistic(SlopedActivation):
    """sigma(z) = 1 / (1 + exp(-a z)): smooth, for exact gradient comparisons."""

    name = "sigmoid"

    def __call__(self, z: Tensor) -> Tensor:
        return torch.sigmoid(z * self.slope)

    def potential(self, s: Tensor) -> Tensor:
        s = s.clamp(1e-12, 1 - 1e-12)
        g = s * torch.log(s) + (1 - s) * torch.log1p(-s)
        return g.flatten(1).sum(1) / self.slope


class Identity(Activation):
    """Linear neurons (G = s^2 / 2): for a last layer that feeds a readout."""

    name = "identity"

    def __call__(self, z: Tensor) -> Tensor:
        return z

    def potential(self, s: Tensor) -> Tensor:
        return 0.5 * (s * s).flatten(1).sum(1)


def make_activation(name: str | Activation, slope: float = 1.0) -> Activation:
    """Build an activation from its name: 'hardsigmoid', 'sigmoid' or 'identity'."""
    if isinstance(name, Activation):
        return name
    table = {"hardsigmoid": HardSigmoid, "hard_sigmoid": HardSigmoid, "sigmoid": Logistic, "logistic": Logistic}
    if name in table:
        return table[name](slope)
    if name in ("identity", "linear"):
        return Identity()
    raise ValueError(f"unknown activation {name!r}: expected 'hardsigmoid', 'sigmoid' or 'identity'")


__all__ = ["Activation", "SlopedActivation", "HardSigmoid", "Logistic", "Identity", "make_activation"]
