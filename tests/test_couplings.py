"""Couplings own their linear algebra: property-based checks of the adjoints, shapes, routing
and operation counts over random shapes, channels, odd kernel sizes, with and without pooling."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from eqprop import ConvCoupling, DenseCoupling
from eqprop.couplings import unpool

DT = torch.float64
SETTINGS = settings(max_examples=50, deadline=None)


def inner(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum().detach())


@st.composite
def conv_cases(draw):
    """(coupling, x): a convolution (odd kernel, optional 2x2 max-pool) and a batch of lower layers."""
    pool = draw(st.booleans())
    k = draw(st.sampled_from([1, 3, 5]))
    c_in, c_out = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    lo = 2 if pool else 1
    h, w = draw(st.integers(lo, 7)), draw(st.integers(lo, 7))
    batch = draw(st.integers(1, 3))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    torch.manual_seed(seed)
    coupling = ConvCoupling(c_in, c_out, pool=pool, kernel_size=k, bias=bias).to(DT)
    if bias:
        torch.nn.init.normal_(coupling.conv.bias)  # a non-zero bias, so that forgetting it shows
    return coupling, torch.randn(batch, c_in, h, w, dtype=DT)


@st.composite
def dense_cases(draw):
    """(coupling, x): a dense coupling from a flat or a (C, H, W) lower layer."""
    shape = draw(st.one_of(st.tuples(st.integers(1, 12)),
                           st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4))))
    out = draw(st.integers(1, 8))
    batch = draw(st.integers(1, 3))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    torch.manual_seed(seed)
    coupling = DenseCoupling(math.prod(shape), out, bias=bias).to(DT)
    return coupling, torch.randn(batch, *shape, dtype=DT)


cases = st.one_of(conv_cases(), dense_cases())


def assert_adjoint(lhs: float, rhs: float, scale: float) -> None:
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, scale), (lhs, rhs)


@SETTINGS
@given(cases)
def test_linear_part_adjoint_identity(case):
    """<W x, y> = <x, W^T y> for the bias-free linear part, before routing."""
    c, x = case
    z = c.linear_map(x)
    y = torch.randn_like(z)
    back = c.linear_adjoint(y, x.shape)
    assert back.shape == x.shape
    assert_adjoint(inner(z, y), inner(x, back), float(z.detach().abs().sum() * y.abs().max()))


@SETTINGS
@given(cases)
def test_routed_map_adjoint_identity(case):
    """<T x, y> = <x, T^T y> for the full map without bias, T^T with the routing (max-pool
    indices) recorded by the forward."""
    c, x = case
    out, aux = c(x)
    assert (aux is not None) == c.routed
    tx = out if c.bias is None else out - c.bias.view(1, -1, *([1] * (out.dim() - 2)))
    y = torch.randn_like(out)
    back = c.adjoint(y, aux, x.shape)
    assert back.shape == x.shape
    assert_adjoint(inner(tx, y), inner(x, back), float(tx.detach().abs().sum() * y.abs().max()))


@SETTINGS
@given(cases)
def test_forward_is_route_of_linear_map_plus_bias(case):
    c, x = case
    z = c.linear_map(x)
    routed, _ = c.route(z)
    out, _ = c(x)
    torch.testing.assert_close(c.add_bias(routed), out, rtol=1e-12, atol=1e-12)
    # the weight argument replaces W (linearity in the weight)
    torch.testing.assert_close(c.linear_map(x, weight=2 * c.weight), 2 * z, rtol=1e-12, atol=1e-12)
    y = torch.randn_like(z)
    torch.testing.assert_close(c.linear_adjoint(y, x.shape, weight=-c.weight), -c.linear_adjoint(y, x.shape),
                               rtol=1e-12, atol=1e-12)
    # pairing is <y, T(x) + b> per sample
    y_out = torch.randn_like(out)
    torch.testing.assert_close(c.pairing(x, y_out), (y_out * out).flatten(1).sum(1), rtol=1e-12, atol=1e-12)


@SETTINGS
@given(cases)
def test_out_shape_matches_forward(case):
    c, x = case
    out, _ = c(x)
    assert tuple(out.shape) == (x.shape[0], *c.out_shape(tuple(x.shape[1:])))


@SETTINGS
@given(conv_cases())
def test_conv_is_a_same_padded_convolution_then_pool(case):
    """The convolution's map against a direct evaluation (conv2d with same padding, then a
    2x2 max-pool that drops an odd last row/column, then the bias)."""
    c, x = case
    k = c.conv.kernel_size[0]
    ref = F.conv2d(x, c.weight, None, padding=k // 2)
    assert ref.shape[-2:] == x.shape[-2:]
    if c.pool:
        ref = F.max_pool2d(ref, 2)
    if c.bias is not None:
        ref = ref + c.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(c(x)[0], ref, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(cases)
def test_macs_is_the_hand_count(case):
    """One application of W to one sample: for a dense map, in x out; for a convolution,
    one k x k x C_in dot product per output channel and pixel (at full resolution, before
    pooling). Counted here from the operation itself: W as a matrix has one multiply-add per
    entry that touches an input (zero padding included)."""
    c, x = case
    shape = tuple(x.shape[1:])
    if isinstance(c, DenseCoupling):
        expected = math.prod(shape) * c.linear.out_features
    else:
        c_out, c_in, kh, kw = c.conv.weight.shape
        expected = c_out * shape[1] * shape[2] * c_in * kh * kw
    assert c.macs(shape) == expected
    # and as PyTorch's operation counter sees it (2 flops per multiply-add), both directions
    one = x[:1].detach()
    with FlopCounterMode(display=False) as counter:
        z = c.linear_map(one)
    assert counter.get_total_flops() == 2 * expected
    with FlopCounterMode(display=False) as counter:
        c.linear_adjoint(z.detach(), one.shape)
    assert counter.get_total_flops() == 2 * expected


def test_macs_and_out_shape_reject_a_lower_layer_that_does_not_fit():
    conv, dense = ConvCoupling(3, 4, pool=True), DenseCoupling(12, 5)
    with pytest.raises(ValueError, match="3 channels"):
        conv.macs((2, 4, 4))
    with pytest.raises(ValueError, match="2x2 max-pool"):
        conv.out_shape((3, 1, 4))
    with pytest.raises(ValueError, match="expected 12"):
        dense.macs((11,))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ConvCoupling(3, 4, kernel_size=2)


@SETTINGS
@given(conv_cases(), st.booleans())
def test_unpool_equals_max_unpool_in_either_layout(case, channels_last):
    """The adjoint's un-pooling by one scatter gives max_unpool2d's values, and keeps a
    channels-last input channels-last."""
    coupling, x = case
    if not coupling.pool:
        return
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    z = coupling.linear_map(x)
    _, idx = coupling.route(z)
    y = torch.randn(idx.shape, dtype=DT)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    got = unpool(y, idx, z.shape)
    assert torch.equal(got, F.max_unpool2d(y, idx, 2, 2, output_size=z.shape[-2:]))
    if channels_last and not got.is_contiguous():
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_relaxation_dtype_is_kept_through_bias_and_unpooling():
    """Under a bfloat16 autocast the pooled map plus bias and the adjoint's un-pooling stay in
    bfloat16 (a float32 bias or max_unpool2d would promote the state to float32)."""
    torch.manual_seed(0)
    c = ConvCoupling(3, 4, pool=True)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = c(x.bfloat16())
        routed_back = c.route_adjoint(y, *aux)
        back = c.adjoint(y, aux, x.shape)
    assert y.dtype == routed_back.dtype == back.dtype == torch.bfloat16
