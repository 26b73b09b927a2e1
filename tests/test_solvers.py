"""MINRES on lists of tensors, and ID's MINRES adjoint against the fixed-point adjoint and a
dense direct solve."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eqprop import ID, ConvHopfield, DenseHopfield
from eqprop.estimators import block_parameters
from eqprop.solvers import minres
from eqprop.testing import cosine, rel_error


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 30), split=st.integers(1, 29), seed=st.integers(0, 10_000), shift=st.floats(-3, 3))
def test_minres_solves_symmetric_indefinite_systems(n, split, seed, shift):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    m = (a + a.T) / 2 + shift * torch.eye(n, dtype=torch.float64)
    if torch.linalg.svdvals(m).min() < 1e-3:  # nearly singular: no well-defined solution to compare
        return
    b = torch.randn(n, generator=g, dtype=torch.float64)
    k = min(split, n - 1)

    def apply(v):
        y = m @ torch.cat(v)
        return [y[:k], y[k:]]

    x, stats = minres(apply, [b[:k], b[k:]], max_iter=4 * n, tol=1e-12)
    assert stats.converged
    assert torch.allclose(torch.cat(x), torch.linalg.solve(m, b), atol=1e-7 * (1 + b.norm()))


def _gradients(block, u, s, delta, est):
    return est.gradients(block, u, s, delta, None, {}, True)


def test_minres_adjoint_equals_the_fixed_point_adjoint_with_pooling_and_hard_sigmoid():
    torch.manual_seed(0)
    block = ConvHopfield([2, 4, 6], pools="mm", fc=[5], in_size=8, T1=200, tol=1e-13, slope=0.5,
                         init="kaiming").double()
    u = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    s, stats = block.relax(u)
    assert stats.converged
    delta = torch.randn_like(s[-1])
    record = {}
    gu_fp, g_fp = ID(tol=1e-14, max_iter=2000).gradients(block, u, s, delta, None, record, True)
    gu_mr, g_mr = ID(solver="minres", tol=1e-13, max_iter=2000).gradients(block, u, s, delta, None, record, True)
    assert record["adjoint"].converged
    for a, b in zip([gu_fp] + g_fp, [gu_mr] + g_mr):
        assert rel_error(b, a) < 1e-8


def _linear_block_beyond_the_synchronous_radius():
    """A dense block of linear neurons whose synchronous map's Jacobian has spectral radius
    > 1 (so neither the synchronous iteration nor its transpose converges), and its fixed
    point from a direct solve."""
    torch.manual_seed(1)
    block = DenseHopfield([4, 6, 5, 3], activation="identity", init="default").double()
    with torch.no_grad():
        for c in block.couplings:
            c.linear.weight.mul_(3.0)
    u = torch.randn(2, 4, dtype=torch.float64)
    shapes = [(2, 4), (2, 6), (2, 5), (2, 3)]  # widths[0]: the first layer, driven by u
    sizes = [a * b for a, b in shapes]

    def pre_flat(flat):
        parts = list(torch.split(flat, sizes))
        s = [p.view(sh) for p, sh in zip(parts, shapes)]
        pre = block.preactivations(s, u, list(range(4)))
        return torch.cat([pre[l].flatten() for l in range(4)])

    zero = torch.zeros(sum(sizes), dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(pre_flat, zero)
    c = pre_flat(zero).detach()
    eye = torch.eye(len(zero), dtype=torch.float64)
    radius = torch.linalg.eigvals(jac).abs().max().item()
    star = torch.linalg.solve(eye - jac, c)
    s = [p.view(sh).clone() for p, sh in zip(torch.split(star, sizes), shapes)]
    return block, u, s, jac, radius, sizes


def test_minres_adjoint_converges_where_the_fixed_point_adjoint_diverges():
    block, u, s, jac, radius, sizes = _linear_block_beyond_the_synchronous_radius()
    assert radius > 1.2
    delta = torch.randn_like(s[-1])
    with pytest.raises(RuntimeError, match=r"fixed-point adjoint iteration diverged.*solver='minres'"):
        ID(max_iter=300).gradients(block, u, s, delta, None, {}, True)
    record = {}
    gu, grads = ID(solver="minres", tol=1e-13, max_iter=500).gradients(block, u, s, delta, None, record, True)
    assert record["adjoint"].converged and record["adjoint"].iters <= sum(sizes) + 1
    for got, want in zip([gu] + grads, _dense_reference(block, u, s, jac, sizes, delta)):
        assert cosine(got, want) > 1 - 1e-10 and rel_error(got, want) < 1e-8


def _dense_reference(block, u, s, jac, sizes, delta, damping=0.0):
    """lambda from a dense solve of ((1 + damping) I - J)^T lambda = rhs, then lambda^T df/d(u, theta)."""
    rhs = torch.cat([torch.zeros(sum(sizes[:-1]), dtype=torch.float64), delta.flatten()])
    lam = torch.linalg.solve(((1 + damping) * torch.eye(len(rhs), dtype=torch.float64) - jac).T, rhs)
    lam_s = [p.view_as(x) for p, x in zip(torch.split(lam, sizes), s)]
    u_in = u.clone().requires_grad_(True)
    params = block_parameters(block)
    pre = block.preactivations([x.detach() for x in s], u_in, list(range(4)))
    return torch.autograd.grad([pre[l] for l in range(4)], [u_in] + params, grad_outputs=lam_s, allow_unused=True)


@pytest.mark.parametrize("damping", [0.05, 0.5, 4.0])
def test_damped_adjoint_solves_the_shifted_system(damping):
    """damping mu: both solvers give ((1 + mu) I - J)^-T delta (the fixed-point iteration only
    where the shift brings the synchronous radius below 1), a smaller gradient than mu = 0."""
    block, u, s, jac, radius, sizes = _linear_block_beyond_the_synchronous_radius()
    delta = torch.randn_like(s[-1])
    ref = _dense_reference(block, u, s, jac, sizes, delta, damping)
    solvers = [ID(solver="minres", tol=1e-13, max_iter=500, damping=damping)]
    if radius / (1 + damping) < 0.9:
        solvers.append(ID(tol=1e-14, max_iter=2000, damping=damping))
    for est in solvers:
        record = {}
        gu, grads = est.gradients(block, u, s, delta, None, record, True)
        assert record["adjoint"].converged, est
        for got, want in zip([gu] + grads, ref):
            assert cosine(got, want) > 1 - 1e-10 and rel_error(got, want) < 1e-8, est
    assert len(solvers) == (2 if damping == 4.0 else 1)  # radius 3.15


def test_damping_shrinks_the_adjoint_along_slow_modes():
    """A damped adjoint is a discounted Neumann series: on this hard-sigmoid block at its
    equilibrium the parameter gradient's norm falls as mu grows (0 -> 0.1 -> 1 -> 10)."""
    torch.manual_seed(3)
    block = DenseHopfield([5, 8, 4], slope=0.5, T1=500, tol=1e-13, init="kaiming").double()
    u = torch.randn(4, 5, dtype=torch.float64)
    s, stats = block.relax(u)
    assert stats.converged
    delta = torch.randn_like(s[-1])
    norms = []
    for mu in [0.0, 0.1, 1.0, 10.0]:
        _, grads = ID(solver="minres", tol=1e-13, max_iter=500, damping=mu).gradients(block, u, s, delta, None,
                                                                                   {}, False)
        norms.append(torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None)).item())
    assert all(a > b for a, b in zip(norms, norms[1:])), norms


def test_minres_settings_are_checked():
    with pytest.raises(ValueError, match="id: solver must be one of"):
        ID(solver="cg")
    with pytest.raises(ValueError, match="solver='minres' needs a tolerance"):
        ID(solver="minres", tol=None)
    for bad in (-0.1, float("nan"), float("inf"), True, False, "0.1"):
        with pytest.raises(ValueError, match="id: damping must be a finite number > 0"):
            ID(damping=bad)
