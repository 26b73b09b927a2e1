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
`partials` (dV/dp for its per-channel parameters and dV/d(Bu)), and may override
`potential_and_partials` to share work between the last two; the leapfrog loop (`states`),
the switch between RHEL and BPTT and the RHEL echo (rhel.py) are shared. The loop computes
the input drive B u per block of `chunk` steps and reads no tensor value on the host.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks import DivergenceError
from ..estimators import BPTT, RHEL, Estimator
from ..registry import set_estimator
from ..validate import check_positive_int
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
    scan:      'loop' (step by step) or 'parallel' (blocked scan of depth ~2 sqrt(L) instead
               of L; linear unit only; holds O(L) states, also in RHEL's echo).
    chunk:     steps per block of the step loop: the input drive B u (and in RHEL's echo
               the nudges and the parameter sums) is computed for `chunk` steps at once, so
               the loop's memory grows with chunk, not with the sequence length.
    dt_min, dt_max: dt = sigmoid(dt_raw) starts log-uniform in [dt_min, dt_max]. Small steps
               keep a driven nonlinear unit from amplifying perturbations exponentially
               over long sequences (which breaks BPTT and RHEL alike, see docs/sequences.md).
    """

    estimator_kind = "sequence"  # what eqprop.set_estimator checks an estimator against

    def __init__(self, in_features: int, state_size: int, estimator: str | Estimator = "rhel",
                 estimator_settings: dict | None = None, scan: str = "loop", dt_min: float = 0.01,
                 dt_max: float = 0.1, chunk: int = 32):
        super().__init__()
        check_positive_int(type(self).__name__, "chunk", chunk)
        self.chunk = chunk
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

    def potential_and_partials(self, y: Tensor, bu: Tensor,
                               nat: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """(V, {p: dV/dp}, dV/d(Bu)) at once, for RHEL's echo; a subclass may share work
        between them (the default calls `potential` and `partials`)."""
        return (self.potential(y, bu, nat), *self.partials(y, bu, nat))

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
    def leapfrog(self, y: Tensor, z: Tensor, bu: Tensor, nat: dict[str, Tensor], half_dt: Tensor | None = None,
                 y_out: Tensor | None = None, z_out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """One position-Verlet step; returns (y_next, z_next, y_half). half_dt = dt / 2 when
        given (saves an op per step); y_out, z_out: tensors to write the new state into
        (no autograd through them)."""
        dt = nat["dt"]
        half_dt = 0.5 * dt if half_dt is None else half_dt
        yh = torch.addcmul(y, half_dt, z)
        z = torch.addcmul(z, dt, self.force(yh, bu, nat), value=-1, out=z_out)
        return torch.addcmul(yh, half_dt, z, out=y_out), z, yh

    def states(self, y: Tensor, z: Tensor, bu: Tensor, nat: dict[str, Tensor], kicks: Tensor | None = None,
               reverse: bool = False) -> tuple[Tensor, Tensor]:
        """Positions and momenta at the k + 1 step boundaries, (..., k + 1, P) each, for the
        input drive bu = B u (..., k, P) from the state (y, z) (..., P). Step t runs from
        boundary t to t + 1 with the start at boundary 0, or with reverse=True from t + 1 to t
        with the start at boundary k (RHEL's echo), so results are in the inputs' time order.
        kicks (..., k, P), when given, are added to the momentum just before each step (RHEL's
        nudges). Records autograd when grad mode is on; scan='parallel' runs the blocked scan
        (linear units)."""
        if self.scan == "parallel":
            if reverse:
                ys, zs = self._scan(y, z, bu.flip(-2), nat, None if kicks is None else kicks.flip(-2))
                return ys.flip(-2), zs.flip(-2)
            return self._scan(y, z, bu, nat, kicks)
        return self._loop(y, z, bu, nat, kicks, reverse)

    def _loop(self, y: Tensor, z: Tensor, bu: Tensor, nat: dict[str, Tensor], kicks: Tensor | None,
              reverse: bool) -> tuple[Tensor, Tensor]:
        """The step loop of `states`: without autograd each step writes straight into the result."""
        half_dt = 0.5 * nat["dt"]
        k = bu.shape[-2]
        start, order, to = (k, range(k - 1, -1, -1), 0) if reverse else (0, range(k), 1)  # step t ends at t + to
        if torch.is_grad_enabled():  # unbind: one backward node for all steps (bu[..., t, :] would cost O(L) each)
            bus, kis = bu.unbind(-2), (None if kicks is None else kicks.unbind(-2))
            ys, zs = [y] * (k + 1), [z] * (k + 1)
            for t in order:
                z = z if kis is None else z + kis[t]
                y, z, _ = self.leapfrog(y, z, bus[t], nat, half_dt)
                ys[t + to], zs[t + to] = y, z
            shape = torch.broadcast_shapes(*(a.shape for a in ys), *(a.shape for a in zs))
            return (torch.stack([a.expand(shape) for a in ys], -2),
                    torch.stack([a.expand(shape) for a in zs], -2))
        lead = torch.broadcast_shapes(y.shape, z.shape, bu.shape[:-2] + bu.shape[-1:],
                                      *(() if kicks is None else (kicks.shape[:-2] + kicks.shape[-1:],)))
        ys, zs = bu.new_empty(lead[:-1] + (k + 1, lead[-1])), bu.new_empty(lead[:-1] + (k + 1, lead[-1]))
        ys[..., start, :], zs[..., start, :] = y, z
        for t in order:
            z = z if kicks is None else z + kicks[..., t, :]
            y, z, _ = self.leapfrog(y, z, bu[..., t, :], nat, half_dt, ys[..., t + to, :], zs[..., t + to, :])
        return ys, zs

    def _scan(self, y0: Tensor, z0: Tensor, bu: Tensor, nat: dict[str, Tensor],
              kicks: Tensor | None) -> tuple[Tensor, Tensor]:
        """`states` (forward) of a linear unit, x_t = M x_{t-1} + (forcing), by a blocked scan: the L steps
        are cut into n blocks of K ~ sqrt(L); (1) every block runs its K steps from the zero
        state, all blocks at once; (2) the true state entering each block is carried across
        the n blocks, X_{c+1} = M^K X_c + (block c's end state); (3) each step adds
        M^(k+1) X_c. Sequential depth K + n instead of L, work O(L)."""
        L, P = bu.shape[-2], bu.shape[-1]
        K = math.isqrt(L - 1) + 1  # ceil(sqrt(L))
        n = -(-L // K)
        pad = n * K - L

        def blocks(x: Tensor) -> Tensor:  # (..., L, P) -> (..., n, K, P), zero steps appended
            return F.pad(x, (0, 0, 0, pad)).unflatten(-2, (n, K))

        lead = torch.broadcast_shapes(y0.shape, z0.shape, bu.shape[:-2] + (P,),
                                      *(() if kicks is None else (kicks.shape[:-2] + (P,),)))[:-1]
        zero = bu.new_zeros(lead + (n, P))
        # (1) each block from the zero state (the same leapfrog as the loop)
        ly, lz = self._loop(zero, zero, blocks(bu), nat,
                            None if kicks is None else blocks(kicks), reverse=False)
        ly, lz = ly[..., 1:, :], lz[..., 1:, :]  # the states after each step
        # powers M^1..M^K per channel (K, P) from the unit's step matrix
        (m11, m12, m21, m22), _ = self.transition(nat)
        p11, p12, p21, p22 = [m11], [m12], [m21], [m22]
        for _ in range(K - 1):
            a, b, c, d = p11[-1], p12[-1], p21[-1], p22[-1]
            p11.append(m11 * a + m12 * c)
            p12.append(m11 * b + m12 * d)
            p21.append(m21 * a + m22 * c)
            p22.append(m21 * b + m22 * d)
        # (2) the state entering each block
        ey, ez = ly[..., K - 1, :], lz[..., K - 1, :]  # (..., n, P)
        xs_y, xs_z = [y0.expand(lead + (P,))], [z0.expand(lead + (P,))]
        for c in range(n - 1):
            xy, xz = xs_y[-1], xs_z[-1]
            xs_y.append(p11[-1] * xy + p12[-1] * xz + ey[..., c, :])
            xs_z.append(p21[-1] * xy + p22[-1] * xz + ez[..., c, :])
        xy, xz = torch.stack(xs_y, -2).unsqueeze(-2), torch.stack(xs_z, -2).unsqueeze(-2)  # (..., n, 1, P)
        # (3) add the carried state's free evolution M^(k+1) X_c
        q11, q12, q21, q22 = (torch.stack(p) for p in (p11, p12, p21, p22))  # (K, P)
        ys = (ly + q11 * xy + q12 * xz).flatten(-3, -2)[..., :L, :]
        zs = (lz + q21 * xy + q22 * xz).flatten(-3, -2)[..., :L, :]
        return (torch.cat([y0.expand(lead + (P,)).unsqueeze(-2), ys], -2),
                torch.cat([z0.expand(lead + (P,)).unsqueeze(-2), zs], -2))

    def trajectory(self, u: Tensor, y0: Tensor | None = None, z0: Tensor | None = None,
                   nat: dict[str, Tensor] | None = None, readout: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """(seq, y_L, z_L) from (y0, z0) (zeros when None): seq holds the positions y_1..y_L
        (batch, L, P), or with readout=True the outputs C y_t + D u_t (batch, L, H). Records
        autograd when grad mode is on (the BPTT path). The input drive B u is one matmul per
        block of `chunk` steps (the whole sequence under autograd or scan='parallel'); without
        autograd and with readout=True, the step loop keeps nothing of size L x P beyond one
        block."""
        nat = self.natural() if nat is None else nat
        y0 = u.new_zeros(u.shape[0], self.state_size) if y0 is None else y0
        z0 = torch.zeros_like(y0) if z0 is None else z0
        B = nat["B"]
        if self.scan == "parallel":
            ys, zs = self.states(y0, z0, u @ B.T, nat)
            y, z = ys[:, -1].clone(), zs[:, -1].clone()  # not views that would keep the sequence alive
            ys = ys[:, 1:]
            return (torch.addcmul(ys @ self.C.T, u, self.D) if readout else ys), y, z
        if torch.is_grad_enabled():  # BPTT: stack the positions only
            y, z, ys, half_dt = y0, z0, [], 0.5 * nat["dt"]
            for bu in (u @ B.T).unbind(1):  # one backward node for all steps
                y, z, _ = self.leapfrog(y, z, bu, nat, half_dt)
                ys.append(y)
            ys = torch.stack(ys, 1)
            return (torch.addcmul(ys @ self.C.T, u, self.D) if readout else ys), y, z
        L, K = u.shape[1], self.chunk
        seq = u.new_empty(u.shape[0], L, self.in_features if readout else self.state_size)
        y, z = y0, z0
        for s in range(0, L, K):
            uc = u[:, s:s + K]
            ys, zs = self.states(y, z, uc @ B.T, nat)
            y, z = ys[:, -1].clone(), zs[:, -1].clone()  # the block's buffers are freed
            ys = ys[:, 1:]
            if readout:
                torch.addcmul(ys @ self.C.T, uc, self.D, out=seq[:, s:s + K])
            else:
                seq[:, s:s + K] = ys
        return seq, y, z

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
                f"scan={self.scan!r}, chunk={self.chunk}")


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

    def potential_and_partials(self, y, bu, nat):
        half_sq, neg = torch.mul(y, y).mul_(0.5), -y
        return torch.addcmul(half_sq * nat["A"], bu, neg), {"A": half_sq}, neg  # V = A y^2/2 - (Bu) y

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
        return torch.addcmul(nat["alpha"] * y, nat["c"], torch.tanh(torch.addcmul(bu, nat["w"], y).add_(nat["b"])))

    def potential(self, y, bu, nat):
        return 0.5 * nat["alpha"] * y * y + nat["c"] * _logcosh(nat["w"] * y + bu + nat["b"]) / nat["w"]

    def partials(self, y, bu, nat):
        w, c = nat["w"], nat["c"]
        a = w * y + bu + nat["b"]
        th, lc = torch.tanh(a), _logcosh(a)
        return ({"alpha": 0.5 * y * y, "c": lc / w, "b": c * th / w, "w": c * (th * y / w - lc / (w * w))},
                c * th / w)

    def potential_and_partials(self, y, bu, nat):
        inv_w, c = 1 / nat["w"], nat["c"]
        a = torch.addcmul(bu + nat["b"], nat["w"], y)
        c_th_w = torch.tanh(a).mul_(c * inv_w)  # dV/d(Bu) = dV/db = c tanh(a) / w
        lc_w = _logcosh(a).mul_(inv_w)  # dV/dc = log cosh(a) / w
        half_sq = torch.mul(y, y).mul_(0.5)
        potential = torch.addcmul(half_sq * nat["alpha"], lc_w, c)
        dw = torch.addcmul(c_th_w * y, lc_w, c * inv_w, value=-1)  # c (tanh(a) y / w - log cosh(a) / w^2)
        return potential, {"alpha": half_sq, "c": lc_w, "b": c_th_w, "w": dw}, c_th_w


UNITS = {"linear": LinearHRU, "nonlinear": NonlinearHRU}


def make_hru(kind: str, in_features: int, state_size: int, **kw) -> HRU:
    if kind not in UNITS:
        raise ValueError(f"unknown HRU kind {kind!r}, expected one of {sorted(UNITS)}")
    return UNITS[kind](in_features, state_size, **kw)
