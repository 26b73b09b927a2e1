"""The learning rules of eqprop.rules against finite differences and their own definitions."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eqprop
from eqprop import CL, EP, FFEBM, ID, TBP, CpL, DenseHopfield, Estimator, make_estimator
from eqprop.testing import cosine, finite_differences, flatten

DT = torch.float64
TIGHT = dict(T2=3000, tol=1e-14)


def flat_grads(module: nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in module.parameters()])


@pytest.fixture(scope="module")
def tiny():
    """A tiny dense block with smooth (logistic) neurons, relaxed tightly in float64."""
    torch.manual_seed(0)
    block = DenseHopfield([4, 5, 3], activation="sigmoid", alpha=1.5, T1=3000, tol=1e-14, update="sync").to(DT)
    u = torch.randn(3, 4, dtype=DT)
    y = F.one_hot(torch.tensor([0, 2, 1]), 3).to(DT)
    return block, u, y


def sq_mean(out, y):
    return 0.5 * ((out - y) ** 2).sum(1).mean()


def rule_grads(block, u, y, rule, loss=sq_mean, **settings):
    """(parameter gradients, input gradient) of loss(block(u), y) under `rule`, the target
    given to the forward."""
    block.estimator = make_estimator(rule, **settings)
    block.zero_grad(set_to_none=True)
    uu = u.clone().requires_grad_(True)
    loss(block(uu, target=y), y).backward()
    return flat_grads(block), uu.grad


def fd_grads(block, u, loss_of, eps=1e-6):
    """Central finite differences of loss_of(s*_L) over every parameter entry and u."""
    u = u.clone()
    grads = finite_differences(lambda: loss_of(block.relax(u)[0][-1]), [*block.parameters(), u], eps)
    return flatten(grads[:-1]), grads[-1]


@pytest.fixture(scope="module")
def true_grads(tiny):
    block, u, y = tiny
    return fd_grads(block, u, lambda o: sq_mean(o, y))


@pytest.mark.parametrize("rule,settings", [("pep", dict(beta=1e-4)), ("nep", dict(beta=1e-4)),
                                           ("cep", dict(beta=1e-3)), ("ep", dict(beta=1e-3)),
                                           ("rbp", dict(max_iter=3000, tol=1e-14)), ("tbp", dict(K=3000))])
def test_ep_and_backprop_rules_follow_the_loss_gradient(tiny, true_grads, rule, settings):
    block, u, y = tiny
    if rule in ("pep", "nep", "cep", "ep"):
        settings = {**settings, **TIGHT}
    g, gu = rule_grads(block, u, y, rule, **settings)
    g_true, gu_true = true_grads
    assert cosine(g, g_true) > 0.999
    assert cosine(gu, gu_true) > 0.999
    assert torch.allclose(g.norm(), g_true.norm(), rtol=1e-3)


@pytest.mark.parametrize("normalize", ["sample", "batch", "none"])
def test_ep_normalisation_of_the_error_current_does_not_change_the_estimate(tiny, true_grads, normalize):
    """Without a target EP nudges with the error current normalised per sample, by the batch
    mean norm, or not at all: the same gradient for a small beta."""
    block, u, y = tiny
    block.estimator = EP(beta=1e-4, normalize=normalize, **TIGHT)
    block.zero_grad()
    uu = u.clone().requires_grad_(True)
    sq_mean(block(uu), y).backward()
    g_true, gu_true = true_grads
    assert cosine(flat_grads(block), g_true) > 0.9999 and cosine(uu.grad, gu_true) > 0.9999
    assert torch.allclose(flat_grads(block).norm(), g_true.norm(), rtol=1e-3)


def test_id_checks_its_tolerance_every_check_every_steps(tiny):
    block, u, y = tiny
    grads, iters = [], []
    for every in (1, 7):
        g, _ = rule_grads(block, u, y, "id", max_iter=3000, tol=1e-13, check_every=every)
        grads.append(g)
        iters.append(block.last_relax["adjoint"].iters)
        assert block.last_relax["adjoint"].converged
    assert iters[1] % 7 == 0 and iters[0] <= iters[1] < iters[0] + 7
    assert torch.allclose(grads[0], grads[1], rtol=1e-10, atol=1e-14)
    rule_grads(block, u, y, "id", max_iter=5, tol=1e-13, check_every=3)
    assert block.last_relax["adjoint"].iters == 5 and block.last_relax["adjoint"].converged is False


def schur_current(block, u, s, delta):
    """S delta per sample, S = H_LL - H_Lh H_hh^-1 H_hL from the energy's Hessian at s."""
    sizes = [x.shape[1] for x in s]
    n_out = sizes[-1]
    out = []
    for i in range(s[0].shape[0]):
        def energy(flat, u_i=u[i:i + 1]):
            return block.energy(list(torch.split(flat[None], sizes, dim=1)), u_i).sum()
        flat = torch.cat([x[i] for x in s])
        H = torch.autograd.functional.hessian(energy, flat)
        Hhh, HhL = H[:-n_out, :-n_out], H[:-n_out, -n_out:]
        S = H[-n_out:, -n_out:] - HhL.T @ torch.linalg.solve(Hhh, HhL)
        out.append(S @ delta[i])
    return torch.stack(out)


@pytest.fixture(scope="module")
def cpl_limit(tiny):
    block, u, y = tiny
    s = block.relax(u)[0]
    c = schur_current(block, u, s, s[-1] - y) / u.shape[0]
    return fd_grads(block, u, lambda o: (c * o).sum())


@pytest.mark.parametrize("rule,eta", [("pcpl", 1e-4), ("ncpl", 1e-4), ("ccpl", 1e-3), ("cpl", 1e-3)])
def test_cpl_rules_follow_the_gradient_of_their_output_metric(tiny, cpl_limit, true_grads, rule, eta):
    """As eta -> 0, coupled learning moves the output by -eta (s*_L - y) where EP moves it by
    -beta S^-1 (s*_L - y): it is the loss gradient taken with the error current S (s*_L - y),
    S the Schur complement of the energy's Hessian on the output layer. Checked against
    finite differences of the loss <stop_grad(S (s*_L - y)), s*_L> / B. It is not the loss
    gradient itself (S is not a multiple of the identity), which it only approximates."""
    block, u, y = tiny
    g, gu = rule_grads(block, u, y, rule, eta=eta, **TIGHT)
    g_ref, gu_ref = cpl_limit
    assert 0.9 < cosine(g, true_grads[0]) < 0.9999
    assert cosine(g, g_ref) > 0.9999
    assert cosine(gu, gu_ref) > 0.9999
    assert torch.allclose(g.norm(), g_ref.norm(), rtol=1e-3)


def test_cl_is_the_difference_of_clamped_and_free_energy_gradients(tiny):
    block, u, y = tiny
    g, gu = rule_grads(block, u, y, "cl", **TIGHT)
    assert set(block.last_relax) == {"free", "clamped"} and block.last_relax["clamped"].converged
    free = block.relax(u)[0]
    # the clamped state, computed here independently: hidden layers at sigma(dPhi/ds) with s_L = y
    s = [x.clone() for x in free]
    s[-1] = y.clone()
    with torch.no_grad():
        for _ in range(3000):
            pre = block.preactivations(s, u, list(range(len(s) - 1)))
            new = [block.activations[l](pre[l]) for l in range(len(s) - 1)] + [y]
            done = max(float((a - b).abs().max()) for a, b in zip(new, s)) < 1e-15
            s = new
            if done:
                break
    leaves = [x.clone().requires_grad_(True) for x in s[:-1]]
    grad_h = torch.autograd.grad(block.energy([*leaves, y], u).sum(), leaves)
    assert max(float(gh.abs().max()) for gh in grad_h) < 1e-10  # s is stationary in the hidden layers
    with torch.enable_grad():
        diff = (block.energy(s, u) - block.energy(free, u)).mean()
        ref = torch.autograd.grad(diff, list(block.parameters()))
    assert torch.allclose(g, torch.cat([r.flatten() for r in ref]), atol=1e-9)
    assert torch.allclose(gu, -(s[0] - free[0]) / u.shape[0], atol=1e-9)


def test_loss_reduction_only_scales_the_update(tiny):
    block, u, y = tiny
    g_mean, _ = rule_grads(block, u, y, "cep", beta=0.05, T2=200)
    g_sum, _ = rule_grads(block, u, y, "cep", loss=lambda o, t: 0.5 * ((o - t) ** 2).sum(), beta=0.05, T2=200)
    assert g_mean.abs().max() > 0
    assert torch.allclose(g_sum, g_mean * u.shape[0], rtol=1e-9, atol=1e-12)


def test_labels_work_like_one_hot_targets(tiny):
    block, u, y = tiny
    g1, _ = rule_grads(block, u, y, "ccpl", eta=0.3, T2=50)
    block.estimator = make_estimator("ccpl", eta=0.3, T2=50)
    block.zero_grad()
    with eqprop.targets(block, y.argmax(1)):
        sq_mean(block(u), y).backward()
    assert g1.abs().max() > 0
    assert torch.allclose(flat_grads(block), g1)


def test_target_context_and_explicit_target_agree(tiny):
    block, u, y = tiny
    g1, _ = rule_grads(block, u, y, "cl", T2=50)
    block.zero_grad()
    with eqprop.targets(block, y):
        out = block(u)
    sq_mean(out, y).backward()  # the backward may run after the context
    assert torch.equal(flat_grads(block), g1)


@pytest.mark.parametrize("variant,rule", [("positive", "pep"), ("negative", "nep"), ("centered", "cep")])
def test_ep_rules_without_target_are_the_core_ep(variant, rule):
    """Without a target (e.g. a block followed by a readout) PEP/NEP/CEP nudge with
    autograd's error current, as the core's EP does."""
    assert make_estimator(rule, beta=0.3, T2=15) == EP(beta=0.3, variant=variant, T2=15)
    torch.manual_seed(1)
    model = FFEBM(DenseHopfield([4, 6, 5], activation="sigmoid", T1=40), nn.Linear(5, 3))
    u, t = torch.randn(7, 4), torch.randint(0, 3, (7,))
    grads = []
    for est in (EP(beta=0.3, variant=variant, T2=15), make_estimator(rule, beta=0.3, T2=15)):
        model.set_estimator(est)
        model.zero_grad()
        F.cross_entropy(model(u), t).backward()
        grads.append(flat_grads(model))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_ep_with_a_target_nudges_with_the_cost(tiny):
    """With a target, EP nudges with the cost's gradient beta (s_L - y) re-evaluated at every
    step; without one, with the (fixed) normalised error current. Both estimate the same
    gradient for a small beta, but differ at a large one."""
    block, u, y = tiny
    block.estimator = EP(beta=0.5, T2=200)
    grads = []
    for target in (y, None):
        block.zero_grad()
        sq_mean(block(u, target=target), y).backward()
        grads.append(flat_grads(block))
    assert cosine(*grads) > 0.9 and not torch.allclose(*grads, rtol=1e-3)
    g_cost, _ = rule_grads(block, u, y, "ep", beta=1e-4, **TIGHT)  # target given: the cost nudges
    block.zero_grad()
    sq_mean(block(u), y).backward()  # the same estimator without a target: the error current nudges
    assert torch.allclose(flat_grads(block), g_cost, rtol=1e-5)


def test_rbp_is_implicit_differentiation(tiny):
    assert make_estimator("rbp", max_iter=300, tol=1e-12) == ID(max_iter=300, tol=1e-12)
    block, u, y = tiny
    g_rbp, _ = rule_grads(block, u, y, "rbp", max_iter=300, tol=1e-12)
    block.estimator = ID(max_iter=300, tol=1e-12)
    block.zero_grad()
    sq_mean(block(u), y).backward()
    assert g_rbp.abs().max() > 0
    assert torch.equal(g_rbp, flat_grads(block))


def test_tbp_backpropagates_through_the_last_k_free_iterations():
    torch.manual_seed(2)
    block = DenseHopfield([4, 6, 3], activation="sigmoid", alpha=1.5, T1=12, update="async").to(DT)
    u, y = torch.randn(3, 4, dtype=DT), torch.rand(3, 3, dtype=DT)
    block.estimator = make_estimator("tbp", K=4)
    block.zero_grad()
    out = block(u)
    sq_mean(out, y).backward()
    g = flat_grads(block)
    # reference: 8 steps without autograd, then 4 with it
    s = block.init_state(u)
    with torch.no_grad():
        for _ in range(8):
            s = block.step(s, u)
    for _ in range(4):
        s = block.step(s, u)
    assert torch.equal(out, s[-1]) and torch.equal(out, block.relax(u)[0][-1])
    ref = torch.autograd.grad(sq_mean(s[-1], y), list(block.parameters()))
    assert torch.allclose(g, torch.cat([r.flatten() for r in ref]), atol=1e-12)
    # a longer truncation is a different (longer) backprop
    block.estimator = TBP(K=8)
    block.zero_grad()
    sq_mean(block(u), y).backward()
    assert not torch.allclose(flat_grads(block), g, atol=1e-6)


ALL = ("cl", "pep", "nep", "cep", "pcpl", "ncpl", "ccpl", "tbp", "rbp")


@pytest.fixture(scope="module")
def chain():
    """A 2-block ff-EBM whose last block holds the output layer, one batch, and finite
    differences of the squared-error loss over all its parameters."""
    torch.manual_seed(3)
    model = FFEBM(nn.Linear(5, 4), DenseHopfield([4, 3], activation="sigmoid", T1=30, name="b1"),
                  nn.Linear(3, 4), DenseHopfield([4, 4, 3], activation="sigmoid", T1=30, name="b2")).to(DT)
    x = torch.randn(6, 5, dtype=DT, generator=torch.Generator().manual_seed(4))
    y = F.one_hot(torch.arange(6) % 3, 3).to(DT)
    ref = flatten(finite_differences(lambda: sq_mean(model(x), y), list(model.parameters()), 1e-6))
    return model, x, y, ref


@pytest.mark.parametrize("rule", ALL)
def test_rule_switch_per_block_in_a_two_block_ffebm(chain, rule):
    """The last block (holding the output layer) uses `rule`, the first EP; gradients reach
    the first block and its feedforward map; with the EP rules the whole chain follows
    finite differences of the loss."""
    model, x, y, g_true = chain
    model.set_estimator("ep", blocks=[0], beta=0.01, T2=30)
    settings = {"tbp": dict(K=30), "rbp": {}}.get(rule, dict(T2=30))
    if rule in ("pep", "nep", "cep"):
        settings["beta"] = 0.01
    if rule in ("pcpl", "ncpl", "ccpl"):
        settings["eta"] = 0.01
    model.set_estimator(rule, blocks=[1], **settings)
    assert model.blocks[1].estimator == make_estimator(rule, **settings)
    assert model.blocks[0].estimator == EP(beta=0.01, T2=30)
    model.zero_grad(set_to_none=True)
    with eqprop.targets(model, y):
        sq_mean(model(x), y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model[0].weight.grad.abs().sum() > 0 and model.blocks[0].couplings[0].linear.weight.grad.abs().sum() > 0
    if rule not in ("cl", "pcpl", "ncpl", "ccpl"):
        assert cosine(flat_grads(model), g_true) > 0.999
    else:  # the output-metric rules still point downhill
        assert cosine(flat_grads(model), g_true) > 0.5


@pytest.mark.parametrize("rule,cls,fixed", [
    ("ep", EP, {}), ("pep", EP, {"variant": "positive"}), ("nep", EP, {"variant": "negative"}),
    ("cep", EP, {"variant": "centered"}), ("id", ID, {}), ("rbp", ID, {}), ("cl", CL, {}), ("cpl", CpL, {}),
    ("pcpl", CpL, {"variant": "positive"}), ("ncpl", CpL, {"variant": "negative"}),
    ("ccpl", CpL, {"variant": "centered"}), ("tbp", TBP, {}),
])
def test_make_estimator_knows_every_rule(rule, cls, fixed):
    est = make_estimator(rule)
    assert isinstance(est, Estimator) and type(est) is cls and est == cls(**fixed)
    assert rule in eqprop.estimator_names()


@pytest.mark.parametrize("eta", [0, 0.0, 1, 1.0, -0.2, 1.5, float("nan"), True])
def test_eta_outside_the_open_unit_interval_raises(eta):
    with pytest.raises(ValueError, match="eta must be a finite number > 0 and < 1"):
        make_estimator("ccpl", eta=eta)


def test_invalid_settings_raise():
    with pytest.raises(ValueError, match="unknown estimator 'coupled'"):
        make_estimator("coupled")
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        make_estimator("nep", beta=0)
    with pytest.raises(ValueError, match="precision must be one of"):
        make_estimator("cep", precision="half")
    with pytest.raises(ValueError, match="has no setting"):
        make_estimator("cl", beta=0.1)
    with pytest.raises(ValueError, match="refine must be a non-negative integer"):
        make_estimator("pcpl", refine=-1)
    with pytest.raises(ValueError, match="K must be a positive integer"):
        make_estimator("tbp", K=0)


def test_bad_targets_raise(tiny):
    block, u, y = tiny
    block.estimator = make_estimator("cl", T2=5)
    with pytest.raises(ValueError, match="does not match the output layer"):
        with eqprop.targets(block, y[:, :2]):
            sq_mean(block(u), y).backward()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        with eqprop.targets(block, torch.tensor([0, 1, 3])):
            sq_mean(block(u), y).backward()
    with pytest.raises(ValueError, match=r"2 labels for a batch of 3"):
        sq_mean(block(u, target=torch.tensor([0, 1])), y).backward()
    with pytest.raises(ValueError, match="no target given"):
        sq_mean(block(u), y).backward()
    with pytest.raises(ValueError, match="not proportional to s_L - y"):
        with eqprop.targets(block, y):
            F.cross_entropy(block(u), y.argmax(1)).backward()
    with pytest.raises(ValueError, match="integer labels must have shape"):
        with eqprop.targets(block, torch.zeros(5, 3, dtype=torch.long)):
            pass
    readout = FFEBM(block, nn.Linear(3, 3))
    with pytest.raises(ValueError, match="not an energy-based block"):
        with eqprop.targets(readout, y):
            pass
    assert eqprop.current_target(block) is None  # the context managers cleaned up
