"""Gradient correctness of the hybrid algorithm (float64, smooth energies, tight relaxation)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eqprop import ID
from eqprop.testing import cosine, flatten, rel_error


def ce_loss(model, x, y):
    def loss_fn(reduction="mean"):
        return F.cross_entropy(model(x), y, reduction=reduction)
    return loss_fn


def free_phases(model):
    return [st["free"] for st in model.relax_stats()]


@pytest.mark.parametrize("kind,n_blocks", [("dense", 1), ("dense", 2), pytest.param("dense", 3, marks=pytest.mark.slow),
                                           ("conv", 1), pytest.param("conv", 2, marks=pytest.mark.slow),
                                           pytest.param("conv", 3, marks=pytest.mark.slow)])
def test_centered_ep_matches_finite_differences(check_model, param_grads_list, param_fd, kind, n_blocks):
    # Conv + max-pool + batch-norm (train mode) sit between the blocks.
    model, x, y = check_model(kind, n_blocks, T1=500, tol=1e-13)
    loss_fn = ce_loss(model, x, y)
    model.set_estimator("ep", beta=1e-4, T2=500, tol=1e-13)
    ep = param_grads_list(model, loss_fn)
    assert len(free_phases(model)) == n_blocks
    assert all(f["converged"] for f in free_phases(model))
    assert all(st["nudged+"]["converged"] and st["nudged-"]["converged"] for st in model.relax_stats())
    fd = param_fd(model, loss_fn, 1e-5)
    assert rel_error(ep, fd) <= 1e-3
    for g_ep, g_fd in zip(ep, fd):
        assert rel_error(g_ep, g_fd) <= 1e-2


def test_id_matches_finite_differences_and_bptt_approaches_id(check_model, param_grads, param_fd):
    model, x, y = check_model("conv", 2, T1=500, tol=1e-13)
    loss_fn = ce_loss(model, x, y)
    model.set_estimator("id", tol=1e-13, max_iter=2000)
    g_id = param_grads(model, loss_fn)
    assert all(st["adjoint"]["converged"] for st in model.relax_stats())
    fd = flatten(param_fd(model, loss_fn, 1e-5))
    assert rel_error(g_id, fd) <= 1e-6
    errors = []
    for T2 in (1, 3, 10, 40):
        model.set_estimator("bptt", T2=T2)
        errors.append(rel_error(param_grads(model, loss_fn), g_id))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-8


def test_ep_matches_id_with_hardsigmoid_and_maxpool_once_converged(check_model, param_grads_list):
    model, x, y = check_model("conv", 3, activation="hardsigmoid", pool_in_blocks=True, T1=500, tol=1e-13)
    loss_fn = ce_loss(model, x, y)
    model.set_estimator("ep", beta=1e-4, T2=500, tol=1e-13)
    g_ep = param_grads_list(model, loss_fn)
    assert all(f["converged"] for f in free_phases(model))
    model.set_estimator("id", tol=1e-10, max_iter=5000)
    g_id = param_grads_list(model, loss_fn)
    names = [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, g_ep, g_id):
        assert b.abs().max() > 0, name
        assert cosine(a, b) >= 0.999, name


def test_unconverged_free_phase_is_reported(check_model):
    model, x, y = check_model("conv", 2, activation="hardsigmoid", pool_in_blocks=True, T1=2, tol=1e-13)
    model.set_estimator("ep", T2=50, tol=1e-13)
    ce_loss(model, x, y)().backward()
    free = free_phases(model)
    assert len(free) == 2
    assert all(f["iters"] == 2 and f["converged"] is False and f["residual"] > 1e-13 for f in free)


def test_gradcheck_report():
    """`eqprop gradcheck`'s report: the free-phase statistics of every block, and EP, ID and
    BPTT against each other when finite differences are skipped."""
    from eqprop.gradcheck import run_gradcheck

    report = run_gradcheck("conv", 2, activation="hardsigmoid", pool_in_blocks=True, T1=2, T2=50, tol=1e-13,
                           bptt_T2=2, skip_fd=True)
    assert not report["converged"]
    assert all(f["iters"] == 2 and f["converged"] is False for f in report["free_phase"])
    report = run_gradcheck("dense", 1, beta=1e-4, T1=500, T2=500, tol=1e-13, bptt_T2=200, skip_fd=True)
    assert report["converged"] and report["total"]["reference"] == "id"
    assert report["total"]["ep_cos"] > 0.9999 and report["total"]["bptt_rel"] < 1e-6


def slope(betas, errors):
    return np.polyfit(np.log(betas), np.log(errors), 1)[0]


def test_ep_bias_orders(check_model, param_grads):
    model, x, y = check_model("dense", 2, T1=500, tol=1e-14)
    loss_fn = ce_loss(model, x, y)
    model.set_estimator("id", tol=1e-14, max_iter=2000)
    g_id = param_grads(model, loss_fn)
    betas = [0.4, 0.2, 0.1, 0.05]
    slopes = {}
    for variant in ("centered", "positive", "negative"):
        errors = []
        for beta in betas:
            model.set_estimator("ep", beta=beta, variant=variant, T2=1000, tol=1e-14)
            errors.append(rel_error(param_grads(model, loss_fn), g_id))
        slopes[variant] = slope(betas, errors)
    assert 1.8 < slopes["centered"] < 2.2, slopes
    assert 0.8 < slopes["positive"] < 1.2, slopes
    assert 0.8 < slopes["negative"] < 1.2, slopes


@pytest.mark.parametrize("estimator", ["ep", "id", "bptt"])
def test_gradient_invariant_to_loss_reduction(check_model, param_grads, estimator):
    model, x, y = check_model("conv", 2, T1=300, tol=1e-12)
    loss_fn = ce_loss(model, x, y)
    model.set_estimator(estimator)  # default beta = 0.2: the nudge must not depend on the reduction
    mean = param_grads(model, lambda: loss_fn("mean"))
    total = param_grads(model, lambda: loss_fn("sum"))
    assert mean.abs().max() > 0
    assert rel_error(total / x.shape[0], mean) < 1e-10


def test_ep_on_float32_default_settings_is_close_to_id(check_model, param_grads):
    model, x, y = check_model("conv", 2, dtype=torch.float32, T1=200, tol=1e-6)
    loss_fn = ce_loss(model, x, y)
    model.set_estimator("id", tol=1e-7)
    g_id = param_grads(model, loss_fn)
    model.set_estimator("ep", beta=0.05, T2=100, tol=1e-7)
    g_ep = param_grads(model, loss_fn)
    assert g_ep.dtype == torch.float32 and bool(torch.isfinite(g_ep).all())
    assert cosine(g_ep, g_id) > 0.99
    assert rel_error(g_ep, g_id) < 0.1


def test_per_block_estimators_without_rebuilding(check_model, param_grads):
    model, x, y = check_model("dense", 2, T1=500, tol=1e-13)
    loss_fn = ce_loss(model, x, y)
    params = [p.data_ptr() for p in model.parameters()]
    model.set_estimator("id", tol=1e-13)
    g_id = param_grads(model, loss_fn)
    model.set_estimator("ep", blocks=[1], beta=1e-4, T2=500, tol=1e-13)
    assert model.blocks[0].estimator == ID(tol=1e-13)
    assert [b.estimator.name for b in model.blocks] == ["id", "ep"]
    g_mixed = param_grads(model, loss_fn)
    assert set(model.relax_stats()[0]) == {"free", "adjoint"}
    assert set(model.relax_stats()[1]) == {"free", "nudged+", "nudged-"}
    assert [p.data_ptr() for p in model.parameters()] == params
    assert rel_error(g_mixed, g_id) < 1e-6
