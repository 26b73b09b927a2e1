"""16-bit relaxation with the learning rules: the EP-style estimates stay float32-accurate."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import eqprop
from eqprop import FFEBM, ConvHopfield, DenseHopfield, make_estimator
from eqprop.couplings import init_module_
from eqprop.precision import DeviationStepper, relax_with_precision
from eqprop.testing import cosine as cos


@pytest.mark.parametrize("update", ["sync", "async"])
@pytest.mark.parametrize("pool", ["m", "-"])
def test_deviation_steps_are_the_block_steps(update, pool):
    """With the low dtype equal to float64, relaxing s = s* + d reproduces the block's own
    iteration (conv with and without max-pool, dense couplings, sync and async)."""
    torch.manual_seed(0)
    block = ConvHopfield([2, 3, 4], pools=pool + "m", fc=[5], in_size=8, activation="hardsigmoid", init="kaiming",
                         alpha=0.9, update=update, T1=15).double()
    u = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    s_ref = block.relax(u, T=4, tol=None)[0]
    s_ref = [x + 0.05 * torch.randn_like(x) for x in s_ref]  # not a fixed point
    stepper = DeviationStepper(block, u, s_ref, torch.float64)
    nudge = 0.1 * torch.randn(3, 5, dtype=torch.float64)
    s = [x.clone() for x in s_ref]
    s_dev = list(s)
    for _ in range(6):
        s = block.step(s, u, nudge)
        s_dev = block.step(s_dev, u, nudge, {}, preactivations=stepper.preactivations)
    assert max((a - b).abs().max().item() for a, b in zip(s, s_ref)) > 1e-3  # the steps moved the state
    for a, b in zip(s, s_dev):
        assert torch.allclose(a, b, atol=1e-12)


def test_precisions_agree_without_a_relax_dtype():
    block = ConvHopfield([2, 3], pools="m", fc=[4], in_size=8, activation="sigmoid", init="kaiming").double()
    u = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    s0 = block.relax(u, T=3, tol=None)[0]
    out = [relax_with_precision(block, u, s0, 7, None, nudge=0.1 * torch.ones(2, 4, dtype=torch.float64),
                                precision=p) for p in ("deviation", "full", "block")]
    for s, stats in out:
        assert stats.iters == 7
        for a, b in zip(s, out[0][0]):
            assert torch.equal(a, b)


def squared_error(out, y_onehot):
    return 0.5 * ((out - y_onehot) ** 2).sum(1).mean()


def cpu_model():
    """The CPU-sized model of the algorithms study (eqprop/configs/study_fmnist_cpu.yaml):
    conv 1->16 + 2x2 max-pool into one conv block [16, 32] with an in-block max-pool and a
    linear output layer of 10 units, 30 async free-phase iterations, channels-last."""
    torch.manual_seed(0)
    ff = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.MaxPool2d(2))
    init_module_(ff, "kaiming", 0.5)
    block = ConvHopfield([16, 32], "m", [10], in_size=14, activation="hardsigmoid", slope=1.0, init="kaiming",
                         alpha=0.5, last_linear=True, T1=30, tol=None, update="async", first="odd", name="block1")
    return FFEBM(ff, block).to(memory_format=torch.channels_last)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    # smooth random images (blurred noise), normalised like the data
    x = F.avg_pool2d(torch.rand(16, 1, 32, 32, generator=g), 5, 1)
    x = (x - x.mean()) / x.std()
    y = torch.randint(0, 10, (16,), generator=g)
    return x, F.one_hot(y, 10).float()


def model_grads(model, x, y1, dtype, rule, **settings):
    model.blocks[0].relax_dtype = dtype
    model.blocks[0].estimator = make_estimator(rule, **settings)
    model.zero_grad(set_to_none=True)
    with eqprop.targets(model, y1):
        squared_error(model(x), y1).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("dtype,rule", [(torch.bfloat16, r) for r in ("ep", "cep", "pep", "nep", "ccpl", "cl")]
                         + [(torch.float16, "cep")])  # float16 convolutions are slow on CPU
def test_16bit_relaxation_keeps_the_float32_gradient(batch, dtype, rule):
    """On the CPU-sized model of the study, 16-bit relaxation with the default precision
    handling ('deviation' second phases after a refined free state) gives a gradient whose
    cosine with the float32 one is >= 0.99."""
    x, y1 = batch
    if dtype == torch.float16:
        x, y1 = x[:4], y1[:4]
    model = cpu_model()
    g32 = model_grads(model, x, y1, None, rule)
    g16 = model_grads(model, x, y1, dtype, rule)
    assert cos(g32, g16) >= 0.99
    assert model.blocks[0].last_relax["refine"].iters == 10


def test_16bit_relaxation_of_the_second_phases_alone_loses_the_nudge(batch):
    """The reason for the 'deviation' setting: second phases relaxed in bfloat16 states
    (precision='block', the free phase's handling) lose most of the nudge's effect."""
    x, y1 = batch
    model = cpu_model()
    g32 = model_grads(model, x, y1, None, "cep")
    g_block = model_grads(model, x, y1, torch.bfloat16, "cep", precision="block")
    g_dev = model_grads(model, x, y1, torch.bfloat16, "cep", precision="deviation")
    assert cos(g32, g_dev) > cos(g32, g_block)


def test_dense_block_in_float16():
    torch.manual_seed(1)
    block = DenseHopfield([6, 8, 4], activation="sigmoid", T1=40)
    u = torch.randn(5, 6)
    y = torch.rand(5, 4)
    grads = []
    for dt in (None, torch.float16):
        block.relax_dtype = dt
        block.estimator = make_estimator("cep", beta=0.1, T2=30)
        block.zero_grad()
        squared_error(block(u, target=y), y).backward()
        grads.append(torch.cat([p.grad.flatten() for p in block.parameters()]))
    assert cos(*grads) > 0.999
