"""Errors a user can act on: each names the block, the setting and the value."""
import pytest
import torch
from torch import nn

from eqprop import EP, ID, BPTT, FFEBM, ConvHopfield, DenseHopfield, DivergenceError, make_estimator
from eqprop.activations import Identity, make_activation


def test_wrong_input_shape_names_block_and_shape():
    block = ConvHopfield([3, 4], pools="m", name="block2")
    with pytest.raises(ValueError, match=r"block2.*\(2, 5, 8, 8\)"):
        block(torch.randn(2, 5, 8, 8))
    dense = DenseHopfield([6, 4], name="dense")
    with pytest.raises(ValueError, match="dense"):
        dense(torch.randn(2, 7, 3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input(bad):
    block = DenseHopfield([4, 3], name="blk")
    u = torch.randn(2, 4)
    u[1, 2] = bad
    with pytest.raises(ValueError, match="blk.*NaN or inf"):
        block(u)


def test_diverging_relaxation_raises():
    block = DenseHopfield([5, 5], activation="identity", name="unstable", T1=200)
    with torch.no_grad():
        block.couplings[0].linear.weight.fill_(3.0)
    with pytest.raises(DivergenceError, match="unstable.*diverged"):
        block(torch.randn(2, 5))


@pytest.mark.parametrize("make,match", [
    (lambda: EP(beta=0), "beta"),
    (lambda: EP(beta=-0.1), "beta"),
    (lambda: EP(T2=0), "T2"),
    (lambda: EP(variant="sideways"), "variant"),
    (lambda: EP(tol=-1.0), "tol"),
    (lambda: ID(max_iter=0), "max_iter"),
    (lambda: BPTT(T2=-3), "T2"),
    (lambda: make_estimator("backprop"), "unknown estimator 'backprop'"),
    (lambda: make_estimator("ep", gamma=1), "gamma"),
    (lambda: DenseHopfield([4, 3], T1=0, name="b1"), "b1: T1"),
    (lambda: DenseHopfield([4, 3], update="random", name="b1"), "b1: update"),
    (lambda: DenseHopfield([4, 3], first="middle"), "first"),
    (lambda: DenseHopfield([4, 3], tol=0), "tol"),
    (lambda: ConvHopfield([3, 4, 5], pools="m"), "pools"),
    (lambda: ConvHopfield([3, 4], pools="m", fc=[3]), "in_size"),
    (lambda: make_activation("relu"), "unknown activation"),
    (lambda: make_activation("hardsigmoid", slope=0), "slope"),
])
def test_invalid_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_settings_changed_after_construction_are_checked_at_forward():
    block = DenseHopfield([4, 3], name="late")
    block.T1 = -5
    with pytest.raises(ValueError, match="late: T1"):
        block(torch.randn(2, 4))
    model = FFEBM(DenseHopfield([4, 3]))
    with pytest.raises(ValueError, match="block index 3"):
        model.set_estimator("ep", blocks=[3])
    with pytest.raises(ValueError, match="unknown relaxation setting"):
        model.configure_blocks(T3=4)


def test_last_layer_linear_option():
    block = DenseHopfield([4, 3], last_linear=True)
    assert isinstance(block.activations[-1], Identity)
