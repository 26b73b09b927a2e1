"""The per-step account (eqprop.analysis.account): MACs against torch's FLOP counter and the
analytical count of the relaxations, conversions, energy, the command and the trainer's log."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import eqprop
from eqprop.analysis.account import (
    DEFAULT_COSTS,
    ShapeRecorder,
    account_step,
    block_phases,
    sweep_macs,
    units,
)
from eqprop.cli import main
from eqprop.devices import Device
from eqprop.training.trainer import Trainer
from test_training_helpers import synthetic_images, tiny_config


def conv_model():
    torch.manual_seed(0)
    return eqprop.conv_ffebm([{"channels": [1, 4, 4], "pools": "m-"}, {"channels": [4, 6, 6, 5], "pools": "m--"}],
                             in_size=8, T1=5, tol=1e-3, init="kaiming", estimator_settings={"T2": 3})


def dense_model():
    torch.manual_seed(0)
    return eqprop.dense_ffebm(12, [[7, 5], [6, 4, 3]], num_classes=4, T1=6, estimator_settings={"T2": 2})


def measured_step(model, x, y):
    """One forward/backward under the FLOP counter and the shape recorder; the account."""
    with ShapeRecorder(model) as rec, FlopCounterMode(display=False) as fc:
        F.cross_entropy(model(x), y).backward()
    acct = account_step(model, rec.seen, block_phases(model), "adam")
    return acct, fc.get_flop_counts()


@pytest.mark.parametrize("make, x_shape", [(conv_model, (3, 1, 8, 8)), (dense_model, (5, 12))])
def test_macs_match_torch_flop_counter(make, x_shape):
    """Every top-level module: FLOPs counted by torch = 2 x the account's MACs, digital
    modules (forward and backward) and energy-based blocks (all phases and the update) alike."""
    model = make()
    x, y = torch.randn(*x_shape), torch.randint(0, 4, (x_shape[0],))
    acct, counts = measured_step(model, x, y)
    rows = {r.name: r for r in acct.rows}
    top = {}
    for r in acct.rows:
        if r.role != "optimizer":
            top.setdefault(r.name.split(" ")[0].split(".")[0], []).append(r)
    assert len(top) == len(model)
    for i, rs in top.items():
        torch_flops = sum(counts.get(f"FFEBM.{i}", {}).values())
        assert torch_flops == 2 * sum(r.macs for r in rs), (i, [r.name for r in rs])
    assert sum(r.macs for r in rows.values() if r.domain == "digital" and r.role != "optimizer") > 0


def test_block_macs_are_iterations_times_sweeps():
    model = conv_model()
    x, y = torch.randn(3, 1, 8, 8), torch.randint(0, 10, (3,))
    acct, _ = measured_step(model, x, y)
    for r, b, st in zip([r for r in acct.rows if r.role == "energy block"], model.blocks, model.relax_stats()):
        iters = sum(p["iters"] for p in st.values())
        assert set(r.iterations) == {"free", "nudged+", "nudged-"}
        per = 2 * sum(c.macs(s) for c, s in zip(b.couplings, b.state_shapes(
            tuple(next(v for k, v in _inputs(model, x).items() if k is b).shape[1:]))))
        assert r.sweep_macs == 3 * per
        assert r.macs == iters * r.sweep_macs + 2 * r.sweep_macs  # relaxations + the contrast's update


def _inputs(model, x):
    seen = {}
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.setdefault(m, a[0])) for b in model.blocks]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def test_conversions_bytes_and_energy():
    model = dense_model()
    model.blocks[1].configure(device=Device(adc_bits=5, dac_bits=3))
    x, y = torch.randn(5, 12), torch.randint(0, 4, (5,))
    acct, _ = measured_step(model, x, y)
    b1, b2 = [r for r in acct.rows if r.role == "energy block"]
    # 3 phases: the input current each time, the nudge on the output layer in the two second phases
    assert b1.dac == 5 * (7 * 3 + 5 * 2) and b1.adc == 5 * (7 + 5) * 3
    assert b2.dac == 5 * (6 * 3 + 3 * 2) and b2.adc == 5 * (6 + 4 + 3) * 3
    assert b1.writes == 7 * 5 + 5 and b1.converter_bits == 8 and b2.converter_bits == 5
    c = DEFAULT_COSTS
    expect = (c["analog_mac_pj"] * b2.macs + c["adc_pj_per_step"] * 32 * b2.adc + c["dac_pj_per_step"] * 8 * b2.dac
              + c["write_pj"] * b2.writes + c["memory_pj_per_byte"] * (b2.bytes_read + b2.bytes_written))
    assert b2.energy_pj == pytest.approx(expect)
    # the readout: forward reads weights and input, writes output; backward as stated in the module
    lin = next(r for r in acct.rows if r.role == "readout")
    assert lin.macs == 3 * 5 * 3 * 4 and lin.bytes_written == 4 * (5 * 4 + 5 * 3 + 3 * 4 + 4)
    zero = {k: 0.0 for k in DEFAULT_COSTS if k != "converter_bits"}
    seen_acct = account_step(model, _seen(model, x, y), block_phases(model), "sgd", costs={**zero,
                                                                                          "digital_mac_pj": 1.0})
    t = seen_acct.totals()
    assert t["energy_uj"] == pytest.approx(t["digital_macs"] * 1e-6) and t["analog_energy_uj"] == 0
    with pytest.raises(ValueError, match="unknown cost"):
        account_step(model, {}, {}, "adam", costs={"mac": 1.0})
    with pytest.raises(ValueError, match="analog_mac_pj must be"):
        account_step(model, {}, {}, "adam", costs={"analog_mac_pj": -1.0})
    with pytest.raises(ValueError, match="optimizer must be"):
        account_step(model, {}, {}, "lion")


def _seen(model, x, y):
    with ShapeRecorder(model) as rec:
        F.cross_entropy(model(x), y).backward()
    return rec.seen


def test_units_cover_every_module_once():
    model = conv_model()
    us = units(model)
    assert [u.name for u in us if u.is_block] == ["1 (block1)", "3 (block2)"]
    leaves = {id(m) for m in model.modules() if not list(m.children())}
    inside = {id(m) for b in model.blocks for m in b.modules()}
    assert {id(u.module) for u in us if not u.is_block} == leaves - inside
    assert sweep_macs(model.blocks[0], (4, 4, 4)) == 2 * 4 * 4 * 9 * 16


def test_account_command(tmp_path, capsys):
    out = tmp_path / "acct.json"
    assert main(["account", "fmnist_cpu", "--measure-batch", "2", "batch_size=8", "--json", str(out),
                 "--cost", "analog_mac_pj=0.1"]) == 0
    text = capsys.readouterr().out
    assert "| 1 (block1) | ConvHopfield (energy block) | analog |" in text and "per step (batch 8" in text
    data = json.loads(out.read_text())
    assert data["costs"]["analog_mac_pj"] == 0.1 and data["totals"]["analog_macs"] > 0
    assert main(["account", "fmnist_cpu", "--cost", "nope=1"]) == 2
    assert "unknown cost 'nope'" in capsys.readouterr().err


def test_trainer_logs_the_step_account(tmp_path):
    cfg = tiny_config(tmp_path, "epochs=1")
    Trainer(cfg, synthetic_images(32, seed=1), synthetic_images(16, seed=2, split="test"),
            echo=lambda _m: None).fit()
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("account_digital_macs", "account_analog_macs", "account_dac_conversions", "account_energy_uj"):
        assert rec[key] > 0, key


def test_recorder_ignores_evaluation_and_counts_calls():
    model = dense_model()
    x = torch.randn(5, 12)
    with ShapeRecorder(model) as rec:
        with torch.no_grad():
            model(torch.randn(9, 12))
        assert rec.seen == {}
        model(x)
        model(x)
    assert all(s.batch == 5 and s.calls == 2 for s in rec.seen.values())
    once = account_step(model, {k: dataclasses.replace(v, calls=1) for k, v in rec.seen.items()}, {}, "adam")
    twice = account_step(model, rec.seen, {}, "adam")
    lin = [(a, b) for a, b in zip(once.rows, twice.rows) if a.kind == "Linear"]
    assert lin and all(b.macs == 2 * a.macs for a, b in lin)
