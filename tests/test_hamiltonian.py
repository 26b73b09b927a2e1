"""Hamiltonian recurrent units and RHEL: RHEL against autograd through the steps (BPTT)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eqprop import BPTT, RHEL
from eqprop.hamiltonian import HSSM, LinearHRU, NonlinearHRU, build_hssm, reverse, rhel_readout

DT = torch.float64


def _unit(kind: str, seed: int = 0, H: int = 3, P: int = 4):
    torch.manual_seed(seed)
    return (LinearHRU if kind == "linear" else NonlinearHRU)(H, P).to(DT)


def _grads(unit, u, y0, z0, weights, estimator, eps=1e-5):
    """Gradients of sum(weights * outputs) w.r.t. every parameter, u, y0 and z0."""
    leaves = [x.detach().requires_grad_(True) for x in (u, y0, z0)]
    if estimator == "rhel":
        out = rhel_readout(unit, *leaves, estimator=RHEL(eps=eps))
    else:
        out = unit.trajectory(*leaves, readout=True)[0]
    names = [n for n, _ in unit.named_parameters()]
    grads = torch.autograd.grad((out * weights).sum(), list(unit.parameters()) + leaves)
    return dict(zip(names + ["u", "y0", "z0"], grads))


def _rel_errors(kind, eps, L=25, seed=0):
    unit = _unit(kind, seed)
    g = torch.Generator().manual_seed(seed + 1)
    u, w = torch.randn(3, L, 3, generator=g, dtype=DT), torch.randn(3, L, 3, generator=g, dtype=DT)
    y0, z0 = 0.5 * torch.randn(3, 4, generator=g, dtype=DT), 0.5 * torch.randn(3, 4, generator=g, dtype=DT)
    ref = _grads(unit, u, y0, z0, w, "bptt")
    est = _grads(unit, u, y0, z0, w, "rhel", eps)
    return {k: ((est[k] - ref[k]).norm() / ref[k].norm()).item() for k in ref}


@pytest.mark.parametrize("kind", ["linear", "nonlinear"])
def test_rhel_equals_bptt_every_parameter_and_input(kind):
    errors = _rel_errors(kind, eps=1e-5)
    assert set(errors) >= {"B", "C", "D", "dt_raw", "u", "y0", "z0"}
    assert max(errors.values()) <= 1e-6, errors


def test_rhel_error_is_second_order_in_eps_for_nonlinear_unit():
    eps = np.array([4e-2, 2e-2, 1e-2, 5e-3])
    errs = np.array([[e for k, e in _rel_errors("nonlinear", float(x)).items() if k not in ("C", "D")]
                     for x in eps])  # C, D are autograd in both
    slopes = np.polyfit(np.log(eps), np.log(errs), 1)[0]
    assert np.all(np.abs(slopes - 2) < 0.1), slopes


def test_linear_unit_centered_rhel_is_exact_at_large_eps():
    # every echo quantity is quadratic in eps for the linear unit: no O(eps^2) term
    errors = _rel_errors("linear", eps=1.0)
    assert max(errors.values()) <= 1e-10, errors


def test_parallel_scan_equals_step_loop():
    unit = _unit("linear")
    u = torch.randn(2, 300, 3, dtype=DT, requires_grad=True)
    y0, z0 = torch.randn(2, 4, dtype=DT), torch.randn(2, 4, dtype=DT)
    loop = unit.trajectory(u, y0, z0)
    unit.set_scan("parallel")
    par = unit.trajectory(u, y0, z0)
    for a, b in zip(loop, par):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10 * loop[0].abs().max().item())
    # autograd through the scan is BPTT too, and RHEL runs its forward on the scan
    g_par = torch.autograd.grad(par[0].square().sum(), [u, unit.A_raw, unit.dt_raw])
    g_loop = torch.autograd.grad(loop[0].square().sum(), [u, unit.A_raw, unit.dt_raw])
    for a, b in zip(g_par, g_loop):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9 * b.abs().max().item())
    g_rhel = torch.autograd.grad(rhel_readout(unit, u, y0, z0, estimator=RHEL(eps=1e-3)).square().sum(),
                                 [u, unit.A_raw, unit.dt_raw])
    unit.set_scan("loop")
    g_ref = torch.autograd.grad(unit.trajectory(u, y0, z0, readout=True)[0].square().sum(),
                                [u, unit.A_raw, unit.dt_raw])
    for a, b in zip(g_rhel, g_ref):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-8 * b.abs().max().item())


@pytest.mark.parametrize("kind", ["linear", "nonlinear"])
def test_forward_then_unnudged_echo_returns_initial_state(kind):
    unit = _unit(kind)
    u = torch.randn(3, 60, 3, dtype=DT)
    y0, z0 = torch.randn(3, 4, dtype=DT), torch.randn(3, 4, dtype=DT)
    with torch.no_grad():
        ys, yL, zL = unit.trajectory(u, y0, z0)
    assert (yL - y0).abs().max() > 0.1  # it moved
    y, z = reverse(unit, u, yL, zL)
    assert (y - y0).abs().max() < 1e-12 and (z - z0).abs().max() < 1e-12


@pytest.mark.parametrize("kind,readout", [("linear", "mean"), ("nonlinear", "last")])
def test_two_block_hssm_end_to_end_rhel_equals_bptt(kind, readout):
    torch.manual_seed(3)
    net = build_hssm(in_features=3, num_classes=4, hidden=6, state_size=5, n_blocks=2, unit=kind,
                     readout=readout, estimator_settings={"eps": 1e-5}).to(DT)
    x = torch.randn(4, 20, 3, dtype=DT, requires_grad=True)
    y = torch.tensor([0, 1, 3, 2])

    def grads(est, **settings):
        net.set_estimator(est, **settings)
        assert all(h.estimator == (RHEL(eps=1e-5) if est == "rhel" else BPTT(T2=None)) for h in net.hrus)
        return torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()) + [x])

    names = [n for n, _ in net.named_parameters()] + ["x"]
    for name, a, b in zip(names, grads("rhel", eps=1e-5), grads("bptt", T2=None)):
        assert b.norm() > 0, name
        assert ((a - b).norm() / b.norm()).item() <= 1e-6, name


def test_float32_rhel_close_to_bptt_in_training_precision():
    torch.manual_seed(0)
    net = HSSM(in_features=4, num_classes=3, hidden=8, state_size=8, n_blocks=2, unit="nonlinear",
               estimator_settings={"eps": 1e-2})
    x, y = torch.randn(8, 40, 4), torch.randint(0, 3, (8,))
    flat = {}
    for est, settings in (("rhel", {"eps": 1e-2}), ("bptt", {"T2": None})):
        net.set_estimator(est, **settings)
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        flat[est] = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert F.cosine_similarity(flat["rhel"], flat["bptt"], dim=0) > 0.999


def _saved_bytes(unit, L):
    storages = {}  # the same tensor saved twice costs nothing more

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    u = torch.randn(2, L, 3, dtype=DT, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = unit(u)
    io = (u.numel() + out.numel()) * 8  # inputs and outputs
    return sum(storages.values()) - io


def test_rhel_saves_nothing_that_grows_with_length():
    unit = _unit("nonlinear")
    rhel = [_saved_bytes(unit.set_estimator("rhel"), L) for L in (50, 200)]
    bptt = [_saved_bytes(unit.set_estimator("bptt", T2=None), L) for L in (50, 200)]
    assert rhel[0] == rhel[1]
    assert bptt[1] > 3 * bptt[0]


def test_bad_input_gives_clear_errors():
    unit = _unit("linear")
    with pytest.raises(ValueError, match="batch, time, features"):
        unit(torch.randn(5, 3, dtype=DT))
    with pytest.raises(ValueError, match="features"):
        unit(torch.randn(2, 5, 7, dtype=DT))
    bad = torch.randn(2, 5, 3, dtype=DT)
    bad[1, 2, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        unit(bad)
    with pytest.raises(ValueError, match="empty"):
        unit(torch.randn(2, 0, 3, dtype=DT))
    for eps in (0.0, -1e-3, math.inf):
        with pytest.raises(ValueError, match="eps"):
            unit.set_estimator("rhel", eps=eps)
    with pytest.raises(ValueError, match="estimator"):
        unit.set_estimator("ep")
    with pytest.raises(ValueError, match="linear unit"):
        NonlinearHRU(3, 4, scan="parallel")
    with pytest.raises(ValueError, match="unknown setting"):
        build_hssm(in_features=3, num_classes=2, widht=5)
    with pytest.raises(ValueError, match="in_features"):
        build_hssm(num_classes=2)
    with pytest.raises(ValueError, match="readout"):
        build_hssm(in_features=3, num_classes=2, readout="max")
    net = build_hssm(in_features=3, num_classes=2, hidden=4, state_size=4, n_blocks=1)
    with pytest.raises(ValueError, match="features"):
        net(torch.randn(2, 5, 4))
