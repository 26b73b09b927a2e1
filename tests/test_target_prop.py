"""Difference target propagation (eqprop.target_prop): DTP equals backprop for linear layers with
transposed feedback; the targets and local losses are those of the equations; L-DRL feedback
makes DTP's updates close to backprop's (plain DTP feedback does not); settings are checked;
the trainer trains the mlp kind; an ff-EBM with DTP feedforward parts and EP blocks learns."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import eqprop
from eqprop.target_prop import (
    DTP,
    DTPConv2d,
    DTPLinear,
    DTPNetwork,
    dtp_ffebm,
    dtp_layers,
    dtp_mlp,
    feedback_loss,
    feedback_step,
    learning_of,
    make_rule,
    set_learning,
    update_angles,
)
from eqprop.training.config import ConfigError, load_config
from eqprop.training.models import build_model
from eqprop.training.trainer import Trainer
from test_training_helpers import synthetic_images


def transposed_feedback(net: torch.nn.Module) -> None:
    for m in dtp_layers(net):
        if m.has_feedback:
            with torch.no_grad():
                m.feedback_weight.copy_(m.weight.t())
                m.feedback_bias.normal_()  # the difference correction cancels any bias


def grads(net: torch.nn.Module, x, y) -> list[torch.Tensor]:
    params = [p for m in dtp_layers(net) for p in m.forward_parameters()]
    return list(torch.autograd.grad(F.cross_entropy(net(x), y), params))


@settings(max_examples=25, deadline=None)
@given(widths=st.lists(st.integers(1, 7), min_size=2, max_size=5), batch=st.integers(1, 6),
       normalize=st.sampled_from(["sample", "batch", "none"]), learning=st.sampled_from(["dtp", "dtp-ldrl"]),
       seed=st.integers(0, 2**16))
def test_linear_layers_with_transposed_feedback_give_backprops_update(widths, batch, normalize, learning, seed):
    torch.manual_seed(seed)
    widths = [*widths, 3]
    net = DTPNetwork(widths, activation="identity", learning=learning, beta=1e-3, normalize=normalize).double()
    transposed_feedback(net)
    x, y = torch.randn(batch, widths[0], dtype=torch.float64), torch.randint(0, 3, (batch,))
    got = grads(net, x, y)
    set_learning(net, "bp")
    want = grads(net, x, y)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10)  # differences of targets: roundoff / beta


def conv_net(c: list[int], k: int, stride: int, padding: int, activation: str, rule: DTP | None,
             side: int) -> torch.nn.Sequential:
    """conv (no feedback) -> conv -> flatten -> linear output (3 classes), on side x side inputs."""
    with torch.no_grad():
        probe = torch.nn.Sequential(torch.nn.Conv2d(c[0], c[1], k, stride, padding),
                                    torch.nn.Conv2d(c[1], c[2], k, stride, padding))(torch.zeros(1, c[0], side, side))
    return torch.nn.Sequential(DTPConv2d(c[0], c[1], k, stride, padding, activation, feedback=False, rule=rule),
                               DTPConv2d(c[1], c[2], k, stride, padding, activation, rule=rule),
                               torch.nn.Flatten(), DTPLinear(probe.numel(), 3, "identity", rule=rule))


@settings(max_examples=15, deadline=None)
@given(c=st.lists(st.integers(1, 4), min_size=3, max_size=3), k=st.integers(1, 3), stride=st.integers(1, 2),
       padding=st.integers(0, 1), side=st.integers(4, 7), batch=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_linear_convolutions_with_transposed_feedback_give_backprops_update(c, k, stride, padding, side, batch,
                                                                             seed):
    """The transposed convolution with V = W is the convolution's adjoint, for any stride and
    padding (the feedback restores the input size with the right output padding)."""
    first = (side + 2 * padding - k) // stride + 1
    assume(first + 2 * padding >= k)  # room for the second convolution
    torch.manual_seed(seed)
    net = conv_net(c, k, stride, padding, "identity", DTP(beta=1e-3), side).double()
    for m in dtp_layers(net):
        if m.has_feedback:
            with torch.no_grad():
                m.feedback_weight.copy_(m.weight if isinstance(m, DTPConv2d) else m.weight.t())
    x, y = torch.randn(batch, c[0], side, side, dtype=torch.float64), torch.randint(0, 3, (batch,))
    got = grads(net, x, y)
    set_learning(net, "bp")
    for g, w in zip(got, grads(net, x, y)):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10)


def test_ldrl_aligns_convolutional_dtp_with_backprop():
    """60 feedback steps on a fixed batch (float64, 1-4-8 channels, stride 2, 8x8 inputs):
    measured L-DRL angles [9.2, 6.7] degrees, plain DTP [63.3, 66.8] (float32 runs: 10.3, 5.7
    and 65.3, 63.0)."""
    x, y = torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (16,))
    angles = {}
    for learning, lr in (("dtp-ldrl", 0.1), ("dtp", 0.05)):
        torch.manual_seed(0)
        net = conv_net([1, 4, 8], 3, 2, 1, "elu", make_rule(learning, noise_samples=8, feedback_lr=lr), 8).double()
        for _ in range(60):
            feedback_step(net, x)
        angles[learning] = update_angles(net, x, y)
    assert max(angles["dtp-ldrl"][:2]) < 20.0 and min(angles["dtp"][:2]) > 40.0, angles


def test_targets_and_local_losses_follow_the_equations():
    """t_L = h_L - beta dl/dh_L, t_l = g_l(t_{l+1}) + h_l - g_l(h_{l+1}); each layer's weights
    get the gradient of ||h_l - t_l||^2 / (2 beta) with its input and target held fixed."""
    torch.manual_seed(0)
    beta = 0.3
    net = DTPNetwork([4, 5, 6, 3], activation="tanh", learning="dtp", beta=beta, normalize="none").double()
    for m in dtp_layers(net)[1:]:
        with torch.no_grad():
            m.feedback_weight.normal_()
            m.feedback_bias.normal_()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    l1, l2, l3 = dtp_layers(net)
    with torch.no_grad():
        h1 = l1.f(x)
        h2 = l2.f(h1)
        h3 = l3.f(h2)
    h3r = h3.clone().requires_grad_(True)
    (d3,) = torch.autograd.grad(F.cross_entropy(h3r, y), h3r)
    t3 = h3 - beta * d3
    t2 = l3.g(t3, h2.shape) + h2 - l3.g(h3, h2.shape)
    t1 = l2.g(t2, h1.shape) + h1 - l2.g(h2, h1.shape)
    want = []
    for layer, h_in, t in ((l1, x, t1), (l2, h1, t2), (l3, h2, t3)):
        local = (layer.f(h_in) - t).pow(2).sum() / (2 * beta)
        want += torch.autograd.grad(local, layer.forward_parameters())
    got = grads(net, x, y)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert all(m.feedback_weight.grad is None for m in (l2, l3))  # feedback learns in feedback_step only


def train_feedback(learning: str, steps: int, lr: float) -> tuple[DTPNetwork, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = DTPNetwork([10, 16, 16, 16, 4], activation="elu", learning=learning, noise_samples=8,
                     feedback_lr=lr, feedback_iterations=1).double()
    x = torch.randn(64, 10, dtype=torch.float64)
    y = torch.randint(0, 4, (64,))
    for _ in range(steps):
        feedback_step(net, x)
    return net, x, y


def test_ldrl_feedback_aligns_dtp_with_backprop_and_plain_dtp_does_not():
    """Feedback weights alone trained for 150 SGD steps on a fixed batch (float64). Measured with
    these seeds: L-DRL angles [3.6, 3.9, 1.8] degrees (layer 4, the output layer, gets the
    loss's own gradient: 0), plain DTP [44.8, 45.6, 34.6]; thresholds with margin."""
    ldrl, x, y = train_feedback("dtp-ldrl", 150, 0.05)
    angles = update_angles(ldrl, x, y)
    assert max(angles[:3]) < 10.0, angles
    assert angles[3] < 1e-4
    plain, _, _ = train_feedback("dtp", 150, 0.05)
    plain_angles = update_angles(plain, x, y)
    assert min(plain_angles[:3]) > 25.0, plain_angles
    assert all(a + 20.0 < b for a, b in zip(angles[:3], plain_angles[:3]))


def test_ldrl_loss_is_minimal_at_the_transposed_jacobian():
    """For a linear layer the L-DRL loss is, in expectation, -tr(V W) + 1/2 ||V||^2 (per unit
    noise variance); feedback steps from zero converge to V = W^T."""
    torch.manual_seed(1)
    layer = DTPLinear(5, 3, "identity", rule=DTP(noise_samples=64, feedback_lr=0.2)).double()
    h = torch.randn(64, 5, dtype=torch.float64)
    net = torch.nn.Sequential(torch.nn.Identity(), layer)
    for _ in range(200):
        feedback_step(net, h)
    torch.testing.assert_close(layer.feedback_weight, layer.weight.t(), atol=0.05, rtol=0)


def test_update_angles_changes_nothing_and_bp_is_zero():
    net, x, y = train_feedback("dtp-ldrl", 2, 0.05)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    update_angles(net, x, y)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    set_learning(net, "bp")
    assert max(update_angles(net, x, y)) < 1e-4
    assert learning_of(net) == "bp"


@pytest.mark.parametrize("settings_, match", [
    (dict(beta=0.0), r"dtp: beta must be a finite number > 0, got 0"),
    (dict(beta=-1.0), r"beta must be"),
    (dict(noise_std=-0.1), r"dtp: noise_std must be a finite number > 0"),
    (dict(noise_samples=0), r"dtp: noise_samples must be a positive integer"),
    (dict(normalize="max"), r"dtp: normalize must be one of"),
    (dict(feedback="exact"), r"dtp: feedback must be one of"),
    (dict(feedback_lr=float("nan")), r"feedback_lr"),
    (dict(feedback_iterations=-1), r"feedback_iterations must be a non-negative integer"),
])
def test_bad_settings_are_named(settings_, match):
    with pytest.raises(ValueError, match=match):
        DTP(**settings_)


def test_bad_learning_inputs_and_shapes_are_named():
    with pytest.raises(ValueError, match=r"learning must be one of \('dtp', 'dtp-ldrl', 'bp'\)"):
        make_rule("tp")
    with pytest.raises(ValueError, match="fixes the feedback training"):
        make_rule("dtp", feedback="ldrl")
    with pytest.raises(ValueError, match="unknown DTP setting"):
        make_rule("dtp", bta=0.1)
    with pytest.raises(ValueError, match="learning 'bp' takes no DTP settings"):
        make_rule("bp", beta=0.1)
    with pytest.raises(ValueError, match="dtp: beta must be"):
        dtp_mlp(4, [3], 2, learning="bp", beta=-0.5)  # checked even where unused
    assert learning_of(dtp_mlp(4, [3], 2, learning="bp", beta=0.5)) == "bp"
    with pytest.raises(ValueError, match="activation must be one of"):
        DTPLinear(3, 2, "softsign")
    with pytest.raises(ValueError, match="widths must be at least two"):
        DTPNetwork([4])
    layer = DTPLinear(3, 2, rule=DTP(), name="ff1")
    with pytest.raises(ValueError, match="ff1: input has 4 features, the layer takes 3"):
        layer(torch.randn(5, 4))
    with torch.no_grad():
        layer.feedback_weight = torch.nn.Parameter(torch.zeros(2, 3))  # the forward weight's shape, not its transpose
    with pytest.raises(ValueError, match=r"ff1: feedback_weight must have shape \(3, 2\).*got \(2, 3\)"):
        layer(torch.randn(5, 3))
    conv = DTPConv2d(2, 3, 3, name="c1")
    with pytest.raises(ValueError, match="c1: input has 1 channels, the layer takes 2"):
        conv(torch.randn(1, 1, 5, 5))
    with pytest.raises(ValueError, match=r"c1: input must be a floating-point \(batch, channels, H, W\) tensor"):
        conv(torch.randn(2, 5, 5))
    with pytest.raises(ValueError, match=r"c1: a \(1, 1\) input is smaller than the 3x3 kernel \(padding 0\)"):
        DTPConv2d(2, 3, 3, padding=0, name="c1")(torch.randn(1, 2, 1, 1))
    conv.feedback_weight = torch.nn.Parameter(torch.zeros(2, 3, 3, 3))
    with pytest.raises(ValueError, match=r"c1: feedback_weight must have shape \(3, 2, 3, 3\)"):
        conv(torch.randn(1, 2, 5, 5))
    with pytest.raises(ValueError, match="stride must be a positive integer"):
        DTPConv2d(2, 3, 3, stride=0)
    first = DTPLinear(3, 2, feedback=False, rule=DTP(), name="first")
    out = first(torch.randn(4, 3, requires_grad=True))
    with pytest.raises(RuntimeError, match="first: its input needs a gradient but the layer has no feedback"):
        out.sum().backward()
    with pytest.raises(ValueError, match="no DTP layer"):
        set_learning(torch.nn.Linear(2, 2), "dtp")


def test_resume_state_holds_the_warmup_counter():
    net = DTPNetwork([4, 5, 3], learning="dtp-ldrl", feedback_warmup=3)
    x = torch.randn(8, 4)
    feedback_step(net, x)
    assert int(dtp_layers(net)[1].feedback_steps) == 1 and "2.feedback_steps" in net.state_dict()
    assert feedback_loss(net, x).requires_grad


TRAIN, TEST = synthetic_images(96, seed=1), synthetic_images(64, seed=2, split="test")


def mlp_config(tmp_path, *extra):
    """fmnist_mlp_dtp shrunk to one hidden layer of 16 units on 8x8 images."""
    return load_config("fmnist_mlp_dtp", ["model.hidden=[16]", "model.feedback_iterations=2", "epochs=2",
                                          "optim.lr=0.01", "batch_size=16", "eval_batch_size=32", "progress=false",
                                          "tensorboard=false", f"out_dir={tmp_path}", "threads=1", *extra])


def test_trainer_trains_the_mlp_kind_with_interleaved_feedback_steps(tmp_path):
    cfg = mlp_config(tmp_path)
    seen = []
    trainer = Trainer(cfg, TRAIN, TEST, echo=lambda _m: None,
                      on_step=lambda t: seen.append(int(dtp_layers(t.model)[1].feedback_steps)))
    summary = trainer.fit()
    assert seen == list(range(1, len(seen) + 1))  # one feedback step before every training step
    assert summary["last"]["test_top1"] >= 70.0
    assert learning_of(trainer.model) == "dtp-ldrl"


def test_a_stopped_mlp_run_resumes_bit_identical(tmp_path):
    """Feedback SGD keeps no state and the warm-up counter is a buffer: stopping mid-epoch and
    resuming ends where an uninterrupted run does."""
    def fit(cfg, on_step=None, resume=False):
        t = Trainer(cfg, TRAIN, TEST, echo=lambda _m: None, on_step=on_step)
        if resume:
            t.resume()
        return t, t.fit()

    extra = ["model.feedback_warmup=3", "optim.schedule_unit=step", "epochs=1"]
    straight, _ = fit(mlp_config(tmp_path / "a", *extra))

    def stop(t):
        if t.epoch == 0 and t.step == 2:
            t.request_stop()
    cfg = mlp_config(tmp_path / "b", *extra)
    _, s1 = fit(cfg, on_step=stop)
    assert s1["status"] == "interrupted"
    resumed, s2 = fit(cfg, resume=True)
    assert s2["status"] == "completed"
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert int(b["2.feedback_steps"]) == len(straight.train_loader)


def test_mlp_kind_refuses_an_estimator(tmp_path):
    cfg = mlp_config(tmp_path, "algorithm=id")
    with pytest.raises(ConfigError, match="model.kind=mlp has no energy-based block"):
        build_model(cfg, {"num_classes": 4, "kind": "image", "shape": (1, 8, 8)})


def test_ffebm_with_dtp_feedforward_parts_and_ep_blocks_learns_without_backprop():
    """Every backward of the chain is local: DTP layers propagate targets through their feedback
    maps, the block's EP returns the error current at its input, which becomes the target of
    the DTP layer below. The loss on a tiny problem falls."""
    torch.manual_seed(0)
    model = dtp_ffebm(10, [[12, 8]], num_classes=3, learning="dtp-ldrl", T1=15,
                      dtp_settings=dict(feedback_iterations=2, noise_samples=4), estimator_settings=dict(T2=8))
    assert isinstance(model.blocks[0].estimator, eqprop.EP)
    assert [m.has_feedback for m in dtp_layers(model)] == [False, True]
    x = torch.randn(64, 10)
    y = (x[:, :3].argmax(1))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    losses = []
    for _ in range(40):
        model.local_step(x)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(m.feedback_weight.grad is None for m in dtp_layers(model) if m.has_feedback)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
