"""Krylov solvers on lists of tensors (one tensor per layer), for the adjoint of ID.

The vectors are the block's states (a list of tensors, batch included); an operator is a
function from such a list to another. Scalars stay on the device: the only host-device
synchronisations are the convergence checks, every `check_every` iterations.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Vector = list[Tensor]

__all__ = ["SolveStats", "minres"]


@dataclass(frozen=True)
class SolveStats:
    """Iterations run, final relative residual ||b - M x|| / ||b||, whether tol was met."""

    iters: int
    residual: float
    converged: bool


def _dot(a: Vector, b: Vector) -> Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b))


def _axpy(alpha: Tensor | float, x: Vector, y: Vector) -> Vector:
    """alpha x + y."""
    return [alpha * a + b for a, b in zip(x, y)]


def minres(apply: Callable[[Vector], Vector], b: Vector, *, max_iter: int, tol: float,
           check_every: int = 1) -> tuple[Vector, SolveStats]:
    """Solve M x = b for a symmetric (possibly indefinite) operator M by MINRES (Paige and
    Saunders, 1975): x minimises ||b - M x|| over the Krylov space of the iterations, so the
    residual never grows and the method converges whenever M is nonsingular, unlike a
    fixed-point iteration, which needs the spectral radius of I - M below 1.

    `apply(v)` returns M v. Stops when the relative residual (MINRES's own estimate) falls
    below `tol`, checked every `check_every` iterations, or after `max_iter` iterations.
    """
    beta1 = _dot(b, b).sqrt()
    if beta1.item() == 0:
        return [torch.zeros_like(t) for t in b], SolveStats(0, 0.0, True)
    zero = [torch.zeros_like(t) for t in b]
    x = zero
    r1, r2, y = b, b, b
    beta, oldb = beta1, torch.zeros_like(beta1)
    dbar = epsln = torch.zeros_like(beta1)
    phibar = beta1
    cs, sn = -torch.ones_like(beta1), torch.zeros_like(beta1)
    w, w2 = zero, zero
    tiny = torch.finfo(torch.float64).tiny
    iters, rel = 0, 1.0
    while iters < max_iter:
        safe_beta = torch.where(beta > tiny, beta, torch.ones_like(beta))  # beta = 0: exhausted, x exact
        v = [t / safe_beta.to(t.dtype) for t in y]
        y = apply(v)
        if iters >= 1:
            y = _axpy(-(beta / torch.where(oldb > tiny, oldb, torch.ones_like(oldb))), r1, y)
        alfa = _dot(v, y)
        y = _axpy(-(alfa / safe_beta), r2, y)
        r1, r2 = r2, y
        oldb, beta = beta, _dot(y, y).sqrt()
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.sqrt(gbar * gbar + beta * beta)
        gamma = torch.where(gamma > tiny, gamma, torch.ones_like(gamma))
        cs, sn = gbar / gamma, beta / gamma
        phi, phibar = cs * phibar, sn * phibar
        w1, w2 = w2, w
        w = [(vi - oldeps.to(vi.dtype) * a - delta.to(vi.dtype) * c) / gamma.to(vi.dtype)
             for vi, a, c in zip(v, w1, w2)]
        x = _axpy(phi.to(b[0].dtype), w, x)
        iters += 1
        if iters % check_every == 0 or iters == max_iter:
            rel = (phibar / beta1).item()
            if rel < tol or beta.item() <= tiny:  # beta = 0: the Krylov space is exhausted, x is exact
                return x, SolveStats(iters, rel, True)
    return x, SolveStats(iters, rel, rel < tol)
