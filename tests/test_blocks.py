"""Energy-based blocks: relaxation, stopping, initialisation, custom energies."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eqprop import FFEBM, ConvHopfield, DenseHopfield, EnergyBlock, conv_ffebm, goe_, weighted_kaiming_
from eqprop.couplings import ConvCoupling, DenseCoupling
from eqprop.gradcheck import finite_differences, model_gradients, rel_error


def max_gap(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


@pytest.mark.parametrize("make", [
    lambda: DenseHopfield([6, 5, 4, 3], activation="hardsigmoid", alpha=0.9, T1=500, tol=1e-12),
    lambda: ConvHopfield([2, 3, 4], pools="m-", fc=[5], in_size=8, activation="hardsigmoid", init="kaiming",
                         alpha=0.9, T1=500, tol=1e-12),
])
def test_sync_and_async_reach_the_same_fixed_point(make):
    block = make().double()
    u = torch.randn(3, *((6,) if isinstance(block, DenseHopfield) else (2, 8, 8)), dtype=torch.float64)
    block.update = "sync"
    s_sync, st_sync = block.relax(u)
    block.update, block.first = "async", "odd"
    s_odd, st_odd = block.relax(u)
    block.first = "even"
    s_even, _ = block.relax(u)
    assert st_sync.converged and st_odd.converged
    assert max_gap(s_sync, s_odd) < 1e-9 and max_gap(s_sync, s_even) < 1e-9
    assert st_odd.iters <= st_sync.iters  # async uses fresh values: never slower here


def test_tolerance_stops_early_and_reports_count():
    block = DenseHopfield([6, 5, 4], activation="sigmoid", T1=300, tol=1e-6)
    u = torch.randn(4, 6)
    _, stats = block.relax(u)
    assert stats.converged and 1 < stats.iters < 300
    _, fixed = block.relax(u, tol=None, T=7)
    assert fixed.iters == 7 and fixed.converged is None and fixed.residual >= 0
    model = FFEBM(nn.Flatten(), block, nn.Linear(4, 2))
    model(torch.randn(4, 6))
    assert model.relax_stats()[0]["free"]["iters"] == block.stats["free"].iters


def test_async_sweeps_never_increase_the_energy():
    block = ConvHopfield([2, 3, 4], pools="mm", activation="hardsigmoid", init="kaiming", alpha=0.9,
                         update="async").double()
    u = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    energies = []
    block.relax(u, T=30, tol=None, callback=lambda t, s: energies.append(block.energy(s, u).sum().item()))
    assert all(b <= a + 1e-10 for a, b in zip(energies, energies[1:]))


def test_analytical_adjoint_equals_autograd_of_phi():
    block = ConvHopfield([2, 3, 4], pools="m-", fc=[5], in_size=8, activation="sigmoid", init="kaiming").double()
    u = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    s = [torch.rand(2, *shape, dtype=torch.float64) for shape in block.state_shapes((2, 8, 8))]
    layers = list(range(len(s)))
    analytical = block.preactivations(s, u, layers)
    generic = EnergyBlock.preactivations(block, s, u, layers)
    for l in layers:
        torch.testing.assert_close(analytical[l], generic[l])


class QuadraticBlock(EnergyBlock):
    """A user-defined block written only through its primitive function Phi:
    two layers with a dense coupling and an extra self-interaction 0.1 * <s_2, s_2>."""

    def __init__(self, n: int, m: int, **kw):
        from eqprop.activations import Logistic
        super().__init__([Logistic(), Logistic()], **kw)
        self.w = nn.Parameter(torch.randn(m, n) * 0.3)

    def state_shapes(self, in_shape):
        return [in_shape, (self.w.shape[0],)]

    def phi(self, s, u):
        return (s[0] * u).sum(1) + ((s[0] @ self.w.T) * s[1]).sum(1) + 0.1 * (s[1] * s[1]).sum(1)


def test_custom_block_written_as_energy_learns_by_ep():
    torch.manual_seed(1)
    model = FFEBM(nn.Linear(4, 5), QuadraticBlock(5, 3, T1=500, tol=1e-13, update="sync"), nn.Linear(3, 2)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 2, (6,))

    def loss_fn():
        return F.cross_entropy(model(x), y)

    model.set_estimator("ep", beta=1e-4, T2=500, tol=1e-13)
    ep = torch.cat([g.flatten() for g in model_gradients(model, loss_fn)])
    fd = torch.cat([g.flatten() for g in finite_differences(model, loss_fn, 1e-5)])
    assert rel_error(ep, fd) < 1e-4


def test_goe_initialisation_statistics():
    w = torch.empty(200, 200, 3, 3)
    goe_(w, 1e-2)
    assert torch.equal(w, w.transpose(-1, -2))
    off = w[..., 0, 1].flatten()
    diag = w[..., 0, 0].flatten()
    assert off.var().item() == pytest.approx(1e-2 / 3, rel=0.05)
    assert diag.var().item() == pytest.approx(2e-2 / 3, rel=0.05)
    lin = nn.Linear(50, 20)
    weighted_kaiming_(lin.weight, lin.bias, 0.5)
    assert lin.weight.abs().max() <= 0.5 / math.sqrt(50) and lin.bias.abs().max() <= 0.5 / math.sqrt(50)


def test_published_chain_in_one_call():
    # SPEC §6, splitting L = 6, 3 blocks (widths scaled down by 16 for speed).
    model = conv_ffebm([dict(channels=[3, 8, 16], pools="mm"), dict(channels=[16, 16, 32], pools="mm"),
                        dict(channels=[32, 32], pools="-", fc=[16])], num_classes=10, T1=5,
                       estimator_settings=dict(T2=3))
    assert len(model.blocks) == 3
    assert [b.num_layers for b in model.blocks] == [2, 2, 2]
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    F.cross_entropy(out, torch.tensor([1, 2])).backward()
    assert all(p.grad is not None for p in model.parameters())
    # in-block convolutions are GOE: symmetric 3x3 slices
    w = model.blocks[0].couplings[0].conv.weight
    assert torch.equal(w, w.transpose(-1, -2))


def test_reduced_precision_relaxation_returns_full_precision_states():
    block = ConvHopfield([2, 3], pools="m", activation="hardsigmoid", init="kaiming", relax_dtype=torch.bfloat16)
    u = torch.randn(2, 2, 8, 8)
    s, stats = block.relax(u, T=5, tol=None)
    assert all(x.dtype == torch.float32 for x in s) and stats.iters == 5
    block.relax_dtype = None
    s32, _ = block.relax(u, T=5, tol=None)
    assert max_gap(s, s32) < 0.05


def test_ep_memory_does_not_store_the_trajectory():
    block = DenseHopfield([6, 5, 4], T1=50)
    u = torch.randn(3, 6, requires_grad=True)
    out = block(u)
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 1 + block.num_layers  # input and the free equilibrium, whatever T1/T2


def test_couplings_adjoint_identity():
    torch.manual_seed(0)
    for c, shape in [(DenseCoupling(12, 5), (3, 3, 2, 2)), (ConvCoupling(3, 4, pool=True), (2, 3, 6, 6)),
                     (ConvCoupling(3, 4, pool=False), (2, 3, 5, 5))]:
        c = c.double()
        x = torch.randn(*shape, dtype=torch.float64)
        out, aux = c(x)
        y = torch.randn_like(out)
        bias = c.linear.bias if isinstance(c, DenseCoupling) else c.conv.bias
        lhs = (y * (out - bias.view(1, -1, *([1] * (out.dim() - 2))))).sum()
        rhs = (c.adjoint(y, aux, x.shape) * x).sum()
        assert lhs.item() == pytest.approx(rhs.item(), rel=1e-10)
