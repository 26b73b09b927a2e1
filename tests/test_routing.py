"""Held pooling routes (pool='held'): the same limit as free routing (ID) as beta -> 0, the
routes really held in the second phases and the contrast, and clear refusals."""
import copy

import pytest
import torch

from eqprop import CL, EP, ID, ConvHopfield, DenseHopfield
from eqprop.devices import Device
from eqprop.routing import held_routing
from eqprop.testing import cosine


def _pooled_block():
    torch.manual_seed(3)
    return ConvHopfield([2, 4, 6], pools="mm", fc=[5], in_size=8, T1=400, tol=1e-13, init="kaiming", alpha=1.2,
                        slope=0.5).double()


def _grads(block, est, u, w):
    b = copy.deepcopy(block)
    b.estimator = est
    x = u.clone().requires_grad_(True)
    (b(x) * w).sum().backward()
    return [x.grad] + [p.grad for p in b.parameters()]


def test_held_routes_tend_to_implicit_differentiation_as_beta_vanishes():
    block = _pooled_block()
    u = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    w = torch.randn(3, 5, dtype=torch.float64)
    ref = _grads(block, ID(solver="minres", tol=1e-13, max_iter=2000), u, w)
    held = _grads(block, EP(beta=1e-4, T2=400, tol=1e-13, pool="held"), u, w)
    for a, b in zip(held, ref):
        assert cosine(a, b) > 1 - 1e-6


def test_held_phases_keep_the_free_routes_and_free_phases_do_not():
    """A strong nudge switches argmaxes under free routing; with held routes the nudged state
    is the fixed point of the map whose pools use the free state's argmaxes."""
    block = _pooled_block()
    u = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    s, _ = block.relax(u)
    nudge = 5.0 * torch.randn_like(s[-1])
    free, _ = EP(T2=400, tol=1e-13).relax(block, u, s, nudge=nudge)
    held, _ = EP(T2=400, tol=1e-13, pool="held").relax(block, u, s, nudge=nudge)
    route = held_routing(block, s, "test")
    switched = sum(int((c(free[l])[1][0] != c(s[l])[1][0]).sum()) for l, c in enumerate(block.couplings)
                   if c.routed)
    assert switched > 0  # the test's nudge does switch routes
    pre = route.preactivations(held, u, range(len(held)), nudge)
    fixed = [act(pre[l]) for l, act in enumerate(block.activations)]
    assert max((a - b).abs().max().item() for a, b in zip(fixed, held)) < 1e-10
    assert max((a - b).abs().max().item() for a, b in zip(free, held)) > 1e-6


def test_blocks_without_pooling_are_unaffected():
    torch.manual_seed(0)
    block = DenseHopfield([4, 5, 3], T1=50, tol=1e-12).double()
    u = torch.randn(2, 4, dtype=torch.float64)
    w = torch.randn(2, 3, dtype=torch.float64)
    a = _grads(block, EP(beta=0.3, T2=50), u, w)
    b = _grads(block, EP(beta=0.3, T2=50, pool="held"), u, w)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_held_pooling_settings_and_refusals():
    with pytest.raises(ValueError, match="ep: pool must be one of"):
        EP(pool="frozen")
    assert CL(pool="held").pool == "held"  # every contrast rule takes it
    block = _pooled_block().float()
    u = torch.randn(2, 2, 8, 8)
    block.configure(relax_dtype=torch.bfloat16)
    s, _ = block.relax(u)
    with pytest.raises(ValueError, match="precision='full'"):
        EP(pool="held").relax(block, u, s, nudge=torch.zeros_like(s[-1]))
    EP(pool="held", precision="full").relax(block, u, s, nudge=torch.zeros_like(s[-1]))
    block.configure(relax_dtype=None, device=Device(read_noise=0.01))
    with pytest.raises(ValueError, match="pool='held' is not available with a device model"):
        EP(pool="held").relax(block, u, s, nudge=torch.zeros_like(s[-1]))
