"""Every registered estimator on every kind of block, against what it documents.

The test is parametrised over `eqprop.estimator_names()`, so a rule registered in the library
is picked up here; one whose class this file does not know fails (add its reference below),
and one that applies to no block kind here fails too.

  ep/pep/nep/cep, id/rbp, bptt, rhel:  the loss gradient (central finite differences)
  tbp with K >= the free phase's iterations:  the gradient of the loss of a T1-step
        relaxation from zero (finite differences, fixed T1, no tolerance)
  cl:   -w (dPhi/dtheta(clamped) - dPhi/dtheta(free)), computed here independently
  continual (eta -> 0, centered):  the loss gradient (the summed updates telescope to EP's)
  cpl (eta -> 0):  the loss gradient with the error current S (s*_L - y), S the inverse
        response of the output layer (Schur complement of the energy's Hessian)

A pair (estimator, block kind) that does not apply must be refused by set_estimator.
Float64, smooth (logistic) neurons, tight relaxations, tiny blocks.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import eqprop
from eqprop import BPTT, CL, EP, ID, RHEL, TBP, ContinualEP, ConvHopfield, CpL, DenseHopfield, EnergyBlock
from eqprop.hamiltonian import LinearHRU, NonlinearHRU
from eqprop.testing import check_estimator, finite_differences, rel_error

DT = torch.float64
FD_EPS = 1e-6
TOL = 1e-13  # relaxation tolerance of the free and second phases
KINDS = ("dense", "conv", "conv_pool", "custom", "linear_hru", "nonlinear_hru")
FAMILY = {"dense": "block", "conv": "block", "conv_pool": "block", "custom": "block",
          "linear_hru": "sequence", "nonlinear_hru": "sequence"}


def build(kind: str, quadratic_block: type) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(module, input, target): the same tiny module, input and target for every estimator."""
    torch.manual_seed(11)
    g = torch.Generator().manual_seed(12)
    relax = dict(T1=3000, tol=TOL)
    if kind == "dense":
        module = DenseHopfield([3, 4, 2], activation="sigmoid", alpha=1.5, **relax)
        u = torch.randn(2, 3, generator=g)
    elif kind in ("conv", "conv_pool"):
        module = ConvHopfield([1, 2], pools="m" if kind == "conv_pool" else "-", activation="sigmoid",
                              init="kaiming", alpha=1.5, **relax)
        u = torch.randn(2, 1, 4, 4, generator=g)
    elif kind == "custom":
        module = quadratic_block(3, 2, scale=0.8, **relax)
        u = torch.randn(2, 3, generator=g)
    else:
        unit = LinearHRU if kind == "linear_hru" else NonlinearHRU
        module = unit(2, 3, dt_min=0.2, dt_max=0.5)
        u = torch.randn(2, 6, 2, generator=g)
    module = module.to(DT)
    u = u.to(DT)
    with torch.no_grad():
        out = module(u)
    y = torch.rand(out.shape, generator=g, dtype=DT)
    return module, u, y


def sum_sq(y):
    return lambda out: 0.5 * ((out - y) ** 2).sum()


def stationary(block: EnergyBlock, u: torch.Tensor, clamp: torch.Tensor | None = None,
               start: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """A fixed point s_l = sigma_l(dPhi/ds_l), dPhi/ds by autograd of `phi` (independent of the
    block's own relaxation), reached from `start` (zeros by default), with the last layer held
    at `clamp` when given. (With max-pooling there can be several; the clamped phase starts
    from the free equilibrium.)"""
    s = block.init_state(u) if start is None else [x.clone() for x in start]
    if clamp is not None:
        s[-1] = clamp
    for _ in range(20000):
        leaves = [x.detach().requires_grad_(True) for x in s]
        with torch.enable_grad():
            grads = torch.autograd.grad(block.phi(leaves, u).sum(), leaves, allow_unused=True)
        new = [act(g if g is not None else torch.zeros_like(x)) for act, g, x in zip(block.activations, grads, s)]
        if clamp is not None:
            new[-1] = clamp
        gap = max(float((a - b).abs().max()) for a, b in zip(new, s))
        s = [x.detach() for x in new]
        if gap < 1e-15:
            return s
    raise AssertionError(f"the reference fixed point did not converge (last change {gap:.2e})")


def contrast_grads(block: EnergyBlock, u: torch.Tensor, first, second, w: float, denom: float):
    """-w (dPhi/dtheta(first) - dPhi/dtheta(second)) / denom for every parameter, then for u."""
    params = [p for p in block.parameters() if p.requires_grad]
    uu = u.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        diff = (block.phi(first, uu) - block.phi(second, uu)).sum()
        grads = torch.autograd.grad(diff, params + [uu])
    return [-w * g / denom for g in grads]


def inverse_output_response(block: EnergyBlock, u: torch.Tensor, s: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per sample, S = H_LL - H_Lh H_hh^-1 H_hL from the Hessian of the energy at s."""
    sizes = [x[0].numel() for x in s]
    out = []
    for i in range(u.shape[0]):
        def energy(flat, i=i):
            parts = torch.split(flat, sizes)
            return block.energy([p.view(1, *x.shape[1:]) for p, x in zip(parts, s)], u[i:i + 1]).sum()
        H = torch.autograd.functional.hessian(energy, torch.cat([x[i].flatten() for x in s]))
        n = sizes[-1]
        Hhh, HhL = H[:-n, :-n], H[:-n, -n:]
        out.append(H[-n:, -n:] - HhL.T @ torch.linalg.solve(Hhh, HhL))
    return out


@pytest.fixture(scope="module")
def fd_cache() -> dict:
    return {}


def cached(cache: dict, key, compute):
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def loss_gradient_fd(module, u, loss):
    """Central differences of loss(module(u)) over every parameter and the input."""
    params = [p for p in module.parameters() if p.requires_grad]
    uu = u.clone()
    return finite_differences(lambda: loss(module(uu)), params + [uu], FD_EPS)


# Relative errors allowed: finite differences are good to ~1e-9 here, and the one-sided
# variants (beta, eta = 1e-5) have a bias of ~3e-6; the measured errors are 10-100 times
# below these bounds.
REL = 1e-7
BIAS = {"centered": REL, "positive": 3e-5, "negative": 3e-5}


def run_case(name: str, kind: str, module, u, y, cache) -> list:
    """Check the estimator `name` on `module`; return the reports (for the statistics)."""
    est = eqprop.make_estimator(name)
    family = FAMILY[kind]
    loss = sum_sq(y)
    block_target = y if family == "block" else None
    fd = cached(cache, (kind, "loss"), lambda: loss_gradient_fd(module, u, loss))
    reports = []

    def check(estimator, expected=fd, target=block_target, rel=REL, cos=1 - 1e-10):
        before = module.estimator
        report = check_estimator(module, estimator, u, loss=loss, target=target, expected=lambda m, x: expected)
        assert module.estimator is before  # check_estimator puts the module's own estimator back
        assert report.estimator == estimator
        assert report.rel_error < rel, (estimator, report.per_tensor)
        assert report.cosine > cos, (estimator, report.per_tensor)
        assert report.worst_cosine() > 1 - 1e3 * (1 - cos), (estimator, report.per_tensor)
        reports.append(report)
        return report

    if isinstance(est, EP):
        beta = {"centered": 1e-4}.get(est.variant, 1e-5)
        tight = est.replace(beta=beta, T2=3000, tol=TOL)
        rel = BIAS[est.variant]
        check(tight, rel=rel)  # with a target: the cost nudges the output
        check(tight, target=None, rel=rel)  # without: the normalised error current
    elif isinstance(est, ID):
        check(est.replace(max_iter=5000, tol=TOL))
    elif isinstance(est, BPTT):
        check(est.replace(T2=None if family == "sequence" else 400))
    elif isinstance(est, RHEL):
        check(est.replace(eps=1e-4))
    elif isinstance(est, TBP):
        # BPTT through the whole free phase: the gradient of the loss of T1 steps from zero
        saved = (module.T1, module.tol)
        module.configure(T1=25, tol=None)
        try:
            fd_t1 = cached(cache, (kind, "T1=25"), lambda: loss_gradient_fd(module, u, loss))
            report = check(est.replace(K=30), expected=fd_t1)
            assert report.relax[0]["free"]["iters"] == 25
        finally:
            module.configure(T1=saved[0], tol=saved[1])
    elif isinstance(est, ContinualEP):
        tight = est.replace(beta=1e-4, eta=1e-9, T2=80, variant="centered")
        check(tight)
        check(tight, target=None)
    elif isinstance(est, CL):
        def cl_expected():
            free = stationary(module, u)
            clamped = stationary(module, u, clamp=y, start=free)
            return contrast_grads(module, u, clamped, free, w=1.0, denom=1.0)
        check(est.replace(T2=3000, tol=TOL), expected=cached(cache, (kind, "cl"), cl_expected), rel=1e-10)
    elif isinstance(est, CpL):
        def cpl_expected():
            s = stationary(module, u)
            S = inverse_output_response(module, u, s)
            delta = (s[-1] - y).flatten(1)
            current = torch.stack([Si @ d for Si, d in zip(S, delta)]).view_as(y)
            return loss_gradient_fd(module, u, lambda out: (current * out).sum())
        eta = 1e-4 if est.variant == "centered" else 1e-5
        report = check(est.replace(eta=eta, T2=3000, tol=TOL), expected=cached(cache, (kind, "cpl"), cpl_expected),
                       rel=BIAS[est.variant])
        # ... which is not the loss gradient itself
        assert rel_error(report.estimate, fd) > 100 * report.rel_error
    else:
        pytest.fail(f"estimator {name!r} ({type(est).__name__}) has no reference in this test; add one")
    return reports


def applies(est, kind: str) -> bool:
    """What the estimator declares (bptt applies to both: T2 steps on a block, T2=None on a
    Hamiltonian unit)."""
    return FAMILY[kind] in est.applies_to


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", eqprop.estimator_names())
def test_every_estimator_on_every_block_kind(name, kind, quadratic_block, fd_cache):
    est = eqprop.make_estimator(name)
    if not applies(est, kind):
        fits = [k for k in KINDS if applies(est, k)]
        assert fits, f"estimator {name!r} applies to none of the block kinds {KINDS}"
        module, _, _ = build(kind, quadratic_block)
        with pytest.raises(ValueError, match=f"estimator '{est.name}' does not apply to"):
            eqprop.set_estimator(module, est)
        assert module.estimator is None if FAMILY[kind] == "block" else module.estimator == RHEL()
        return
    module, u, y = build(kind, quadratic_block)
    reports = run_case(name, kind, module, u, y, fd_cache)
    assert reports
    for report in reports:
        for stats in report.relax:
            assert stats["free"]["converged"] in (True, None)
            assert all(st["converged"] in (True, None) for st in stats.values()), stats
