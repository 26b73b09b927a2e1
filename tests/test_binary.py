"""Binary weights and step neurons in energy-based blocks: the relaxation sees exactly +-scale,
EP's gradient for the binary weight reaches the latent weight unchanged, a tiny problem
learns, and invalid settings raise."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import eqprop
from eqprop.binary import (
    BinaryWeight,
    SignActivation,
    Step,
    binarize_activations,
    binarize_model,
    binarize_weight,
    binarize_weights,
    binary_mlp,
    is_binary,
    latent_weights,
)
from eqprop.training.config import ConfigError, load_config
from eqprop.training.models import build_model

DT = torch.float64


def dense_block(**kw) -> eqprop.DenseHopfield:
    return eqprop.DenseHopfield([6, 5, 4], T1=60, update="async", estimator=eqprop.EP(beta=0.1, T2=60), **kw).to(DT)


def conv_block() -> eqprop.ConvHopfield:
    return eqprop.ConvHopfield([2, 3, 3], pools="m-", fc=[4], in_size=4, init="kaiming", T1=30,
                               estimator=eqprop.EP(beta=0.1, T2=30)).to(DT)


@pytest.mark.parametrize("make", [dense_block, conv_block])
@pytest.mark.parametrize("scale", ["init", "mean", "learned", 0.3])
def test_relaxation_sees_exactly_plus_minus_scale(make, scale):
    torch.manual_seed(0)
    block = make()
    latent_before = [c.core().weight.detach().clone() for c in block.couplings]
    binarize_weights(block, scale)
    for c, w_h in zip(block.couplings, latent_before):
        a = float(scale) if not isinstance(scale, str) else float(w_h.abs().mean())
        w = c.weight.detach()
        assert torch.equal(w.abs(), torch.full_like(w, a)), "every weight is +-scale"
        assert torch.equal(torch.sign(w), torch.where(w_h >= 0, 1.0, -1.0).to(DT))
        assert torch.equal(c.core().parametrizations["weight"].original, w_h)
    # the relaxation of the binary block is the relaxation of a real block holding W_b
    ref = make()
    with torch.no_grad():
        for c, r in zip(block.couplings, ref.couplings):
            r.core().weight.copy_(c.weight)
            r.core().bias.copy_(c.bias)
    u = torch.randn(3, *({"DenseHopfield": (6,), "ConvHopfield": (2, 4, 4)}[type(block).__name__]), dtype=DT)
    s_bin, _ = block.relax(u)
    s_ref, _ = ref.relax(u)
    for a_, b_ in zip(s_bin, s_ref):
        assert torch.equal(a_, b_)
    # moving latent weights without flipping a sign leaves the relaxation (fixed scale) unchanged
    if scale in ("init", 0.3):
        with torch.no_grad():
            for c in block.couplings:
                c.core().parametrizations["weight"].original.mul_(1.7)
        for a_, b_ in zip(block.relax(u)[0], s_ref):
            assert torch.equal(a_, b_)


@pytest.mark.parametrize("make", [dense_block, conv_block])
def test_ep_gradient_reaches_the_latent_weights(make):
    """The latent weight's gradient is EP's gradient for the binary weight (straight-through):
    equal to EP's gradient of a real block holding the same weights."""
    torch.manual_seed(1)
    block = binarize_weights(make(), "init")
    ref = make()
    with torch.no_grad():
        for c, r in zip(block.couplings, ref.couplings):
            r.core().weight.copy_(c.weight)
            r.core().bias.copy_(c.bias)
    shape = (6,) if isinstance(block, eqprop.DenseHopfield) else (2, 4, 4)
    u = torch.randn(3, *shape, dtype=DT)
    g_out = torch.randn_like(block(u))
    block(u).backward(g_out)
    ref(u).backward(g_out)
    for c, r in zip(block.couplings, ref.couplings):
        latent = c.core().parametrizations["weight"].original
        assert latent.grad is not None and latent.grad.abs().sum() > 0
        torch.testing.assert_close(latent.grad, r.core().weight.grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(c.core().bias.grad, r.core().bias.grad, rtol=1e-12, atol=1e-14)


def test_learned_scale_gets_its_gradient():
    torch.manual_seed(2)
    block = binarize_weights(dense_block(), "learned")
    u = torch.randn(3, 6, dtype=DT)
    g_out = torch.randn(3, 4, dtype=DT)
    block(u).backward(g_out)
    for c in block.couplings:
        lin = c.core()
        param = lin.parametrizations["weight"][0].scale
        sign = torch.sign(lin.parametrizations["weight"].original.detach())
        # dl/da = sum(dl/dW_b * sign(W_h)), and dl/dW_h = dl/dW_b
        expected = (lin.parametrizations["weight"].original.grad * sign).sum()
        torch.testing.assert_close(param.grad, expected, rtol=1e-12, atol=1e-14)


def test_ffebm_with_binary_weights_learns_a_tiny_problem():
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    y = (x[:, 0] - x[:, 1] > 0).long()
    model = eqprop.dense_ffebm(6, [[16, 8]], num_classes=2, T1=15, estimator_settings={"T2": 8, "beta": 0.5})
    binarize_weights(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.85
        w = model.blocks[0].couplings[0].weight
        assert w.unique().numel() == 2


def test_binary_activations_are_step_neurons_and_a_tiny_problem_learns():
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    y = (x[:, 0] - x[:, 1] > 0).long()
    model = eqprop.dense_ffebm(6, [[32, 16]], num_classes=2, T1=10, estimator_settings={"T2": 10, "beta": 1.0})
    binarize_weights(model)
    binarize_activations(model)
    block = model.blocks[0]
    assert all(isinstance(a, Step) for a in block.activations)
    s, _ = block.relax(torch.randn(5, 32))
    assert all(set(t.unique().tolist()) <= {0.0, 1.0} for t in s)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    acc0 = None
    for _ in range(60):
        opt.zero_grad()
        out = model(x)
        if acc0 is None:
            acc0 = (out.argmax(1) == y).float().mean()
        nn.functional.cross_entropy(out, y).backward()
        opt.step()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean()
    assert acc > 0.8 and acc > acc0 + 0.1


def test_step_surrogate_derivative_under_autograd():
    z = torch.tensor([-1.0, -0.2, 0.3, 0.6, 2.0], requires_grad=True)
    out = Step(0.0)(z)
    assert out.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    out.sum().backward()
    assert z.grad.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    assert Step().potential(torch.ones(3, 4)).tolist() == [0.0, 0.0, 0.0]


def test_sign_activation_is_straight_through():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    out = SignActivation()(x)
    assert out.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_binary_mlp():
    net = binary_mlp([12, 8, 3])
    assert len(latent_weights(net)) == 2 and all(set(m.weight.unique().tolist()) == {-1.0, 1.0}
                                                  for m in net if is_binary(m))
    real = binary_mlp([12, 8, 3], binary=False)
    assert not latent_weights(real)
    assert net(torch.randn(4, 12)).shape == (4, 3)


@pytest.mark.parametrize("scale", [0, -1.0, float("inf"), float("nan"), "median", True, None])
def test_invalid_scale_raises(scale):
    with pytest.raises(ValueError, match="scale must be"):
        binarize_weights(dense_block(), scale)
    with pytest.raises(ValueError, match="scale must be"):
        BinaryWeight(torch.ones(2, 2), scale)


def test_invalid_settings_raise():
    block = binarize_weights(dense_block())
    with pytest.raises(ValueError, match="already binary"):
        binarize_weights(block)
    with pytest.raises(ValueError, match="already binary"):
        binarize_weight(block.couplings[0].core())
    with pytest.raises(ValueError, match="no energy-based block"):
        binarize_weights(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="no energy-based block"):
        binarize_activations(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="layers 0..2, got layer 3"):
        binarize_activations(dense_block(), layers=[3])
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        binarize_activations(dense_block(), threshold=float("nan"))
    with pytest.raises(ValueError, match="no weight tensor"):
        binarize_weight(nn.ReLU())
    with pytest.raises(ValueError, match="init_width"):
        binary_mlp([3, 2], init_width=0)
    with pytest.raises(ValueError, match="widths"):
        binary_mlp([3])


@pytest.mark.parametrize("spec, match", [({"weights": "yes"}, "weights must be true or false"),
                                         ({}, "neither weights nor activations"),
                                         ({"weights": True, "colour": 1}, "unknown key"),
                                         ({"activations": True, "scale": 1.0}, "scale applies"),
                                         ({"weights": True, "threshold": 0.5}, "threshold applies"),
                                         ([1], "expected a mapping")])
def test_binarize_model_spec_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        binarize_model(dense_block(), spec)


def test_config_builds_a_binary_model():
    cfg = load_config("fmnist_binary_weights", ["limit_train=16"])
    model = build_model(cfg, {"num_classes": 10, "kind": "image", "shape": (1, 28, 28)})
    assert all(is_binary(c.core()) for b in model.blocks for c in b.couplings)
    cfg = load_config("fmnist_binary_full", ["limit_train=16"])
    model = build_model(cfg, {"num_classes": 10, "kind": "image", "shape": (1, 28, 28)})
    assert all(isinstance(a, Step) for b in model.blocks for a in b.activations)
    cfg = load_config("fmnist_binary_weights", ["model.binary.scale=-1"])
    with pytest.raises(ConfigError, match="model.binary"):
        build_model(cfg, {"num_classes": 10, "kind": "image", "shape": (1, 28, 28)})
    # the demo's conv architecture: binary weights in both energy-based blocks, the twin real
    info = {"num_classes": 10, "kind": "image", "shape": (1, 28, 28)}
    conv = build_model(load_config("fmnist_binary_conv_weights"), info)
    twin = build_model(load_config("fmnist_binary_conv_fp"), info)
    assert len(conv.blocks) == 2 and all(is_binary(c.core()) for b in conv.blocks for c in b.couplings)
    assert not any(is_binary(m) for m in twin.modules())
    # the same weights, each binary coupling holding a latent weight and one learned scale
    assert [c.core().parametrizations["weight"].original.shape for b in conv.blocks for c in b.couplings] == \
        [c.core().weight.shape for b in twin.blocks for c in b.couplings]
    n_couplings = sum(len(b.couplings) for b in conv.blocks)
    assert sum(p.numel() for p in conv.parameters()) == sum(p.numel() for p in twin.parameters()) + n_couplings


@pytest.mark.parametrize("scale", ["init", "mean", "learned"])
def test_the_weight_read_without_grad_follows_every_change_of_the_latent_weight(scale):
    block = binarize_weights(dense_block(), scale)
    lin = block.couplings[0].core()
    latent = lin.parametrizations["weight"].original
    with torch.no_grad():
        first = lin.weight
        assert lin.weight is first  # reused while nothing changed
        latent.neg_()  # an optimizer's in-place step: every sign flips
        flipped = lin.weight
        assert torch.equal(torch.sign(flipped), -torch.sign(first))
        if scale == "learned":
            lin.parametrizations["weight"][0].scale.mul_(2.0)
            torch.testing.assert_close(lin.weight, 2.0 * flipped)
        latest = lin.weight
    w = lin.weight  # with grad: computed afresh, the same values
    assert w.requires_grad and w is not latest and torch.equal(w.detach(), latest)
