"""Energy-based blocks: relaxation, stopping, statistics, settings, initialisation, custom energies."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eqprop
from eqprop import EP, FFEBM, ConvHopfield, DenseHopfield, EnergyBlock, RelaxStats, conv_ffebm, goe_, weighted_kaiming_
from eqprop.blocks import relative_change
from eqprop.testing import rel_error


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
    s_even, st_even = block.relax(u)
    assert st_sync.converged and st_odd.converged and st_even.converged
    assert max_gap(s_sync, s_odd) < 1e-9 and max_gap(s_sync, s_even) < 1e-9
    assert st_odd.iters <= st_sync.iters  # async uses fresh values: never slower here


def test_tolerance_stops_early_and_reports_count():
    block = DenseHopfield([6, 5, 4], activation="sigmoid", T1=300, tol=1e-6)
    u = torch.randn(4, 6)
    _, stats = block.relax(u)
    assert stats.converged and 1 < stats.iters < 300
    s7, fixed = block.relax(u, tol=None, T=7)
    assert fixed.iters == 7 and fixed.converged is None
    # the residual is the relative change of the last step
    s6, _ = block.relax(u, tol=None, T=6)
    assert fixed.residual == pytest.approx(relative_change(s7, s6).item(), rel=1e-6)
    assert fixed.residual == pytest.approx(relative_change(block.step(s6, u), s6).item(), rel=1e-6)
    model = FFEBM(nn.Flatten(), block, nn.Linear(4, 2))
    x = torch.randn(4, 6)
    model(x)
    assert set(model.relax_stats()[0]) == {"free"}
    assert model.relax_stats()[0]["free"] == block.last_relax["free"].as_dict() == block.relax(x)[1].as_dict()
    assert model.relax_stats()[0]["free"]["converged"] is True


def test_last_relax_records_the_phases_of_forward_and_backward(sq_loss):
    block = DenseHopfield([4, 5, 3], activation="sigmoid", T1=200, tol=1e-8, estimator=EP(T2=30, tol=1e-8))
    u, y = torch.randn(2, 4, requires_grad=True), torch.rand(2, 3)
    out = block(u)
    assert set(block.last_relax) == {"free"} and isinstance(block.last_relax["free"], RelaxStats)
    sq_loss(out, y).backward()
    assert set(block.last_relax) == {"free", "nudged+", "nudged-"}
    for phase in ("nudged+", "nudged-"):
        st = block.last_relax[phase]
        assert st.converged is True and 1 <= st.iters <= 30 and st.residual < 1e-8
    assert eqprop.relax_stats(block) == [{k: v.as_dict() for k, v in block.last_relax.items()}]
    block.estimator = EP(variant="positive", T2=5)
    sq_loss(block(u), y).backward()
    assert set(block.last_relax) == {"free", "nudged+"}  # a new forward starts a new record
    assert block.last_relax["nudged+"] == RelaxStats(5, block.last_relax["nudged+"].residual, None)


def test_configure_validates_and_changes_nothing_when_invalid():
    block = DenseHopfield([4, 3], T1=20, name="cfg")
    block.configure(T1=50, tol=1e-5, update="sync", check_every=3)
    assert (block.T1, block.tol, block.update, block.check_every) == (50, 1e-5, "sync", 3)
    with pytest.raises(ValueError, match="cfg: update"):
        block.configure(T1=70, update="random")
    assert (block.T1, block.update) == (50, "sync")
    with pytest.raises(ValueError, match="unknown relaxation setting"):
        block.configure(T2=3)
    model = FFEBM(DenseHopfield([4, 3], name="a"), nn.Linear(3, 4), DenseHopfield([4, 3], name="b"))
    eqprop.configure_blocks(model, T1=33)
    assert [b.T1 for b in model.blocks] == [33, 33]
    with pytest.raises(ValueError, match="relax_dtype"):
        model.configure_blocks(T1=44, relax_dtype=torch.int32)
    assert [(b.T1, b.relax_dtype) for b in model.blocks] == [(33, None), (33, None)]
    model.configure_blocks(relax_dtype=torch.bfloat16)
    assert [b.relax_dtype for b in model.blocks] == [torch.bfloat16, torch.bfloat16]


def test_check_every_spaces_the_tolerance_checks():
    block = DenseHopfield([6, 5, 4], activation="sigmoid", T1=300, tol=1e-6)
    u = torch.randn(4, 6)
    _, every1 = block.relax(u)
    block.check_every = 7
    _, every7 = block.relax(u)
    assert every7.converged and every7.iters % 7 == 0
    assert every1.iters <= every7.iters < every1.iters + 7


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


def test_custom_block_written_as_energy_learns_by_ep(quadratic_block, param_grads, param_fd):
    torch.manual_seed(1)
    model = FFEBM(nn.Linear(4, 5), quadratic_block(5, 3, T1=500, tol=1e-13, update="sync"), nn.Linear(3, 2)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 2, (6,))

    def loss_fn():
        return F.cross_entropy(model(x), y)

    model.set_estimator("ep", beta=1e-4, T2=500, tol=1e-13)
    ep = param_grads(model, loss_fn)
    fd = param_fd(model, loss_fn, 1e-5)
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
    # the published splitting of L = 6 into 3 blocks (widths scaled down by 16 for speed)
    model = conv_ffebm([dict(channels=[3, 8, 16], pools="mm"), dict(channels=[16, 16, 32], pools="mm"),
                        dict(channels=[32, 32], pools="-", fc=[16])], num_classes=10, T1=5,
                       estimator_settings=dict(T2=3))
    assert len(model.blocks) == 3
    assert [b.num_layers for b in model.blocks] == [2, 2, 2]
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    F.cross_entropy(out, torch.tensor([1, 2])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert all(b.estimator == EP(T2=3) for b in model.blocks)
    assert all(b.last_relax["free"].iters == 5 for b in model.blocks)
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


@pytest.mark.parametrize("T1", [5, 50])
def test_ep_memory_does_not_store_the_trajectory(T1):
    block = DenseHopfield([6, 5, 4], T1=T1, estimator=EP(T2=40))
    u = torch.randn(3, 6, requires_grad=True)
    out = block(u)
    saved = out.grad_fn.saved_tensors
    assert len(saved) == 1 + block.num_layers  # input and the free equilibrium, whatever T1/T2
    assert [tuple(t.shape) for t in saved] == [(3, 6), (3, 6), (3, 5), (3, 4)]


def test_standalone_block_has_no_estimator_until_given_one():
    block = DenseHopfield([4, 3], name="bare")
    assert block.estimator is None
    u = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="bare: no estimator is set"):
        block(u)
    with torch.no_grad():
        out = block(u)
    assert out.shape == (2, 3) and out.grad_fn is None
    eqprop.set_estimator(block, "ep", beta=0.1)
    assert block.estimator == EP(beta=0.1)
    block(u).sum().backward()
    assert u.grad is not None and u.grad.abs().sum() > 0
    assert FFEBM(DenseHopfield([4, 3])).blocks[0].estimator == EP()


def test_channels_last_relaxation_and_ep_gradient_match_nchw():
    """A channels-last input keeps the relaxation channels-last (zero states included) and
    gives the NCHW relaxation's states and EP gradients (float64)."""
    torch.manual_seed(0)
    block = ConvHopfield([2, 3, 4], pools="m-", fc=[5], in_size=8, init="kaiming", alpha=0.9, T1=30,
                         estimator=EP(beta=0.1, T2=10)).double()
    u = torch.rand(3, 2, 8, 8, dtype=torch.float64)
    cl = u.contiguous(memory_format=torch.channels_last)
    assert [x.is_contiguous(memory_format=torch.channels_last) for x in block.init_state(cl)[:3]] == [True] * 3
    s_ref, _ = block.relax(u)
    s_cl, _ = block.relax(cl)
    assert s_cl[0].is_contiguous(memory_format=torch.channels_last) and not s_cl[0].is_contiguous()
    for a, b in zip(s_cl, s_ref):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    grads = []
    for x in (u, cl):
        block.zero_grad()
        (block(x) ** 2).sum().backward()
        grads.append([p.grad.clone() for p in block.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_channels_last_block_gets_its_error_current_in_its_layout():
    """A readout's flatten hands autograd's error current back contiguous; the block's
    estimator gets it channels-last like its states (no mixed-layout add per nudged sweep),
    with the same EP gradients as in NCHW (float64)."""
    from dataclasses import dataclass

    @dataclass(frozen=True, kw_only=True)
    class Spy(EP):
        def gradients(self, block, u, s, delta, target, record, need_input):
            layouts.append(delta.is_contiguous(memory_format=torch.channels_last) and not delta.is_contiguous())
            return super().gradients(block, u, s, delta, target, record, need_input)

    layouts: list[bool] = []
    torch.manual_seed(0)
    model = FFEBM(ConvHopfield([2, 3, 4], pools="--", in_size=6, init="kaiming", alpha=0.9, T1=30,
                               estimator=Spy(beta=0.1, T2=10)), nn.Flatten(), nn.Linear(4 * 36, 3)).double()
    x = torch.rand(5, 2, 6, 6, dtype=torch.float64)
    grads = []
    for fmt in (torch.contiguous_format, torch.channels_last):
        model.zero_grad()
        model.to(memory_format=fmt)
        model(x.contiguous(memory_format=fmt)).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert layouts == [False, True]
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
