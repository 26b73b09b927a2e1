"""Solvers on lists of tensors (one tensor per layer): a Krylov solver for the adjoint of ID
and Anderson acceleration of a block's relaxation.

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

__all__ = ["AndersonMixer", "SolveStats", "minres"]


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


def _sample_dot(a: Vector, b: Vector) -> Tensor:
    """Per-sample inner product over all layers: a (batch,) float64 tensor."""
    return sum((x.double() * y.double()).sum(dim=tuple(range(1, x.dim()))) for x, y in zip(a, b))


class AndersonMixer:
    """Anderson acceleration (type II, per sample) of a fixed-point iteration x <- G(x).

    `mix(x, g)` takes the current iterate x and g = G(x) and returns the next iterate
    sum_i alpha_i g_i over the last m pairs, where alpha (sum 1, one set per sample)
    minimises || sum_i alpha_i (g_i - x_i) ||. The small m x m systems are solved on the
    device in float64 (Tikhonov-regularised, relative 1e-10); a sample whose system
    fails falls back to the plain step g. No host-device synchronisation.
    """

    def __init__(self, m: int):
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"AndersonMixer: m must be a positive integer, got {m!r}")
        self.m = m
        self.g: list[Vector] = []
        self.f: list[Vector] = []
        self.gram: Tensor | None = None  # (batch, m, m): inner products of the stored residuals

    def mix(self, x: Vector, g: Vector) -> Vector:
        f = [b - a for a, b in zip(x, g)]
        if len(self.f) == self.m:
            self.g.pop(0)
            self.f.pop(0)
            self.gram = self.gram[:, 1:, 1:]
        dots = torch.stack([_sample_dot(f, old) for old in self.f] + [_sample_dot(f, f)], dim=1)  # (batch, k)
        k = dots.shape[1]
        gram = dots.new_zeros(dots.shape[0], k, k)
        if k > 1:
            gram[:, :-1, :-1] = self.gram
        gram[:, -1, :] = dots
        gram[:, :, -1] = dots
        self.g.append(g)
        self.f.append(f)
        self.gram = gram
        if k == 1:
            return g
        scale = torch.diagonal(gram, dim1=1, dim2=2).mean(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
        alpha, info = torch.linalg.solve_ex(gram + 1e-10 * scale[:, None, None] * eye, torch.ones_like(dots))
        alpha = alpha / alpha.sum(dim=1, keepdim=True)
        plain = torch.zeros_like(alpha)
        plain[:, -1] = 1
        alpha = torch.where(((info == 0) & torch.isfinite(alpha).all(dim=1))[:, None], alpha, plain)
        out = []
        for layer in range(len(g)):
            like = g[layer]
            w = alpha.to(like.dtype if like.is_floating_point() else torch.float32)
            acc = torch.zeros_like(like)
            for i, gi in enumerate(self.g):
                acc.add_(gi[layer] * w[:, i].view(-1, *([1] * (like.dim() - 1))))
            out.append(acc)
        return out
