"""Vector-field blocks (eqprop.vector_field): separate backward weights B_l = K_l^T, EP's local
contrast for W and its transpose for B (VF-EP), continual updates on them (C-VF), the angle
between B and W^T, and the errors for ill-formed blocks."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import eqprop
from eqprop import EP, ID, ContinualEP, ConvHopfield, DenseHopfield
from eqprop.couplings import ConvCoupling, DenseCoupling
from eqprop.testing import check_estimator, gradients, rel_error
from eqprop.training.config import load_config
from eqprop.training.models import build_model
from eqprop.vector_field import ConvVF, DenseVF, VectorFieldBlock, dense_vf_ffebm, model_backward_angles

DT = torch.float64
RELAX = dict(T1=3000, tol=1e-13)


def dense_pair(backward_init: str = "transpose"):
    """A DenseVF block and the DenseHopfield block with the same forward weights."""
    torch.manual_seed(0)
    vf = DenseVF([3, 5, 2], activation="sigmoid", alpha=1.5, backward_init=backward_init, **RELAX).to(DT)
    hop = DenseHopfield([3, 5, 2], activation="sigmoid", **RELAX).to(DT)
    with torch.no_grad():
        for c, h in zip(vf.couplings, hop.couplings):
            h.linear.weight.copy_(c.linear.weight)
            h.linear.bias.copy_(c.linear.bias)
    return vf, hop


def conv_pair():
    torch.manual_seed(0)
    vf = ConvVF([1, 2, 2], activation="sigmoid", init="kaiming", alpha=1.5, backward_init="transpose", **RELAX).to(DT)
    hop = ConvHopfield([1, 2, 2], pools="--", activation="sigmoid", **RELAX).to(DT)
    hop.load_state_dict({k: v for k, v in vf.state_dict().items() if not k.startswith("backward")})
    return vf, hop


def conv_pool_pair(backward_init: str = "transpose"):
    """A ConvVF block with a 2x2 max-pool after its first convolution, and the ConvHopfield
    block with the same pools and forward weights."""
    torch.manual_seed(0)
    vf = ConvVF([1, 2, 2], pools="m-", activation="sigmoid", init="kaiming", alpha=1.5,
                backward_init=backward_init, **RELAX).to(DT)
    hop = ConvHopfield([1, 2, 2], pools="m-", activation="sigmoid", **RELAX).to(DT)
    hop.load_state_dict({k: v for k, v in vf.state_dict().items() if not k.startswith("backward")})
    return vf, hop


def split(vf: VectorFieldBlock, grads: list) -> tuple[list, list]:
    """(gradients of the forward couplings' parameters, of the backward couplings' weights)."""
    names = [n for n, _ in vf.named_parameters()]
    fwd = [g for n, g in zip(names, grads) if n.startswith("couplings")]
    bwd = [g for n, g in zip(names, grads) if n.startswith("backward")]
    return fwd, bwd


@pytest.mark.parametrize("pair", [dense_pair, conv_pair, conv_pool_pair])
def test_tied_block_is_the_hopfield_block(pair):
    """B = W^T: the same dynamics, and VF-EP's update of W and of B is the Hopfield block's EP
    update (with pooling too: the top-down current takes the forward map's switches, as the
    Hopfield block's adjoint does)."""
    vf, hop = pair()
    assert max(vf.backward_angles()) < 1e-5
    u = torch.randn(2, *((3,) if isinstance(vf, DenseVF) else (1, 4, 4)), dtype=DT)
    torch.testing.assert_close(vf.relax(u)[0], hop.relax(u)[0])
    ep = EP(beta=1e-3, T2=200)
    y = torch.rand(hop.relax(u)[0][-1].flatten(1).shape, dtype=DT)

    def loss(block):
        return lambda: 0.5 * ((block(u).flatten(1) - y) ** 2).sum()

    vf.estimator, hop.estimator = ep, ep
    g_vf = gradients(loss(vf), list(vf.parameters()))
    g_hop = gradients(loss(hop), list(hop.parameters()))
    fwd, bwd = split(vf, g_vf)
    assert rel_error(fwd, g_hop) < 1e-10
    hop_weights = [g for (n, _), g in zip(hop.named_parameters(), g_hop) if n.endswith("weight")]
    assert rel_error(bwd, hop_weights) < 1e-10


def test_id_gives_the_gradient_of_the_asymmetric_dynamics():
    vf, _ = dense_pair("random")
    assert min(vf.backward_angles()) > 30
    report = check_estimator(vf, ID(max_iter=5000, tol=1e-13), torch.randn(2, 3))
    assert report.rel_error < 1e-6
    # the free state is not the Hopfield block's: the top-down current uses B, not W^T
    _, hop = dense_pair("random")
    u = torch.randn(2, 3, dtype=DT)
    assert rel_error(vf.relax(u)[0], hop.relax(u)[0]) > 1e-3


def test_pooled_block_id_and_bptt_match_finite_differences():
    """ConvVF with max-pooling and B independent of W (float64): ID and BPTT, which
    differentiate the block's fixed-point map, give the gradient of the asymmetric dynamics
    that central finite differences measure (parameters and input)."""
    vf, hop = conv_pool_pair("random")
    assert min(vf.backward_angles()) > 30
    u = torch.randn(2, 1, 4, 4, dtype=DT)
    assert check_estimator(vf, ID(max_iter=5000, tol=1e-13), u).rel_error < 1e-6
    bptt = eqprop.make_estimator("bptt", T2=60)  # the free phase settles in 10 steps
    assert check_estimator(vf, bptt, u, reference=ID(max_iter=5000, tol=1e-13)).rel_error < 1e-6
    # the top-down current uses B, not W^T: not the Hopfield block's free state
    assert rel_error(vf.relax(u)[0], hop.relax(u)[0]) > 1e-3


def test_pooled_backward_update_is_the_transposed_forward_update():
    """With pooling, K_l gets exactly W_l's update (both read at the forward map's switches)."""
    vf, _ = conv_pool_pair("random")
    vf.estimator = EP(beta=0.3, T2=20, variant="centered")
    u = torch.randn(3, 1, 4, 4, dtype=DT)
    g = gradients(lambda: (vf(u) ** 2).sum(), list(vf.parameters()))
    fwd, bwd = split(vf, g)
    for gw, gk in zip(fwd[0::2], bwd):
        torch.testing.assert_close(gk, gw, rtol=0, atol=0)
    assert all(float(gw.abs().max()) > 0 for gw in fwd[0::2])
    with pytest.raises(ValueError, match="pool='held' needs a HopfieldBlock"):
        vf.estimator = EP(beta=0.3, T2=20, pool="held")
        vf(u).sum().backward()


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 10_000), beta=st.floats(0.01, 1.0), variant=st.sampled_from(["centered", "positive"]))
def test_backward_update_is_the_transposed_forward_update(seed, beta, variant):
    torch.manual_seed(seed)
    vf = DenseVF([4, 3, 2], activation="sigmoid", T1=50).to(DT)
    vf.estimator = EP(beta=beta, T2=10, variant=variant)
    u = torch.randn(3, 4, dtype=DT)
    g = gradients(lambda: (vf(u) ** 2).sum(), list(vf.parameters()))
    fwd, bwd = split(vf, g)
    for gw, gk in zip(fwd[0::2], bwd):  # weights of the forward couplings, then K_l (B_l = K_l^T)
        torch.testing.assert_close(gk, gw, rtol=0, atol=0)


def test_angle_closes_under_weight_decay_at_the_rate_of_the_decay():
    """Transposed updates leave B - W^T to the weight decay: with SGD it shrinks by exactly
    (1 - lr * wd) per step, so the angle between B and W^T falls."""
    torch.manual_seed(1)
    model = dense_vf_ffebm(6, [[5, 4]], num_classes=3, estimator="ep", estimator_settings={"T2": 5}, T1=10)
    block = model.blocks[0]
    lr, wd, steps = 0.1, 0.5, 20
    gap0 = [(k.weight - c.weight).detach().clone() for c, k in zip(block.couplings, block.backward_couplings)]
    angles = [model_backward_angles(model)[0]]
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        with torch.no_grad():  # torch.optim.SGD(lr, weight_decay=wd) without momentum
            for p in model.parameters():
                p -= lr * (p.grad + wd * p)
        angles.append(model_backward_angles(model)[0])
    for c, k, g in zip(block.couplings, block.backward_couplings, gap0):
        torch.testing.assert_close(k.weight - c.weight, g * (1 - lr * wd) ** steps, rtol=1e-4, atol=1e-6)
    assert all(a1 < a0 for a0, a1 in zip(angles[0], angles[-1]))


@pytest.mark.parametrize("pair", [dense_pair, conv_pair, conv_pool_pair])
def test_continual_updates_on_the_block_tend_to_vf_ep(pair):
    """C-VF: continual EP on the vector-field block; as eta -> 0 its summed update is VF-EP's."""
    vf, _ = pair()
    with torch.no_grad():
        for k in vf.backward_couplings:
            k.weight.add_(0.3 * torch.randn_like(k.weight))
    u = torch.randn(2, *((3,) if isinstance(vf, DenseVF) else (1, 4, 4)), dtype=DT)
    report = check_estimator(vf, ContinualEP(beta=0.1, eta=1e-9, T2=20, variant="centered"), u,
                             reference=EP(beta=0.1, T2=20, variant="centered"))
    assert report.rel_error < 1e-6


def test_trains_from_a_config():
    cfg = load_config("fmnist_dense_vf")
    model = build_model(cfg, {"num_classes": 10, "kind": "image", "shape": (1, 28, 28)})
    assert [type(b) for b in model.blocks] == [DenseVF]
    assert type(model.blocks[0].estimator).__name__ == "EP"
    assert 60 < model_backward_angles(model)[0][0] < 120  # independent B: about 90 degrees
    cfg = load_config("fmnist_dense_cvf")
    model = build_model(cfg, {"num_classes": 10, "kind": "image", "shape": (1, 28, 28)})
    assert model.blocks[0].estimator == eqprop.make_estimator("continual", **cfg["estimator"]["continual"])


def test_ill_formed_blocks_raise_naming_the_coupling():
    fwd = [DenseCoupling(3, 4), DenseCoupling(4, 2)]
    acts = [eqprop.Logistic()] * 3
    with pytest.raises(ValueError, match=r"vf: backward coupling 1 has a weight of shape \(4, 2\), the forward "
                                         r"coupling 1 has \(2, 4\)"):
        VectorFieldBlock(fwd, [DenseCoupling(3, 4, bias=False), DenseCoupling(2, 4, bias=False)], acts, name="vf")
    with pytest.raises(ValueError, match="backward coupling 0 has a bias"):
        VectorFieldBlock(fwd, [DenseCoupling(3, 4), DenseCoupling(4, 2, bias=False)], acts)
    with pytest.raises(ValueError, match="2 forward couplings need as many backward couplings, got 1"):
        VectorFieldBlock(fwd, [DenseCoupling(3, 4, bias=False)], acts)
    with pytest.raises(ValueError, match="backward coupling 0 is a ConvCoupling"):
        VectorFieldBlock(fwd, [ConvCoupling(3, 4, bias=False), DenseCoupling(4, 2, bias=False)], acts)
    with pytest.raises(ValueError, match="forward coupling 0 pools but the backward coupling 0 does not"):
        VectorFieldBlock([ConvCoupling(1, 2, pool=True)], [ConvCoupling(1, 2, pool=False, bias=False)], acts[:2])
    with pytest.raises(ValueError, match="forward coupling 0 does not pool but the backward coupling 0 does"):
        VectorFieldBlock([ConvCoupling(1, 2)], [ConvCoupling(1, 2, pool=True, bias=False)], acts[:2])
    with pytest.raises(ValueError, match="ConvVF: ConvHopfield: pools must have one 'm' or '-'"):
        ConvVF([1, 2, 2], pools="m")
    with pytest.raises(ValueError, match="DenseVF: backward_init must be one of"):
        DenseVF([3, 2], backward_init="zeros")
    with pytest.raises(ValueError, match="DenseVF: widths must be positive integers"):
        DenseVF([3, 0])
    block = DenseVF([3, 2])
    with pytest.raises(NotImplementedError, match="has no energy"):
        block.energy(block.init_state(torch.zeros(1, 3)), torch.zeros(1, 3))
