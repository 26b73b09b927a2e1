"""Gradient correctness of the hybrid algorithm (float64, smooth energies, tight relaxation)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eqprop.gradcheck import build_check_model, cosine, finite_differences, model_gradients, rel_error, run_gradcheck


def flat(grads):
    return torch.cat([g.flatten() for g in grads])


def setup(kind, n_blocks, **kw):
    model, x, y = build_check_model(kind, n_blocks, **kw)

    def loss_fn(reduction="mean"):
        return F.cross_entropy(model(x), y, reduction=reduction)

    return model, loss_fn


@pytest.mark.parametrize("kind,n_blocks", [("dense", 1), ("dense", 2), ("dense", 3), ("conv", 1), ("conv", 2),
                                           ("conv", 3)])
def test_centered_ep_matches_finite_differences(kind, n_blocks):
    # Conv + max-pool + batch-norm (train mode) sit between the blocks.
    model, loss_fn = setup(kind, n_blocks, T1=500, tol=1e-13)
    model.set_estimator("ep", beta=1e-4, T2=500, tol=1e-13)
    ep = model_gradients(model, loss_fn)
    assert all(st["free"]["converged"] for st in model.relax_stats())
    fd = finite_differences(model, loss_fn, 1e-5)
    assert rel_error(flat(ep), flat(fd)) <= 1e-3
    for g_ep, g_fd in zip(ep, fd):
        assert rel_error(g_ep, g_fd) <= 1e-2


def test_id_matches_finite_differences_and_bptt_approaches_id():
    model, loss_fn = setup("conv", 2, T1=500, tol=1e-13)
    model.set_estimator("id", tol=1e-13, max_iter=2000)
    g_id = flat(model_gradients(model, loss_fn))
    fd = flat(finite_differences(model, loss_fn, 1e-5))
    assert rel_error(g_id, fd) <= 1e-6
    errors = []
    for T2 in (1, 3, 10, 40):
        model.set_estimator("bptt", T2=T2)
        errors.append(rel_error(flat(model_gradients(model, loss_fn)), g_id))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-8


def test_ep_matches_id_with_hardsigmoid_and_maxpool_once_converged():
    report = run_gradcheck("conv", 3, activation="hardsigmoid", pool_in_blocks=True, beta=1e-4, T1=500, T2=500,
                           tol=1e-13, bptt_T2=5, skip_fd=True)
    assert report["converged"]
    for row in report["params"]:
        assert row["ep_id_cos"] >= 0.999, row


def test_unconverged_free_phase_is_reported():
    report = run_gradcheck("conv", 2, activation="hardsigmoid", pool_in_blocks=True, T1=2, T2=50, tol=1e-13,
                           bptt_T2=2, skip_fd=True)
    assert not report["converged"]
    assert all(f["iters"] == 2 and f["converged"] is False for f in report["free_phase"])


def slope(betas, errors):
    return np.polyfit(np.log(betas), np.log(errors), 1)[0]


def test_ep_bias_orders():
    model, loss_fn = setup("dense", 2, T1=500, tol=1e-14)
    model.set_estimator("id", tol=1e-14, max_iter=2000)
    g_id = flat(model_gradients(model, loss_fn))
    betas = [0.4, 0.2, 0.1, 0.05]
    slopes = {}
    for variant in ("centered", "positive", "negative"):
        errors = []
        for beta in betas:
            model.set_estimator("ep", beta=beta, variant=variant, T2=1000, tol=1e-14)
            errors.append(rel_error(flat(model_gradients(model, loss_fn)), g_id))
        slopes[variant] = slope(betas, errors)
    assert 1.8 < slopes["centered"] < 2.2, slopes
    assert 0.8 < slopes["positive"] < 1.2, slopes
    assert 0.8 < slopes["negative"] < 1.2, slopes


@pytest.mark.parametrize("estimator", ["ep", "id", "bptt"])
def test_gradient_invariant_to_loss_reduction(estimator):
    model, loss_fn = setup("conv", 2, T1=300, tol=1e-12)
    model.set_estimator(estimator)  # default beta = 0.2: the nudge must not depend on the reduction
    mean = flat(model_gradients(model, lambda: loss_fn("mean")))
    total = flat(model_gradients(model, lambda: loss_fn("sum")))
    n = 3  # batch size of the conv check model
    assert rel_error(total / n, mean) < 1e-10


def test_ep_on_float32_default_settings_is_close_to_id():
    model, loss_fn = setup("conv", 2, dtype=torch.float32, T1=200, tol=1e-6)
    model.set_estimator("id", tol=1e-7)
    g_id = flat(model_gradients(model, loss_fn))
    model.set_estimator("ep", beta=0.05, T2=100, tol=1e-7)
    g_ep = flat(model_gradients(model, loss_fn))
    assert cosine(g_ep, g_id) > 0.99
    assert not math.isnan(rel_error(g_ep, g_id))


def test_per_block_estimators_without_rebuilding():
    model, loss_fn = setup("dense", 2, T1=500, tol=1e-13)
    params = [p.data_ptr() for p in model.parameters()]
    model.set_estimator("id", tol=1e-13)
    g_id = flat(model_gradients(model, loss_fn))
    model.set_estimator("ep", blocks=[1], beta=1e-4, T2=500, tol=1e-13)
    assert [b.estimator.name for b in model.blocks] == ["id", "ep"]
    g_mixed = flat(model_gradients(model, loss_fn))
    assert [p.data_ptr() for p in model.parameters()] == params
    assert rel_error(g_mixed, g_id) < 1e-6
