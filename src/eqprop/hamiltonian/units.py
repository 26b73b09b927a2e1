"""Hamiltonian recurrent units (HRUs, docs/theory.md).

An HRU is a bank of P independent one-dimensional oscillators (position y, momentum z)
driven by the input sequence u_1..u_L (features H) through B (P x H), with per-channel
Hamiltonian  H_t(z, y) = dt * (1/2 z^2 + V(y, B u_t)), integrated by leapfrog
(position Verlet), which is symplectic and time-reversible:

    y_half  = y_t + dt/2 * z_t
    z_{t+1} = z_t - dt * dV/dy(y_half, B u_{t+1})
    y_{t+1} = y_half + dt/2 * z_{t+1}

The unit's output is o_t = C y_t + D * u_t (batch, time, H). A subclass gives the potential V through
`natural` (its parameters after their constraints), `force` (dV/dy), `potential` (V) and
`partials` (dV/dp for its per-channel parameters and dV/d(Bu)); the leapfrog loop, the
switch between RHEL and BPTT and the RHEL echo (rhel.py) are shared.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks import DivergenceError
from ..estimators import BPTT, RHEL, Estimator
from ..registry import set_estimator
from .rhel import rhel_readout

__all__ = ["HRU", "LinearHRU", "NonlinearHRU", "make_hru", "check_sequence", "UNITS", "SCANS"]

SCANS = ("loop", "parallel")


def check_sequence(owner: str, u: Tensor, features: int) -> None:
    """Clear errors for inputs that are not (batch, time, features) finite tensors."""
    if not isinstance(u, Tensor):
        raise TypeError(f"{owner}: input must be a tensor, got {type(u).__name__}")
    if u.dim() != 3:
        raise ValueError(f"{owner}: input must be (batch, time, features), got shape {tuple(u.shape)}")
    if u.shape[2] != features:
        raise ValueError(f"{owner}: input has {u.shape[2]} features, expected {features}")
    if u.shape[1] == 0 or u.shape[0] == 0:
        raise ValueError(f"{owner}: input has an empty batch or time axis, shape {tuple(u.shape)}")
    if not u.is_floating_point():
        raise TypeError(f"{owner}: input must be a floating-point tensor, got {u.dtype}")
    if not bool(torch.isfinite(u).all()):
        raise ValueError(f"{owner}: input contains NaN or infinite values")


def _logcosh(a: Tensor) -> Tensor:
    """log(cosh(a)), stable for large |a|."""
    return a.abs() + F.softplus(-2 * a.abs()) - math.log(2.0)


class HRU(nn.Module):
    """Base Hamiltonian recurrent unit: (batch, time, H) -> (batch, time, H).

    estimator: `RHEL` (backward by the echo, nothing of the trajectory stored; the
               default) or `BPTT` (autograd through the steps), an instance or
               a registered name with `estimator_settings`; switch with `set_estimator`.
    scan:      'loop' (step by step) or 'parallel' (associative scan; linear unit only).
    dt_min, dt_max: dt = sigmoid(dt_raw) starts log-uniform in [dt_min, dt_max]. Small steps
               keep a driven nonlinear unit from amplifying perturbations exponentially
               over long sequences (which breaks BPTT and RHEL alike, see docs/sequences.md).
    """

    estimator_kind = "sequence"  # what eqprop.set_estimator checks an estimator against

    def __init__(self, in_features: int, state_size: int, estimator: str | Estimator = "rhel",
                 estimator_settings: dict | None = None, scan: str = "loop", dt_min: float = 0.01,
                 dt_max: float = 0.1):
        super().__init__()
        for name, v in (("in_features", in_features), ("state_size", state_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive integer, got {v!r}")
        self.in_features, self.state_size = in_features, state_size
        H, P = in_features, state_size
        self.B = nn.Parameter(torch.randn(P, H) / math.sqrt(H))
        self.C = nn.Parameter(torch.randn(H, P) / math.sqrt(P))
        self.D = nn.Parameter(torch.randn(H))
        if not (isinstance(dt_min, (int, float)) and isinstance(dt_max, (int, float)) and 0 < dt_min <= dt_max < 1):
            raise ValueError(f"{type(self).__name__}: need 0 < dt_min <= dt_max < 1, got {dt_min!r}, {dt_max!r}")
        log_dt = math.log(dt_min) + (math.log(dt_max) - math.log(dt_min)) * torch.rand(P)
        self.dt_raw = nn.Parameter(torch.logit(log_dt.exp()))
        self.set_estimator(estimator, **(estimator_settings or {}))
        self.set_scan(scan)

    # --- the potential (subclasses) -------------------------------------------------
    def natural(self) -> dict[str, Tensor]:
        """Constrained parameters: always 'dt' (P,) and 'B' (P, H), plus the potential's."""
        raise NotImplementedError

    def force(self, y: Tensor, bu: Tensor, nat: dict[str, Tensor]) -> Tensor:
        """dV/dy per channel."""
        raise NotImplementedError

    def potential(self, y: Tensor, bu: Tensor, nat: dict[str, Tensor]) -> Tensor:
        """V per channel."""
        raise NotImplementedError

    def partials(self, y: Tensor, bu: Tensor, nat: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        """({p: dV/dp} for the per-channel parameters other than dt, dV/d(Bu))."""
        raise NotImplementedError

    # --- switches -------------------------------------------------------------------
    @property
    def estimator(self) -> Estimator:
        return self._estimator

    @estimator.setter
    def estimator(self, est: Estimator) -> None:
        if not isinstance(est, Estimator):
            raise TypeError(f"{type(self).__name__}: an estimator must be an eqprop estimator object (e.g. "
                            f"eqprop.RHEL()), got {type(est).__name__}")
        est.check_applicable(self.estimator_kind, type(self).__name__)
        self._estimator = est

    def set_estimator(self, estimator: str | Estimator, /, blocks=None, **settings) -> HRU:
        """Same as `eqprop.set_estimator(self, ...)`: 'rhel' or 'bptt'."""
        set_estimator(self, estimator, blocks, **settings)
        return self

    def set_scan(self, scan: str) -> HRU:
        if scan not in SCANS:
            raise ValueError(f"{type(self).__name__}: unknown scan {scan!r}, expected one of {SCANS}")
        if scan == "parallel" and not hasattr(self, "transition"):
            raise ValueError(f"{type(self).__name__}: scan='parallel' needs a linear unit")
        self.scan = scan
        return self

    def hamiltonian_parameters(self) -> list[nn.Parameter]:
        """The parameters inside the Hamiltonian (all but the readout C and skip D)."""
        return [p for n, p in self.named_parameters() if n not in ("C", "D")]

    # --- dynamics -------------------------------------------------------------------
    def leapfrog(self, y: Tensor, z: Tensor, bu: Tensor, nat: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """One position-Verlet step; returns (y_next, z_next, y_half)."""
        dt = nat["dt"]
        yh = y + 0.5 * dt * z
        z = z - dt * self.force(yh, bu, nat)
        return yh + 0.5 * dt * z, z, yh

    def trajectory(self, u: Tensor, y0: Tensor | None = None, z0: Tensor | None = None,
                   nat: dict[str, Tensor] | None = None, readout: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """(seq, y_L, z_L) from (y0, z0) (zeros when None): seq holds the positions y_1..y_L
        (batch, L, P), or with readout=True the outputs C y_t + D u_t (batch, L, H). Records
        autograd when grad mode is on (the BPTT path); without it, nothing of size L x P is
        kept when readout=True."""
        nat = self.natural() if nat is None else nat
        y0 = u.new_zeros(u.shape[0], self.state_size) if y0 is None else y0
        z0 = torch.zeros_like(y0) if z0 is None else z0
        if self.scan == "parallel" or torch.is_grad_enabled():
            if self.scan == "parallel":
                ys, y, z = self._parallel(u, y0, z0, nat)
            else:
                y, z, ys = y0, z0, []
                for ut in u.unbind(1):  # one backward node for all steps (u[:, t] would cost O(L) each)
                    y, z, _ = self.leapfrog(y, z, ut @ nat["B"].T, nat)
                    ys.append(y)
                ys = torch.stack(ys, 1)
            return (ys @ self.C.T + u * self.D if readout else ys), y, z
        y, z = y0, z0
        seq = u.new_empty(u.shape[0], u.shape[1], self.in_features if readout else self.state_size)
        for t in range(u.shape[1]):
            y, z, _ = self.leapfrog(y, z, u[:, t] @ nat["B"].T, nat)
            seq[:, t] = y @ self.C.T + u[:, t] * self.D if readout else y
        return seq, y, z

    def _parallel(self, u: Tensor, y0: Tensor, z0: Tensor, nat: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """x_t = M x_{t-1} + f_t for all t by a Hillis-Steele scan: after the round with
        offset d, f[t] holds sum_{s > t-2d} M^(t-s) f_s; M^d is squared each round."""
        (m11, m12, m21, m22), (gy, gz) = self.transition(nat)
        bu = u @ nat["B"].T
        fy, fz = gy * bu, gz * bu
        # fold the initial state into the first input: f_1 += M x_0
        fy = torch.cat([fy[:, :1] + (m11 * y0 + m12 * z0).unsqueeze(1), fy[:, 1:]], 1)
        fz = torch.cat([fz[:, :1] + (m21 * y0 + m22 * z0).unsqueeze(1), fz[:, 1:]], 1)
        L, d = u.shape[1], 1
        while d < L:
            py, pz = fy[:, :-d], fz[:, :-d]
            fy = torch.cat([fy[:, :d], fy[:, d:] + m11 * py + m12 * pz], 1)
            fz = torch.cat([fz[:, :d], fz[:, d:] + m21 * py + m22 * pz], 1)
            m11, m12, m21, m22 = (m11 * m11 + m12 * m21, m11 * m12 + m12 * m22,
                                  m21 * m11 + m22 * m21, m21 * m12 + m22 * m22)
            d *= 2
        return fy, fy[:, -1], fz[:, -1]

    def forward(self, u: Tensor) -> Tensor:
        check_sequence(type(self).__name__, u, self.in_features)
        if torch.is_autocast_enabled(u.device.type):
            # the echo must replay the forward's arithmetic exactly: run in the parameters' dtype
            with torch.autocast(u.device.type, enabled=False):
                return self.forward(u.to(self.B.dtype))
        if isinstance(self.estimator, RHEL) and torch.is_grad_enabled():
            out = rhel_readout(self, u, estimator=self.estimator)
        elif isinstance(self.estimator, BPTT) or not torch.is_grad_enabled():
            out = self.trajectory(u, readout=True)[0]
        else:
            raise NotImplementedError(f"{type(self).__name__}: a Hamiltonian unit runs rhel or bptt; "
                                      f"{type(self.estimator).__name__} has no sequence backward here")
        if not bool(torch.isfinite(out[:, -1]).all()):
            raise DivergenceError(f"{type(self).__name__}: non-finite state; leapfrog is stable only for "
                                  f"dt^2 * stiffness < 4 (here max dt = {self.natural()['dt'].max().item():.3g})")
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, state_size={self.state_size}, estimator={self.estimator!r}, "
                f"scan={self.scan!r}")


class LinearHRU(HRU):
    """V(y, Bu) = 1/2 A y^2 - (B u) y with A = relu(A_raw) >= 0 (diagonal oscillators)."""

    def __init__(self, in_features: int, state_size: int, **kw):
        super().__init__(in_features, state_size, **kw)
        self.A_raw = nn.Parameter(torch.rand(state_size))

    def natural(self) -> dict[str, Tensor]:
        return {"dt": torch.sigmoid(self.dt_raw), "B": self.B, "A": F.relu(self.A_raw)}

    def force(self, y, bu, nat):
        return nat["A"] * y - bu

    def potential(self, y, bu, nat):
        return 0.5 * nat["A"] * y * y - bu * y

    def partials(self, y, bu, nat):
        return {"A": 0.5 * y * y}, -y

    def transition(self, nat: dict[str, Tensor]) -> tuple[tuple[Tensor, ...], tuple[Tensor, Tensor]]:
        """The leapfrog step as x_{t+1} = M x_t + (gy, gz) * (B u_{t+1}), per channel."""
        dt, A = nat["dt"], nat["A"]
        a = 1 - 0.5 * dt * dt * A
        return (a, dt * (1 - 0.25 * dt * dt * A), -dt * A, a), (0.5 * dt * dt, dt)


class NonlinearHRU(HRU):
    """V(y, Bu) = 1/2 alpha y^2 + c log cosh(w y + B u + b) / w, with alpha = relu(alpha_raw)
    and c = sigmoid(c_raw), all diagonal (per channel). w must stay away from 0."""

    def __init__(self, in_features: int, state_size: int, **kw):
        super().__init__(in_features, state_size, **kw)
        P = state_size
        self.alpha_raw = nn.Parameter(torch.rand(P))
        self.w = nn.Parameter(0.5 + torch.rand(P))
        self.b = nn.Parameter(0.1 * torch.randn(P))
        self.c_raw = nn.Parameter(torch.zeros(P))

    def natural(self) -> dict[str, Tensor]:
        return {"dt": torch.sigmoid(self.dt_raw), "B": self.B, "alpha": F.relu(self.alpha_raw),
                "w": self.w, "b": self.b, "c": torch.sigmoid(self.c_raw)}

    def force(self, y, bu, nat):
        return nat["alpha"] * y + nat["c"] * torch.tanh(nat["w"] * y + bu + nat["b"])

    def potential(self, y, bu, nat):
        return 0.5 * nat["alpha"] * y * y + nat["c"] * _logcosh(nat["w"] * y + bu + nat["b"]) / nat["w"]

    def partials(self, y, bu, nat):
        w, c = nat["w"], nat["c"]
        a = w * y + bu + nat["b"]
        th, lc = torch.tanh(a), _logcosh(a)
        return ({"alpha": 0.5 * y * y, "c": lc / w, "b": c * th / w, "w": c * (th * y / w - lc / (w * w))},
                c * th / w)


UNITS = {"linear": LinearHRU, "nonlinear": NonlinearHRU}


def make_hru(kind: str, in_features: int, state_size: int, **kw) -> HRU:
    if kind not in UNITS:
        raise ValueError(f"unknown HRU kind {kind!r}, expected one of {sorted(UNITS)}")
    return UNITS[kind](in_features, state_size, **kw)
