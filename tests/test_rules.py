"""The learning rules of eqprop.rules against finite differences and their own definitions."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eqprop.rules as R
from eqprop import EP, ID, DenseHopfield, FFEBM, make_estimator

DT = torch.float64
TIGHT = dict(T2=3000, tol=1e-14)


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), 0).item()


def flat_grads(module: nn.Module) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in module.parameters()])


def sq_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((out - y) ** 2).sum(1).mean()


@pytest.fixture(scope="module")
def tiny():
    """A tiny dense block with smooth (logistic) neurons, relaxed tightly in float64."""
    torch.manual_seed(0)
    block = DenseHopfield([4, 5, 3], activation="sigmoid", alpha=1.5, T1=3000, tol=1e-14, update="sync").to(DT)
    u = torch.randn(3, 4, dtype=DT)
    y = F.one_hot(torch.tensor([0, 2, 1]), 3).to(DT)
    return block, u, y


def rule_grads(block, u, y, rule, loss=sq_loss, **settings):
    block.estimator = make_estimator(rule, **settings)
    block.zero_grad(set_to_none=True)
    uu = u.clone().requires_grad_(True)
    with R.targets(block, y):
        loss(block(uu), y).backward()
    return flat_grads(block), uu.grad


@torch.no_grad()
def fd_grads(block, u, loss_of, eps=1e-6):
    """Central finite differences of loss_of(s*_L) over every parameter entry and u."""
    out = []
    for p in [*block.parameters(), u]:
        g = torch.zeros_like(p)
        flat = p.view(-1)
        for i in range(flat.numel()):
            old = flat[i].item()
            flat[i] = old + eps
            lp = loss_of(block.relax(u)[0][-1])
            flat[i] = old - eps
            lm = loss_of(block.relax(u)[0][-1])
            flat[i] = old
            g.view(-1)[i] = (lp - lm) / (2 * eps)
        out.append(g.flatten())
    return torch.cat(out[:-1]), out[-1].view_as(u)


@pytest.fixture(scope="module")
def true_grads(tiny):
    block, u, y = tiny
    return fd_grads(block, u.clone(), lambda o: sq_loss(o, y))


@pytest.mark.parametrize("rule,settings", [("pep", dict(beta=1e-4)), ("nep", dict(beta=1e-4)),
                                           ("cep", dict(beta=1e-3)), ("rbp", dict(max_iter=3000, tol=1e-14)),
                                           ("tbp", dict(K=3000))])
def test_ep_and_backprop_rules_follow_the_loss_gradient(tiny, true_grads, rule, settings):
    block, u, y = tiny
    if rule in ("pep", "nep", "cep"):
        settings = {**settings, **TIGHT}
    g, gu = rule_grads(block, u, y, rule, **settings)
    g_true, gu_true = true_grads
    assert cos(g, g_true) > 0.999
    assert cos(gu, gu_true) > 0.999
    assert torch.allclose(g.norm(), g_true.norm(), rtol=1e-3)


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
    return fd_grads(block, u.clone(), lambda o: (c * o).sum())


@pytest.mark.parametrize("rule,eta", [("pcpl", 1e-4), ("ncpl", 1e-4), ("ccpl", 1e-3)])
def test_cpl_rules_follow_the_gradient_of_their_output_metric(tiny, cpl_limit, true_grads, rule, eta):
    """As eta -> 0, coupled learning moves the output by -eta (s*_L - y) where EP moves it by
    -beta S^-1 (s*_L - y): it is the loss gradient taken with the error current S (s*_L - y),
    S the Schur complement of the energy's Hessian on the output layer. Checked against
    finite differences of the loss <stop_grad(S (s*_L - y)), s*_L> / B. It is not the loss
    gradient itself (S is not a multiple of the identity), which it only approximates."""
    block, u, y = tiny
    g, gu = rule_grads(block, u, y, rule, eta=eta, **TIGHT)
    g_ref, gu_ref = cpl_limit
    assert 0.9 < cos(g, true_grads[0]) < 0.9999
    assert cos(g, g_ref) > 0.9999
    assert cos(gu, gu_ref) > 0.9999
    assert torch.allclose(g.norm(), g_ref.norm(), rtol=1e-3)


def test_cl_is_the_difference_of_clamped_and_free_energy_gradients(tiny):
    block, u, y = tiny
    g, gu = rule_grads(block, u, y, "cl", **TIGHT)
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
    assert torch.allclose(g_sum, g_mean * u.shape[0], rtol=1e-9, atol=1e-12)


def test_labels_work_like_one_hot_targets(tiny):
    block, u, y = tiny
    g1, _ = rule_grads(block, u, y, "ccpl", eta=0.3, T2=50)
    block.estimator = make_estimator("ccpl", eta=0.3, T2=50)
    block.zero_grad()
    with R.targets(block, y.argmax(1)):
        sq_loss(block(u), y).backward()
    assert torch.allclose(flat_grads(block), g1)


@pytest.mark.parametrize("variant,rule", [("positive", "pep"), ("negative", "nep"), ("centered", "cep")])
def test_ep_rules_without_target_are_the_core_ep(variant, rule):
    """Without a registered target (e.g. a block followed by a readout) PEP/NEP/CEP nudge with
    autograd's error current, as the core's EP does."""
    torch.manual_seed(1)
    model = FFEBM(DenseHopfield([4, 6, 5], activation="sigmoid", T1=40), nn.Linear(5, 3))
    u, t = torch.randn(7, 4), torch.randint(0, 3, (7,))
    grads = []
    for est in (EP(beta=0.3, variant=variant, T2=15), make_estimator(rule, beta=0.3, T2=15)):
        model.set_estimator(est)
        model.zero_grad()
        F.cross_entropy(model(u), t).backward()
        grads.append(flat_grads(model))
    assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_rbp_is_implicit_differentiation(tiny):
    block, u, y = tiny
    g_rbp, _ = rule_grads(block, u, y, "rbp", max_iter=300, tol=1e-12)
    block.estimator = ID(max_iter=300, tol=1e-12)
    block.zero_grad()
    sq_loss(block(u), y).backward()
    assert torch.equal(g_rbp, flat_grads(block))


def test_tbp_backpropagates_through_the_last_k_free_iterations():
    torch.manual_seed(2)
    block = DenseHopfield([4, 6, 3], activation="sigmoid", alpha=1.5, T1=12, update="async").to(DT)
    u, y = torch.randn(3, 4, dtype=DT), torch.rand(3, 3, dtype=DT)
    block.estimator = make_estimator("tbp", K=4)
    block.zero_grad()
    out = block(u)
    sq_loss(out, y).backward()
    g = flat_grads(block)
    # reference: 8 steps without autograd, then 4 with it
    s = block.init_state(u)
    with torch.no_grad():
        for _ in range(8):
            s = block.step(s, u)
    for _ in range(4):
        s = block.step(s, u)
    assert torch.equal(out, s[-1]) and torch.equal(out, block.free_state[-1])
    ref = torch.autograd.grad(sq_loss(s[-1], y), list(block.parameters()))
    assert torch.allclose(g, torch.cat([r.flatten() for r in ref]), atol=1e-12)


ALL = ("cl", "pep", "nep", "cep", "pcpl", "ncpl", "ccpl", "tbp", "rbp")


def two_block_model() -> FFEBM:
    torch.manual_seed(3)
    return FFEBM(nn.Linear(5, 4), DenseHopfield([4, 3], activation="sigmoid", T1=30, name="b1"),
                 nn.Linear(3, 4), DenseHopfield([4, 4, 3], activation="sigmoid", T1=30, name="b2")).to(DT)


@pytest.fixture(scope="module")
def chain():
    """A 2-block ff-EBM whose last block holds the output layer, one batch, and finite
    differences of the squared-error loss over all its parameters."""
    model = two_block_model()
    x = torch.randn(6, 5, dtype=DT, generator=torch.Generator().manual_seed(4))
    y = F.one_hot(torch.arange(6) % 3, 3).to(DT)
    ref = []
    with torch.no_grad():
        for p in model.parameters():
            flat = p.view(-1)
            for i in range(flat.numel()):
                old = flat[i].item()
                flat[i] = old + 1e-6
                lp = sq_loss(model(x), y)
                flat[i] = old - 1e-6
                lm = sq_loss(model(x), y)
                flat[i] = old
                ref.append((lp - lm) / 2e-6)
    return model, x, y, torch.stack(ref)


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
    assert type(model.blocks[1].estimator).__name__.lower() == rule and isinstance(model.blocks[0].estimator, EP)
    model.zero_grad(set_to_none=True)
    with R.targets(model, y):
        sq_loss(model(x), y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model[0].weight.grad.abs().sum() > 0 and model.blocks[0].couplings[0].linear.weight.grad.abs().sum() > 0
    if rule not in ("cl", "pcpl", "ncpl", "ccpl"):
        assert cos(flat_grads(model), g_true) > 0.999


def test_make_estimator_knows_every_rule():
    for rule in ALL:
        assert make_estimator(rule).name == rule


@pytest.mark.parametrize("eta", [0, 0.0, 1, 1.0, -0.2, 1.5, float("nan"), True])
def test_eta_outside_the_open_unit_interval_raises(eta):
    with pytest.raises(ValueError, match="eta must lie in"):
        make_estimator("ccpl", eta=eta)


def test_invalid_settings_raise():
    with pytest.raises(ValueError, match="unknown estimator 'cpl'"):
        make_estimator("cpl")
    with pytest.raises(ValueError, match="beta must be a positive"):
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
        with R.targets(block, y[:, :2]):
            sq_loss(block(u), y).backward()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        with R.targets(block, torch.tensor([0, 1, 3])):
            sq_loss(block(u), y).backward()
    with pytest.raises(ValueError, match="no target registered"):
        sq_loss(block(u), y).backward()
    with pytest.raises(ValueError, match="not proportional to s_L - y"):
        with R.targets(block, y):
            F.cross_entropy(block(u), y.argmax(1)).backward()
    with pytest.raises(ValueError, match="integer labels must have shape"):
        R.set_target(block, torch.zeros(5, 3, dtype=torch.long))
    readout = FFEBM(block, nn.Linear(3, 3))
    with pytest.raises(ValueError, match="not an energy-based block"):
        R.set_target(readout, y)
    assert R.get_target(block) is None  # the context managers cleaned up
