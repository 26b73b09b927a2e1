"""Analog device non-idealities as a setting of an energy-based block (eqprop.devices)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import eqprop
from eqprop import DenseHopfield, EnergyBlock, Logistic
from eqprop.devices import Device, attach_device_writes, make_device, quantize
from eqprop.training.config import ConfigError, load_config
from eqprop.training.models import build_model


def small_model(device=None, T1=12, T2=4, seed=0):
    torch.manual_seed(seed)
    model = eqprop.dense_ffebm(10, [[8, 6]], num_classes=3, T1=T1, estimator_settings={"T2": T2})
    if device is not None:
        model.configure_blocks(device=device)
    return model


def train(model, steps=3, lr=0.05, writes=True):
    torch.manual_seed(1)
    x, y = torch.randn(6, 10), torch.randint(0, 3, (6,))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if writes:
        attach_device_writes(opt, model)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("settings_, message", [
    ({"adc_bits": 0}, "adc_bits"), ({"dac_bits": -2}, "dac_bits"), ({"adc_bits": 2.5}, "adc_bits"),
    ({"read_noise": -0.1}, "read_noise"), ({"program_noise": float("nan")}, "program_noise"),
    ({"g_max": 0}, "g_max"), ({"g_max": -1.0}, "g_max"), ({"levels": 1, "g_max": 1.0}, "levels"),
    ({"levels": 8}, "needs g_max"), ({"drift": 1.0}, "drift"), ({"asymmetry": 1.0}, "asymmetry"),
    ({"noise": "pink"}, "noise"), ({"resample": "never"}, "resample"), ({"g_unit": "volts"}, "g_unit"),
    ({"adc_range": (1.0, 0.0)}, "adc_range"), ({"dac_range": 0}, "dac_range"), ({"seed": 1.5}, "seed"),
])
def test_bad_settings_are_named(settings_, message):
    with pytest.raises(ValueError, match=message):
        Device(**settings_)


def test_block_level_errors_and_rollback():
    block = DenseHopfield([4, 3], T1=5)
    with pytest.raises(ValueError, match=r"unknown device setting\(s\) \['bits'\]"):
        block.configure(device={"bits": 4})
    with pytest.raises(ValueError, match="DenseHopfield: .*relax_dtype=None"):
        DenseHopfield([4, 3], relax_dtype=torch.bfloat16).configure(device=Device(adc_bits=4))
    with pytest.raises(ValueError, match="read_noise must be"):
        block.configure(T1=9, device={"read_noise": -1})
    assert block.T1 == 5 and block.device is None  # nothing changed
    with pytest.raises(ValueError, match="device must be"):
        block.device = "noisy"

    class Generic(EnergyBlock):
        def state_shapes(self, in_shape):
            return [in_shape]

        def phi(self, s, u):
            return (s[0] * u).sum(1)

    g = Generic([Logistic()], T1=3)
    with pytest.raises(ValueError, match="need a block with couplings"):
        g.configure(device=Device(read_noise=0.1))
    g.configure(device=Device(adc_bits=3))  # converters fit any block
    s, _ = g.relax(torch.randn(2, 4))
    assert torch.equal(s[0], quantize(s[0], 0.0, 1.0, 8))


def test_all_off_is_bit_identical_to_no_device():
    ref = small_model()
    losses = train(ref)
    for dev in (Device(), {"seed": 5, "noise": "multiplicative"}):
        model = small_model(dev)
        assert model.blocks[0].device is not None
        assert train(model) == losses
        for (n, p), q in zip(ref.named_parameters(), model.parameters()):
            assert torch.equal(p, q), n


def test_seeded_and_reproducible():
    dev = Device(read_noise=0.1, program_noise=0.05, adc_bits=5)
    a, b = train(small_model(dev)), train(small_model(dev))
    assert a == b
    c = train(small_model(Device(read_noise=0.1, program_noise=0.05, adc_bits=5, seed=1)))
    assert c != a


def converged_block(dev):
    torch.manual_seed(0)
    block = DenseHopfield([5, 6, 4], activation="sigmoid", alpha=0.5, T1=300, device=dev)
    return block


def test_step_noise_is_shared_by_the_phases_of_a_step():
    """resample='step': the free equilibrium is a fixed point of the relaxations that follow it
    in the same step (the nudged phases see the same weights); 'relaxation' draws anew."""
    u = torch.randn(3, 5)
    for resample, same in (("step", True), ("relaxation", False)):
        block = converged_block(Device(read_noise=0.2, resample=resample))
        with torch.no_grad():
            block(u)
        s, _ = block.relax(u, T=300)  # the free phase of a relaxation alone
        again, stats = block.relax(u, s0=s, T=1, tol=None)
        assert (stats.residual < 1e-6) == same, (resample, stats.residual)
    # a new forward (a new step) draws new weights
    block = converged_block(Device(read_noise=0.2))
    with torch.no_grad():
        out1, out2 = block(u), block(u)
    assert not torch.equal(out1, out2)


@settings(max_examples=15, deadline=None)
@given(levels=st.integers(2, 40), g_max=st.floats(0.2, 3.0), seed=st.integers(0, 100))
def test_range_and_levels_are_the_ideal_block_on_stored_weights(levels, g_max, seed):
    torch.manual_seed(seed)
    dev = Device(g_max=g_max, levels=levels)
    block = DenseHopfield([5, 6, 4], activation="sigmoid", alpha=2.0, T1=10, device=dev)
    ideal = copy.deepcopy(block)
    ideal.device = None
    with torch.no_grad():
        for c in ideal.couplings:
            g = g_max / c.weight.shape[1] ** 0.5
            c.linear.weight.copy_(quantize(c.weight, -g, g, levels))
            distinct = torch.unique(c.linear.weight).numel()
            assert distinct <= levels
    u = torch.randn(4, 5)
    s_dev, _ = block.relax(u)
    s_ideal, _ = ideal.relax(u)
    for a, b in zip(s_dev, s_ideal):
        assert torch.allclose(a, b, atol=1e-6)


def test_converters_quantise_input_current_and_states():
    torch.manual_seed(0)
    block = DenseHopfield([5, 6, 4], activation="sigmoid", T1=20, device=Device(dac_bits=3, adc_bits=4,
                                                                                dac_range=2.0))
    ideal = copy.deepcopy(block)
    ideal.device = None
    u = 3 * torch.randn(4, 5)
    s, _ = block.relax(u)
    uq = quantize(u, -2.0, 2.0, 8)
    assert torch.unique(uq).numel() <= 8
    s_ideal, _ = ideal.relax(uq)
    for a, b in zip(s, s_ideal):
        assert torch.allclose(a, quantize(b, 0.0, 1.0, 16), atol=1e-6)
        assert torch.allclose(a * 15, (a * 15).round(), atol=1e-4)


def test_writes_asymmetry_drift_and_range():
    torch.manual_seed(0)
    dev = Device(asymmetry=0.5, drift=0.1)
    block = DenseHopfield([4, 3], T1=5, device=dev)
    w = block.couplings[0].linear.weight
    opt = torch.optim.SGD([w], lr=1.0)
    attach_device_writes(opt, block)
    old = w.detach().clone()
    grad = torch.randn_like(w)
    w.grad = grad.clone()
    opt.step()
    delta = -grad
    expect = old * 0.9 + torch.where(delta > 0, 1.5 * delta, 0.5 * delta)
    assert torch.allclose(w, expect, atol=1e-6)
    # a range: the written weights stay inside +-g_max / sqrt(fan_in)
    block.device = Device(g_max=0.5)
    opt = torch.optim.SGD([w], lr=10.0)
    attach_device_writes(opt, block)
    w.grad = torch.randn_like(w)
    opt.step()
    assert w.abs().max() <= 0.5 / 2 + 1e-7


def test_program_noise_acts_only_on_written_weights():
    dev = Device(program_noise=0.1)
    w_old = torch.randn(3, 4)
    new = w_old.clone()
    new[0] += 0.1
    out = dev.write(w_old, new, torch.Generator().manual_seed(0))
    assert torch.equal(out[1:], w_old[1:]) and not torch.allclose(out[0], new[0])


def test_bptt_and_ep_train_through_the_device():
    dev = Device(read_noise=0.05, levels=65, g_max=2.0, dac_bits=6, adc_bits=8)
    for algo in ("ep", "bptt"):
        model = small_model(dev)
        model.set_estimator(algo)
        before = [p.detach().clone() for p in model.blocks[0].parameters()]
        losses = train(model, steps=2)
        assert all(torch.isfinite(torch.tensor(losses)))
        assert any(not torch.equal(a, b) for a, b in zip(before, model.blocks[0].parameters())), algo


def test_config_key_model_device():
    cfg = load_config("fmnist_cpu", ["model.device={read_noise: 0.02, adc_bits: 6}", "model.omega=1"])
    info = {"num_classes": 10, "kind": "image", "shape": (1, 28, 28)}
    model = build_model(cfg, info)
    assert all(b.device == Device(read_noise=0.02, adc_bits=6) for b in model.blocks)
    with pytest.raises(ConfigError, match="model.device.*adc_bits"):
        build_model(load_config("fmnist_cpu", ["model.device={adc_bits: 0}", "model.omega=1"]), info)
    # over-relaxation and Anderson mixing are numerical solvers: a device model asks for plain sweeps
    with pytest.raises(ConfigError, match="not circuits.*omega=1"):
        build_model(load_config("fmnist_cpu", ["model.device={read_noise: 0.02}"]), info)  # the demo over-relaxes
    with pytest.raises(ConfigError, match="not circuits.*anderson=0"):
        build_model(load_config("fmnist_cpu", ["model.device={read_noise: 0.02}", "model.omega=1",
                                               "model.anderson=5"]), info)
    assert make_device(None) is None


def test_no_device_path_unchanged_by_an_unused_device_module():
    """A block never given a device keeps its own analytical step (no stepper is built)."""
    block = DenseHopfield([4, 5, 3], T1=10)
    u = torch.randn(2, 4)
    calls = []
    orig = block.preactivations

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    block.preactivations = spy
    block.relax(u)
    assert len(calls) == 20  # two parities per sweep, all through the block's own step
    assert isinstance(block, nn.Module)


def test_writes_refuse_computed_weights():
    from eqprop.binary import binarize_weights

    model = small_model()
    binarize_weights(model)
    model.configure_blocks(device=Device(read_noise=0.1, adc_bits=4))  # reads and converters are fine
    opt = torch.optim.Adam(model.parameters())
    assert attach_device_writes(opt, model) == []
    model.configure_blocks(device=Device(program_noise=0.1))
    with pytest.raises(ValueError, match="weights are computed"):
        attach_device_writes(opt, model)


def test_study_hardware_command(tmp_path, capsys):
    from eqprop.cli import main
    from test_training_helpers import write_fashion_mnist

    data = write_fashion_mnist(tmp_path / "data", n_train=60, n_test=20)
    out = tmp_path / "study"
    assert main(["study", "hardware", "--only", "adc_bits", "--rules", "ep", "--limit-train", "50",
                 "--limit-test", "20", "--data-dir", str(data), "--out", str(out), "--threads", "1"]) == 0
    result = __import__("json").loads((out / "hardware.json").read_text())
    assert {(r["setting"], r["strength"]) for r in result["runs"]} == {("ideal", None), *(("adc_bits", b) for b in
                                                                                         (8, 4, 3, 2))}
    assert (out / "hardware.png").stat().st_size > 1000 and "| adc_bits | 2 |" in (out / "hardware.md").read_text()
    assert main(["study", "hardware", "--only", "bits", "--data-dir", str(data), "--out", str(out)]) == 2
    assert "unknown setting(s) ['bits']" in capsys.readouterr().err


def test_a_resumed_run_may_change_the_device():
    from eqprop.training.config import check_resume

    saved = load_config("fmnist_cpu", ["model.device={read_noise: 0.02}"])
    changes = check_resume(saved, load_config("fmnist_cpu", ["model.device={read_noise: 0.05, adc_bits: 4}"]))
    assert {c[0] for c in changes} == {"model.device.read_noise", "model.device.adc_bits"}
    with pytest.raises(ConfigError, match="model.T2|model.slope"):
        check_resume(saved, load_config("fmnist_cpu", ["model.slope=0.5"]))


@pytest.mark.parametrize("mode", ["additive", "multiplicative"])
def test_read_noise_forms(mode):
    w = torch.randn(5, 16)
    n = torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
    read = Device(read_noise=0.1, noise=mode).read(w, torch.Generator().manual_seed(3))
    expect = w + 0.1 * n / 4 if mode == "additive" else w * (1 + 0.1 * n)  # fan_in 16: unit 1/4
    assert torch.allclose(read, expect)
    absolute = Device(read_noise=0.1, g_unit="absolute").read(w, torch.Generator().manual_seed(3))
    assert torch.allclose(absolute, w + 0.1 * n)
