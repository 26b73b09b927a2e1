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

from .couplings import is_channels_last

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


def _flat(x: Tensor) -> Tensor:
    """(batch, n) view of x in its memory order (contiguous or channels-last); a copy otherwise."""
    b = x.shape[0]
    if is_channels_last(x):
        return x.permute(0, 2, 3, 1).reshape(b, -1)
    return x.reshape(b, -1)


def _unflat(flat: Tensor, like: Tensor) -> Tensor:
    """The inverse of `_flat` into like's shape, keeping a channels-last layout."""
    if is_channels_last(like):
        n, c, h, w = like.shape
        return flat.view(n, h, w, c).permute(0, 3, 1, 2)
    return flat.view(like.shape)


class AndersonMixer:
    """Anderson acceleration (type II, per sample, safeguarded) of a fixed-point iteration
    x <- G(x).

    `mix(x, g)` takes the current iterate x and g = G(x) and returns the next iterate
    sum_i alpha_i g_i over the last m pairs, where alpha (sum 1, one set per sample)
    minimises || sum_i alpha_i (g_i - x_i) ||. The history lives in ring buffers of shape
    (batch, m, n) per layer, so the inner products and the mixture are one batched matmul
    each (float32 for 16-bit states). The small m x m systems are solved on the device in
    float64, Tikhonov-regularised relative to the buffers' precision. Safeguard: a sample
    whose residual ||G(x) - x|| grew since the previous call forgets its history and takes
    the plain step g (restarted Anderson); so does a sample whose system fails. No
    host-device synchronisation.
    """

    def __init__(self, m: int):
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"AndersonMixer: m must be a positive integer, got {m!r}")
        self.m = m
        self.calls = 0
        self.restarts: Tensor | None = None  # (batch,) how often each sample's history was dropped
        self.g: list[Tensor] = []  # per layer (batch, m, n_l): the stored G(x_i)
        self.f: list[Tensor] = []  # per layer (batch, m, n_l): the stored residuals G(x_i) - x_i
        self.gram: Tensor | None = None  # (batch, m, m) float64: inner products of the stored residuals
        self.valid: Tensor | None = None  # (batch, m) bool: slots in use for each sample
        self.last: Tensor | None = None  # (batch,) float64: the previous call's squared residual

    def _allocate(self, g: list[Tensor]) -> None:
        b = g[0].shape[0]
        for t in g:
            dtype = t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
            self.g.append(t.new_zeros(b, self.m, t[0].numel(), dtype=dtype))
            self.f.append(t.new_zeros(b, self.m, t[0].numel(), dtype=dtype))
        self.gram = g[0].new_zeros(b, self.m, self.m, dtype=torch.float64)
        self.valid = torch.zeros(b, self.m, dtype=torch.bool, device=g[0].device)
        self.restarts = torch.zeros(b, dtype=torch.long, device=g[0].device)

    def mix(self, x: Vector, g: Vector) -> Vector:
        if not self.g:
            self._allocate(g)
        slot = self.calls % self.m
        dots = None
        for gl, fl, xt, gt in zip(self.g, self.f, x, g):
            gl[:, slot] = _flat(gt)
            f_new = fl[:, slot]
            f_new.copy_(gl[:, slot]).sub_(_flat(xt))  # G(x) - x written in place, no temporary
            d = torch.bmm(f_new.unsqueeze(1), fl.transpose(1, 2)).squeeze(1)  # (batch, m); faster than F f
            dots = d if dots is None else dots + d
        dots = dots.double()
        gram = self.gram
        gram[:, slot, :] = dots
        gram[:, :, slot] = dots
        r = dots[:, slot]
        valid = self.valid
        if self.last is not None:
            grew = r > self.last
            self.restarts += grew
            valid &= ~grew[:, None]
        valid[:, slot] = True
        self.last = r
        self.calls += 1
        if self.calls == 1:
            return g
        # the system over the valid slots; an unused slot i gets the row e_i and right-hand side 0
        eye = torch.eye(self.m, dtype=gram.dtype, device=gram.device)
        pair = valid[:, :, None] & valid[:, None, :]
        scale = (torch.diagonal(gram, dim1=1, dim2=2) * valid).sum(dim=1) / valid.sum(dim=1)
        eps = 1e-10 if self.g[0].dtype == torch.float64 else 1e-6
        ridge = torch.where(valid, eps * scale.clamp_min(torch.finfo(torch.float64).tiny)[:, None], 1)
        system = torch.where(pair, gram, 0) + ridge[:, :, None] * eye
        rhs = valid.double()
        alpha, info = torch.linalg.solve_ex(system, rhs)
        alpha = alpha / alpha.sum(dim=1, keepdim=True)
        plain = torch.zeros_like(alpha)
        plain[:, slot] = 1
        alpha = torch.where(((info == 0) & torch.isfinite(alpha).all(dim=1))[:, None], alpha, plain)
        out = []
        for gl, gt in zip(self.g, g):
            mixed = torch.bmm(alpha.to(gl.dtype).unsqueeze(1), gl).squeeze(1)
            out.append(_unflat(mixed.to(gt.dtype), gt))
        return out
