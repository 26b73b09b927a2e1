"""The fast paths of the Hamiltonian units against plain step-by-step references (float64):
the input drive computed per block of steps, the blocked parallel scan, the echo's batched
sums, and no host reads of tensor values inside the time loop."""
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from eqprop import RHEL
from eqprop.hamiltonian import LinearHRU, NonlinearHRU, build_hssm, echo, make_hru, rhel_readout

DT = torch.float64


def _unit(kind: str, seed: int = 0, H: int = 3, P: int = 4, **kw):
    torch.manual_seed(seed)
    return make_hru(kind, H, P, **kw).to(DT)


# --- the plain reference: one step at a time, u_t @ B^T inside the loop -----------------------
def ref_step(unit, y, z, bu, nat):
    dt = nat["dt"]
    yh = y + 0.5 * dt * z
    z = z - dt * unit.force(yh, bu, nat)
    return yh + 0.5 * dt * z, z, yh


def ref_forward(unit, u, y0, z0):
    """Outputs C y_t + D u_t, and the final state."""
    nat = unit.natural()
    y, z, outs = y0, z0, []
    for t in range(u.shape[1]):
        y, z, _ = ref_step(unit, y, z, u[:, t] @ nat["B"].T, nat)
        outs.append(y @ unit.C.T + u[:, t] * unit.D)
    return torch.stack(outs, 1), y, z


def ref_echo(unit, u, yL, zL, g_out, eps, normalize):
    """The two nudged echoes and their sums, one step at a time (the formulation in rhel.py's
    module doc, written out directly)."""
    nat = {k: v.detach() for k, v in unit.natural().items()}
    dt, B, C, D = nat["dt"], nat["B"], unit.C.detach(), unit.D.detach()
    gy = g_out @ C  # dl/dy_t
    if normalize == "none":
        scale = torch.ones(u.shape[0], dtype=DT)
    else:
        scale = gy.square().sum((1, 2)).sqrt()
        scale = scale.mean().expand(u.shape[0]) if normalize == "batch" else scale
    col = scale.view(-1, 1)
    res = {}
    for name, s in (("plus", 1.0), ("minus", -1.0)):
        y, z = yL.clone(), -zL.clone()
        sums = {"dt": 0, "B": 0, "u": torch.zeros_like(u)}
        for t in reversed(range(u.shape[1])):
            z = z + s * eps * gy[:, t] / col
            bu = u[:, t] @ B.T
            z_in = z
            y, z, yh = ref_step(unit, y, z, bu, nat)
            sums["dt"] = sums["dt"] + (col * (0.25 * (z_in ** 2 + z ** 2) + unit.potential(yh, bu, nat))).sum(0)
            parts, dbu = unit.partials(yh, bu, nat)
            for p, v in parts.items():
                sums[p] = sums.get(p, 0) + (col * v).sum(0)
            sums["B"] = sums["B"] + (col * dbu).T @ u[:, t]
            sums["u"][:, t] = (col * dbu * dt) @ B
        res[name] = (y, z, sums)
    (yp, zp, sp), (ym, zm, sm) = res["plus"], res["minus"]
    k = -1.0 / (2 * eps)
    grads = {p: k * (sp[p] - sm[p]) * (1 if p == "dt" else dt[:, None] if p == "B" else dt) for p in sp if p != "u"}
    return {"grad_u": g_out * D + k * (sp["u"] - sm["u"]), "grad_y0": (zp - zm) * col / (2 * eps),
            "grad_z0": (yp - ym) * col / (2 * eps), **grads}


def _close(a, b, tol):
    assert a.shape == b.shape
    assert (a - b).abs().max() <= tol * max(b.abs().max().item(), 1e-300), ((a - b).abs().max(), b.abs().max())


@pytest.mark.parametrize("kind,scan", [("linear", "loop"), ("linear", "parallel"), ("nonlinear", "loop")])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_forward_equals_plain_step_loop(kind, scan, chunk):
    unit = _unit(kind, chunk=chunk, scan=scan)
    g = torch.Generator().manual_seed(1)
    u, y0, z0 = (torch.randn(*s, generator=g, dtype=DT) for s in ((3, 30, 3), (3, 4), (3, 4)))
    with torch.no_grad():
        ref = ref_forward(unit, u, y0, z0)
        new = unit.trajectory(u, y0, z0, readout=True)
    for a, b in zip(new, ref):
        _close(a, b, 1e-12)
    # autograd through the new path (BPTT) gives the reference's gradients
    x = u.clone().requires_grad_(True)
    g_new = torch.autograd.grad(unit.trajectory(x, y0, z0, readout=True)[0].square().sum(), [x, *unit.parameters()])
    g_ref = torch.autograd.grad(ref_forward(unit, x, y0, z0)[0].square().sum(), [x, *unit.parameters()])
    for a, b in zip(g_new, g_ref):
        _close(a, b, 1e-10)


@pytest.mark.parametrize("kind,scan", [("linear", "loop"), ("linear", "parallel"), ("nonlinear", "loop")])
@pytest.mark.parametrize("normalize,chunk", [("sample", 7), ("batch", 1), ("none", 64)])
def test_echo_equals_plain_two_echo_reference(kind, scan, normalize, chunk):
    unit = _unit(kind, chunk=chunk, scan=scan)
    g = torch.Generator().manual_seed(2)
    u, g_out = torch.randn(3, 30, 3, generator=g, dtype=DT), torch.randn(3, 30, 3, generator=g, dtype=DT)
    y0, z0 = torch.randn(3, 4, generator=g, dtype=DT), torch.randn(3, 4, generator=g, dtype=DT)
    with torch.no_grad():
        _, yL, zL = ref_forward(unit, u, y0, z0)
        new = echo(unit, u, yL, zL, g_out, 1e-3, normalize)
        ref = ref_echo(unit, u, yL, zL, g_out, 1e-3, normalize)
    got = {"grad_u": new.grad_u, "grad_y0": new.grad_y0, "grad_z0": new.grad_z0, **new.natural_grads}
    assert set(got) == set(ref)
    for name in ref:
        _close(got[name], ref[name], 1e-9)  # a difference of two echoes over 2 eps: round-off / eps
    # the readout's gradients are direct sums
    _close(new.grad_D, (g_out * u).sum((0, 1)), 1e-12)


@pytest.mark.parametrize("kind", ["linear", "nonlinear"])
def test_rhel_gradients_do_not_depend_on_the_chunk(kind):
    g = torch.Generator().manual_seed(3)
    u = torch.randn(2, 41, 3, generator=g, dtype=DT, requires_grad=True)
    w = torch.randn(2, 41, 3, generator=g, dtype=DT)
    grads = []
    for chunk in (1, 6, 41, 100):
        unit = _unit(kind, chunk=chunk)
        out = rhel_readout(unit, u, estimator=RHEL(eps=1e-4))
        grads.append(torch.autograd.grad((out * w).sum(), [u, *unit.parameters()]))
    for other in grads[1:]:
        for a, b in zip(other, grads[0]):
            _close(a, b, 1e-9)


@settings(max_examples=25, deadline=None)
@given(L=st.integers(1, 150), P=st.integers(1, 5), batch=st.integers(1, 3), kicks=st.booleans(),
       reverse=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_parallel_scan_equals_step_loop_for_any_length(L, P, batch, kicks, reverse, seed):
    torch.manual_seed(seed)
    unit = LinearHRU(2, P, dt_min=0.01, dt_max=0.99).to(DT)
    with torch.no_grad():
        unit.A_raw.uniform_(-0.5, 2.0)  # A = relu(A_raw) in [0, 2], exactly 0 for some channels
    nat = unit.natural()
    lead = (2, batch) if kicks else (batch,)
    bu = torch.randn(batch, L, P, dtype=DT)
    k = 0.1 * torch.randn(*lead, L, P, dtype=DT) if kicks else None
    y0, z0 = torch.randn(*lead, P, dtype=DT), torch.randn(*lead, P, dtype=DT)
    with torch.no_grad():
        loop = unit.states(y0, z0, bu, nat, k, reverse)
        unit.set_scan("parallel")
        par = unit.states(y0, z0, bu, nat, k, reverse)
    for a, b in zip(par, loop):
        assert a.shape == b.shape == lead + (L + 1, P)
        _close(a, b, 1e-10)


class HostReads(TorchFunctionMode):
    """Counts the calls that copy a tensor's value to the host (a device synchronisation on a GPU)."""

    NAMES = {"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "numpy", "cpu"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _host_reads(model, L, features=3, estimator="rhel"):
    model.set_estimator(estimator) if estimator == "rhel" else model.set_estimator(estimator, T2=None)
    x = torch.randn(2, L, features, dtype=DT, requires_grad=True)
    with HostReads() as reads:
        model(x).square().sum().backward()
    return reads.count


@pytest.mark.parametrize("estimator", ["rhel", "bptt"])
@pytest.mark.parametrize("scan", ["loop", "parallel"])
def test_no_host_reads_inside_the_time_loop(estimator, scan):
    unit = _unit("linear", chunk=4, scan=scan)
    counts = [_host_reads(unit, L, estimator=estimator) for L in (5, 50)]
    # one check of the input and one of the final state per call, whatever the length
    assert counts == [2, 2]
    net = build_hssm(in_features=3, num_classes=2, hidden=4, state_size=4, n_blocks=2, chunk=4, scan=scan).to(DT)
    counts = [_host_reads(net, L, estimator=estimator) for L in (5, 50)]
    assert counts[0] == counts[1] == 1 + 2 * 2
    # the echo alone reads nothing
    g = torch.randn(2, 20, 3, dtype=DT)
    with torch.no_grad():
        _, yL, zL = unit.trajectory(torch.randn(2, 20, 3, dtype=DT))
    with HostReads() as reads:
        echo(unit, torch.randn(2, 20, 3, dtype=DT), yL, zL, g, 1e-2)
    assert reads.count == 0


def test_chunk_setting_is_checked():
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match="chunk must be a positive integer"):
            LinearHRU(3, 4, chunk=bad)
    with pytest.raises(ValueError, match="chunk must be a positive integer"):
        build_hssm(in_features=3, num_classes=2, chunk=0)
    assert "chunk=5" in repr(NonlinearHRU(3, 4, chunk=5))
    assert all(h.chunk == 9 for h in build_hssm(in_features=3, num_classes=2, n_blocks=2, chunk=9).hrus)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("scan", ["loop", "parallel"])
def test_cuda_synchronisations_do_not_grow_with_length(scan):
    counts = []
    for L in (8, 64):
        torch.manual_seed(0)
        unit = LinearHRU(16, 16, scan=scan, chunk=8).cuda()
        x = torch.randn(4, L, 16, device="cuda", requires_grad=True)
        unit(x).square().sum().backward()  # warm-up (allocator, kernels)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                unit(x).square().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[0] == counts[1] <= 2, counts
