"""EP's mirror start (mirror=True): the -beta phase starts from 2 s* - s+; it reaches the
same fixed point (the same gradient to float64 precision) in fewer steps, and bad settings
are refused."""
import copy

import pytest
import torch

from eqprop import EP, ConvHopfield, DenseHopfield


def _grads_and_record(block, est, u, w):
    b = copy.deepcopy(block)
    b.estimator = est
    x = u.clone().requires_grad_(True)
    (b(x) * w).sum().backward()
    return [x.grad] + [p.grad for p in b.parameters()], b.last_relax


def _blocks():
    torch.manual_seed(5)
    dense = DenseHopfield([6, 8, 5], activation="hardsigmoid", slope=0.5, alpha=2.0, T1=2000, tol=1e-13).double()
    conv = ConvHopfield([2, 4, 6], pools="m-", fc=[5], in_size=8, T1=2000, tol=1e-13, init="kaiming", alpha=2.0,
                        slope=0.5).double()
    return [(dense, torch.randn(4, 6, dtype=torch.float64)), (conv, torch.randn(3, 2, 8, 8, dtype=torch.float64))]


@pytest.mark.parametrize("case", [0, 1], ids=["dense", "conv_pool"])
@pytest.mark.parametrize("beta", [0.05, 0.1])
def test_mirror_start_reaches_the_same_gradient_in_fewer_steps(case, beta):
    block, u = _blocks()[case]
    w = torch.randn(u.shape[0], 5, dtype=torch.float64)
    plain, rec_plain = _grads_and_record(block, EP(beta=beta, T2=2000, tol=1e-12), u, w)
    mirror, rec_mirror = _grads_and_record(block, EP(beta=beta, T2=2000, tol=1e-12, mirror=True), u, w)
    for a, b in zip(plain, mirror):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-9)
    n_plain, n_mirror = rec_plain["nudged-"].iters, rec_mirror["nudged-"].iters
    assert rec_mirror["nudged-"].converged and n_mirror < n_plain
    assert rec_mirror["nudged+"].iters == rec_plain["nudged+"].iters  # the +beta phase is untouched


def test_mirror_start_is_refused_where_it_has_no_meaning():
    with pytest.raises(ValueError, match="mirror=True needs variant='centered'"):
        EP(variant="positive", mirror=True)
    with pytest.raises(ValueError, match="mirror must be true or false"):
        EP(mirror=1)
