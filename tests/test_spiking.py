"""Spiking dense Hopfield block and the EqSpike rule (eqprop.spiking).

  - as the firing rate grows, the spike-triggered update of stochastic neurons tends to
    rate-based EP's on the same weights (cosine over a batch of repeated samples);
  - on a rate-based block, the rule's per-step local differences sum to positive EP exactly;
  - integrate-and-fire neurons fire floor(v0 + n rate dt rho / threshold) spikes in n steps
    and their traces are the filtered spike trains (property-based);
  - settings are validated; stochastic spiking is reproducible under torch.manual_seed;
  - the STDP-like window of one synapse; a config trains a step.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import eqprop
from eqprop import EP, DenseHopfield, EqSpike, SpikingDenseHopfield
from eqprop.spiking import stdp_window, trace_decay

DT = torch.float64


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def tiny(copies: int = 1):
    """A [3, 4, 2] logistic block (float64), two inputs and targets, each repeated `copies` times."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    block = DenseHopfield([3, 4, 2], activation="sigmoid", alpha=1.5, T1=400).to(DT)
    u = torch.randn(2, 3, generator=g, dtype=DT).repeat(copies, 1)
    y = torch.rand(2, 2, generator=g, dtype=DT).repeat(copies, 1)
    return block, u, y


def gradient(block, estimator, u, y, target: bool = False) -> torch.Tensor:
    """All parameter gradients and dl/du of 1/2 ||s_L - y||^2 (summed), flattened."""
    block.estimator = estimator
    params = list(block.parameters())
    for p in params:
        p.grad = None
    uu = u.clone().requires_grad_(True)
    out = block(uu, target=y) if target else block(uu)
    (0.5 * ((out - y) ** 2).sum()).backward()
    return torch.cat([p.grad.flatten() for p in params] + [uu.grad.flatten()])


def test_eqspike_tends_to_rate_based_ep_as_the_rate_grows():
    """Stochastic neurons, tau = 50 steps, rate * dt / threshold = 0.1, 0.3, 1 spikes per step at
    full drive; 1024 copies of two samples average the spike noise. Measured cosines with
    positive EP (beta = 0.5) for seeds 0, 1, 2: (0.17, 0.76, 0.98), (0.38, 0.72, 0.98),
    (0.27, 0.76, 0.96)."""
    rate_block, u, y = tiny(copies=1024)
    beta = 0.5
    reference = gradient(rate_block, EP(beta=beta, variant="positive", T2=400), u, y)
    cosines = []
    for rate in (0.1, 0.3, 1.0):
        block = SpikingDenseHopfield.from_dense(rate_block, spiking="stochastic", tau=50.0, dt=1.0, rate=rate)
        block.T1 = 300
        torch.manual_seed(0)
        cosines.append(cosine(gradient(block, EqSpike(beta=beta, T2=200), u, y), reference))
    assert cosines[0] < cosines[1] < cosines[2], cosines
    assert cosines[2] > 0.95, cosines


def test_ep_on_spiking_traces_tends_to_rate_based_ep():
    """EP's contrast of the traces at the ends of two spiking phases (deterministic neurons)
    also tends to EP's on the rate network: measured cosine 0.970 at N = 100 spikes per tau."""
    rate_block, u, y = tiny()
    reference = gradient(rate_block, EP(beta=0.2, variant="positive", T2=400), u, y)
    block = SpikingDenseHopfield.from_dense(rate_block, tau=100.0, dt=1.0, rate=1.0)
    block.T1 = 800
    assert cosine(gradient(block, EP(beta=0.2, variant="positive", T2=600), u, y), reference) > 0.95


@pytest.mark.parametrize("target", [False, True])
@pytest.mark.parametrize("variant", ["positive", "centered"])
def test_on_a_rate_block_the_local_differences_sum_to_ep(target, variant):
    block, u, y = tiny()
    ep = gradient(block, EP(beta=0.05, variant=variant, T2=60), u, y, target)
    local = gradient(block, EqSpike(beta=0.05, variant=variant, T2=60), u, y, target)
    assert torch.allclose(local, ep, rtol=1e-10, atol=1e-13)


@settings(max_examples=25, deadline=None)
@given(rho=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5), rate=st.floats(0.05, 1.0),
       threshold=st.floats(1.0, 3.0), steps=st.integers(1, 60))
def test_integrate_and_fire_counts_and_traces(rho, rate, threshold, steps):
    """One layer with a hard-sigmoid drive rho (= u): each neuron fires floor(v0/threshold +
    steps rate dt rho / threshold) spikes, v0 its initial membrane, and its trace is
    sum_t (1 - a) h a^(steps - t) S_t."""
    u = torch.tensor([rho], dtype=DT)
    block = SpikingDenseHopfield([len(rho)], activation="hardsigmoid", tau=7.0, dt=0.5, rate=rate / 0.5 * threshold,
                                 threshold=threshold, T1=steps)
    v0 = block.initial_membranes([u])[0]
    expected = torch.floor(v0 / threshold + steps * (rate * u))
    assume(bool(((v0 / threshold + steps * rate * u) - expected).abs().min() > 1e-9))
    a, h = trace_decay(block.dt, block.tau), block.spike_value
    spikes, trace = [], torch.zeros_like(u)

    def on_step(t, before, after, fired):
        spikes.append(fired[0])

    s, stats = block.simulate(u, on_step=on_step)
    for fired in spikes:
        trace = a * trace + (1 - a) * h * fired
    assert torch.equal(torch.stack(spikes).sum(0), expected)
    assert torch.allclose(s[0], trace, rtol=1e-12, atol=1e-15)
    assert stats.iters == steps and stats.converged is None


@pytest.mark.parametrize("settings, match", [
    (dict(threshold=0.0), "threshold must be a finite number > 0"),
    (dict(threshold=-1.0), "threshold must be a finite number > 0"),
    (dict(tau=0.0), "tau must be a finite number > 0"),
    (dict(dt=0.0), "dt must be a finite number > 0"),
    (dict(rate=-2.0), "rate must be a finite number > 0"),
    (dict(rate=float("inf")), "rate must be a finite number > 0"),
    (dict(rate=2.0, dt=1.0, threshold=1.0), r"rate \* dt must be <= threshold"),
    (dict(spiking="poisson"), "spiking must be one of"),
    (dict(activation="identity"), "spiking neurons fire at a rate sigma"),
    (dict(tol=1e-4), "tol must be None for spiking neurons"),
    (dict(relax_dtype=torch.bfloat16), "relax_dtype is not supported"),
])
def test_invalid_settings_raise(settings, match):
    with pytest.raises(ValueError, match=f"SpikingDenseHopfield: {match}"):
        SpikingDenseHopfield([3, 2], **settings)


def test_configure_validates_and_rolls_back():
    block = SpikingDenseHopfield([3, 2], tau=5.0, name="spk")
    with pytest.raises(ValueError, match="spk: tau must be"):
        block.configure(tau=-1.0, rate=0.5)
    assert (block.tau, block.rate) == (5.0, 1.0)
    with pytest.raises(ValueError, match="unknown setting"):
        block.configure(gain=2.0)
    block.configure(rate=0.5, T1=7)
    assert (block.rate, block.T1) == (0.5, 7)
    block.rate = 3.0  # a plain attribute: checked at the next relaxation
    with pytest.raises(ValueError, match=r"spk: rate \* dt must be <= threshold"):
        block(torch.randn(2, 3))
    block.rate = 1.0
    with pytest.raises(ValueError, match="spk: spiking dynamics run a fixed number of steps; tol must be None"):
        block.relax(torch.randn(2, 3), tol=1e-3)
    with pytest.raises(ValueError, match="eqspike: beta must be a finite number > 0"):
        eqprop.make_estimator("eqspike", beta=0.0)
    with pytest.raises(ValueError, match="eqspike: variant must be one of"):
        eqprop.make_estimator("eqspike", variant="both")


def test_eqspike_refuses_a_tolerance_on_a_spiking_block():
    block = SpikingDenseHopfield([3, 2], name="spk", estimator=EqSpike(tol=1e-4))
    out = block(torch.randn(2, 3, requires_grad=True))
    with pytest.raises(ValueError, match=r"eqspike \(spk\): tol must be None on a spiking block"):
        out.sum().backward()


def test_stochastic_spiking_is_reproducible_under_a_seed():
    rate_block, u, y = tiny()
    block = SpikingDenseHopfield.from_dense(rate_block, spiking="stochastic", tau=5.0, rate=0.5)
    block.T1 = 40

    def run(seed):
        torch.manual_seed(seed)
        return gradient(block, EqSpike(beta=0.5, T2=30), u, y), block(u).detach()

    (g1, s1), (g2, s2), (g3, s3) = run(7), run(7), run(8)
    assert torch.equal(g1, g2) and torch.equal(s1, s2)
    assert not torch.equal(g1, g3) and not torch.equal(s1, s3)
    deterministic = SpikingDenseHopfield.from_dense(rate_block, tau=5.0, rate=0.5)
    with torch.no_grad():
        assert torch.equal(deterministic(u), deterministic(u))


def test_stdp_window():
    """One pre- and one post-synaptic spike k steps apart: the synapse grows by 2 h^2 (1 - a)
    for coincident spikes and shrinks by h^2 (1 - a)^2 a^(|k| - 1) otherwise, symmetric in k;
    over all k the changes cancel (uncorrelated trains leave the weight unchanged)."""
    tau, dt, rate = 5.0, 1.0, 0.5
    offsets = list(range(-60, 61))
    dw = stdp_window(offsets, tau=tau, dt=dt, rate=rate)
    a, h = math.exp(-dt / tau), 1 / (rate * dt)
    expected = torch.tensor([2 * h * h * (1 - a) if k == 0 else -h * h * (1 - a) ** 2 * a ** (abs(k) - 1)
                             for k in offsets], dtype=DT)
    assert torch.allclose(dw, expected, rtol=1e-12, atol=1e-15)
    assert torch.equal(dw, dw.flip(0))
    assert abs(float(dw.sum())) < 1e-4 * float(dw.abs().max())
    with pytest.raises(ValueError, match="stdp_window: tau must be"):
        stdp_window([0], tau=0.0)


def test_a_spiking_model_from_a_config_learns_with_eqspike(tmp_path):
    from eqprop.data import Dataset
    from eqprop.training.config import load_config
    from eqprop.training.trainer import Trainer

    def images(n, split):
        g = torch.Generator().manual_seed(0)
        return Dataset(x=torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g),
                       y=torch.randint(0, 10, (n,), generator=g), num_classes=10, mean=(0.5,), std=(0.25,),
                       name="fashion_mnist", kind="image", split=split)

    cfg = load_config("fmnist_dense_eqspike", ["algorithm=eqspike", "model.T1=5", "estimator.eqspike.T2=5",
                                               "model.blocks=[[8, 4]]", "batch_size=4", "eval_batch_size=4",
                                               f"out_dir={tmp_path}", "threads=1"])
    trainer = Trainer(cfg, images(4, "train"), images(4, "test"), echo=lambda _m: None)
    block = trainer.model.blocks[0]
    assert isinstance(block, SpikingDenseHopfield) and isinstance(block.estimator, EqSpike)
    assert (block.spiking, block.tau, block.T1) == ("stochastic", 50.0, 5)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.fit()["status"] == "completed"
    after = trainer.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "2.couplings.0.linear.weight" in changed and "1.weight" in changed  # the block and the map into it


@pytest.mark.parametrize("name", ["ep", "cl", "id", "bptt", "tbp"])
def test_standard_estimators_run_on_a_spiking_block(name):
    """EP and CL run their second phases with spikes; id, bptt and tbp differentiate the rate map."""
    block, u, y = tiny()
    spiking = SpikingDenseHopfield.from_dense(block, tau=5.0, rate=1.0)
    spiking.T1 = 30
    settings = {"ep": dict(T2=20), "cl": dict(T2=20), "id": dict(max_iter=50, tol=None), "bptt": dict(T2=5),
                "tbp": dict(K=5)}[name]
    g = gradient(spiking, eqprop.make_estimator(name, **settings), u, y, target=name == "cl")
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_on_a_pooling_rate_block_held_routes_are_honoured():
    """pool='held' on a block with in-block max-pooling: the local differences sum to EP's
    estimate with the same held routes."""
    torch.manual_seed(0)
    block = eqprop.ConvHopfield([1, 2], pools="m", activation="sigmoid", init="kaiming", alpha=1.5, T1=200).to(DT)
    u = torch.randn(2, 1, 4, 4, dtype=DT)
    y = torch.rand(2, 2, 2, 2, dtype=DT)
    estimates = {}
    for pool in ("free", "held"):  # beta = 5 switches some routes, so the two differ (by 2%)
        ep = gradient(block, EP(beta=5.0, variant="positive", T2=40, pool=pool), u, y)
        estimates[pool] = gradient(block, EqSpike(beta=5.0, T2=40, pool=pool), u, y)
        assert torch.allclose(estimates[pool], ep, rtol=1e-9, atol=1e-12), pool
    assert not torch.allclose(estimates["free"], estimates["held"], rtol=1e-3)
