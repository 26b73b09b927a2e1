"""Continual EP (eqprop.continual): the summed updates telescope to EP's as eta -> 0, the
per-step updates follow truncated backprop's per-step gradients (the theorem's property),
SGD with lr = eta applies the continual algorithm exactly (checked against a loop written
here by hand), and it runs inside an ff-EBM on dense and convolutional blocks."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import eqprop
from eqprop import EP, TBP, ContinualEP, ConvHopfield, DenseHopfield
from eqprop.testing import check_estimator, cosine, gradients, rel_error

DT = torch.float64


def dense_block(update: str = "sync", widths=(3, 5, 4, 2)) -> DenseHopfield:
    torch.manual_seed(0)
    return DenseHopfield(list(widths), activation="sigmoid", alpha=1.5, T1=3000, tol=1e-13, update=update).to(DT)


def data(n_in: int, n_out: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, n_in, generator=g, dtype=DT), torch.rand(2, n_out, generator=g, dtype=DT)


@pytest.mark.parametrize("variant", ["positive", "centered", "negative"])
def test_summed_updates_tend_to_ep_as_eta_vanishes(variant):
    block = dense_block("async")
    u, _ = data(3, 2)
    errors = []
    for eta in (1e-5, 1e-7):
        rule = ContinualEP(beta=0.05, eta=eta, T2=30, variant=variant)
        report = check_estimator(block, rule, u, reference=EP(beta=0.05, T2=30, variant=variant))
        errors.append(report.rel_error)
    assert errors[1] < 1e-4  # one-sided: the weights' drift moves the states by O(eta / beta)
    assert errors[1] < errors[0] / 50  # first order in eta


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 1000), hidden=st.integers(2, 5), beta=st.floats(0.01, 0.5))
def test_telescoping_for_any_block_and_beta(seed, hidden, beta):
    torch.manual_seed(seed)
    block = DenseHopfield([3, hidden, 2], activation="sigmoid", T1=200, tol=1e-12).to(DT)
    u, _ = data(3, 2, seed)
    report = check_estimator(block, ContinualEP(beta=beta, eta=1e-9, T2=10, variant="centered"), u,
                             reference=EP(beta=beta, T2=10, variant="centered"))
    assert report.rel_error < 1e-6


@pytest.mark.parametrize("variant", ["centered", "positive"])
def test_each_step_follows_truncated_backprop(variant):
    """The normalised update of nudged step t against the gradient that truncated backprop
    assigns to the t-th last step of the free phase (TBP with K = t minus K = t - 1)."""
    block = dense_block("sync")
    u, y = data(3, 2)
    s, stats = block.relax(u)
    assert stats.converged
    rule = ContinualEP(beta=1e-5, eta=1e-10, T2=10, variant=variant)
    updates = []
    rule.run(block, u, s, s[-1] - y, callback=lambda t, update: updates.append([d / rule.eta for d in update]))
    assert len(updates) == rule.T2
    params = list(block.parameters())
    block.configure(T1=stats.iters, tol=None)
    previous = [torch.zeros_like(p) for p in params]
    for t in range(1, rule.T2 + 1):
        block.estimator = TBP(K=t)
        g = gradients(lambda: 0.5 * ((block(u) - y) ** 2).sum(), params)
        step_t = [a - b for a, b in zip(g, previous)]
        previous = g
        assert cosine(updates[t - 1], [-x for x in step_t]) >= 0.99, t
        assert rel_error(updates[t - 1], [-x for x in step_t]) < 0.05, t


def test_summed_updates_match_truncated_backprop_over_the_last_steps():
    """C-EP with T2 = K against TBP with K: parameters and the input error current."""
    block = dense_block("sync")
    u, _ = data(3, 2)
    iters = block.relax(u)[1].iters
    block.configure(T1=iters, tol=None)
    for k in (1, 4, 9):
        report = check_estimator(block, ContinualEP(beta=1e-5, eta=1e-10, T2=k, variant="centered"), u,
                                 reference=TBP(K=k))
        assert report.cosine > 0.9999, (k, report.per_tensor)
        assert report.per_tensor["input"]["cos"] > 0.9999, k


def hand_written_cep(block: DenseHopfield, u, y, beta, eta, T2):
    """C-EP on a dense block with sync updates and the cost nudge, written out: the layer
    updates and the Hebbian differences of each step, with the weights of that step."""
    W = [c.linear.weight.detach().clone() for c in block.couplings]
    b = [c.linear.bias.detach().clone() for c in block.couplings]
    s, _ = block.relax(u)
    s = [x.clone() for x in s]
    L = len(s)
    w = 1.0 / u.shape[0]  # mean over the batch
    for _ in range(T2):
        new = []
        for l in range(L):
            z = u if l == 0 else s[l - 1] @ W[l - 1].t() + b[l - 1]
            if l < L - 1:
                z = z + s[l + 1] @ W[l]
            if l == L - 1:
                z = z - beta * (s[l] - y)
            new.append(block.activations[l](z))
        for l in range(L - 1):
            W[l] = W[l] + eta / beta * w * (new[l + 1].t() @ new[l] - s[l + 1].t() @ s[l])
            b[l] = b[l] + eta / beta * w * (new[l + 1].sum(0) - s[l + 1].sum(0))
        s = new
    return W, b


def test_sgd_with_lr_eta_applies_continual_ep_exactly():
    block = dense_block("sync")
    u, y = data(3, 2)
    beta, eta, T2 = 0.3, 0.5, 8
    W, b = hand_written_cep(block, u, y, beta, eta, T2)
    block.estimator = ContinualEP(beta=beta, eta=eta, T2=T2)
    out = block(u, target=y)
    (0.5 * ((out - y) ** 2).sum(1).mean()).backward()
    with torch.no_grad():  # the step of torch.optim.SGD(lr=eta) (its first use imports torch._dynamo: slow)
        for p in block.parameters():
            p -= eta * p.grad
    for c, w_ref, b_ref in zip(block.couplings, W, b):
        torch.testing.assert_close(c.linear.weight, w_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(c.linear.bias, b_ref, rtol=1e-10, atol=1e-12)
    assert set(block.last_relax) == {"free", "nudged+"}
    # the dynamics saw the moving weights: the change is not EP's update at this eta
    fresh = dense_block("sync")
    W_fixed, _ = hand_written_cep(fresh, u, y, beta, 1e-12, T2)
    change = [w_ref - c.linear.weight for c, w_ref in zip(fresh.couplings, W)]
    fixed = [(wf - c.linear.weight) * (eta / 1e-12) for c, wf in zip(fresh.couplings, W_fixed)]
    assert rel_error(change, fixed) > 1e-3


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_inside_an_ffebm_upstream_learns_by_backprop(kind):
    """The error current to the upstream layer: as eta -> 0 the same as EP's, so the
    feedforward parts get EP's gradients; conv with max-pooling too."""
    torch.manual_seed(3)
    if kind == "dense":
        block = DenseHopfield([4, 5, 3], activation="sigmoid", T1=200, tol=1e-12)
        model = eqprop.FFEBM(nn.Linear(6, 4), block, nn.Linear(3, 2)).to(DT)
        x = torch.randn(3, 6, dtype=DT)
    else:
        block = ConvHopfield([2, 3], pools="m", activation="sigmoid", init="kaiming", T1=200, tol=1e-12)
        model = eqprop.FFEBM(nn.Conv2d(1, 2, 3, padding=1), block, nn.Flatten(), nn.Linear(12, 2)).to(DT)
        x = torch.randn(3, 1, 4, 4, dtype=DT)
    y = torch.tensor([0, 1, 1])
    params = list(model.parameters())

    def loss():
        return nn.functional.cross_entropy(model(x), y)

    model.set_estimator("continual", beta=0.1, eta=1e-9, T2=20, variant="centered")
    got = gradients(loss, params)
    assert set(model.relax_stats()[0]) == {"free", "nudged+", "nudged-"}
    model.set_estimator("ep", beta=0.1, T2=20, variant="centered")
    ref = gradients(loss, params)
    upstream = 2  # weight and bias of the first (feedforward) module
    assert rel_error(got[:upstream], ref[:upstream]) < 1e-6
    assert rel_error(got, ref) < 1e-6
    assert torch.linalg.vector_norm(got[0]) > 0


@pytest.mark.parametrize("setting, value, message", [
    ("eta", 0.0, "continual: eta must be a finite number > 0, got 0.0"),
    ("eta", -1e-3, "continual: eta must be"),
    ("eta", float("nan"), "continual: eta must be"),
    ("beta", 0.0, "continual: beta must be"),
    ("T2", 0, "continual: T2 must be a positive integer, got 0"),
    ("T2", 2.5, "continual: T2 must be a positive integer"),
    ("variant", "both", "continual: variant must be one of"),
    ("normalize", "l2", "continual: normalize must be one of"),
])
def test_invalid_settings_raise_naming_them(setting, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ContinualEP(**{setting: value})
    with pytest.raises(ValueError, match="continual: " + setting):
        eqprop.make_estimator("continual", **{setting: value})


def test_unsupported_uses_raise():
    block = DenseHopfield([3, 2], T1=5)
    with pytest.raises(ValueError, match="estimator 'continual' does not apply to a Hamiltonian unit"):
        ContinualEP().check_applicable("sequence", "hru")
    block.estimator = ContinualEP()
    block.configure(relax_dtype=torch.bfloat16)
    u = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"continual \(DenseHopfield\): relax_dtype=torch.bfloat16 is not supported"):
        block(u)


def test_divergence_is_reported():
    block = DenseHopfield([3, 4, 2], activation="identity", T1=5)
    block.estimator = ContinualEP(beta=1.0, eta=1e300, T2=5)
    out = block(torch.ones(2, 3))
    with pytest.raises(eqprop.DivergenceError, match="continual nudged phase"):
        (out ** 2).sum().backward()
