"""Static gradient analysis (docs/theory.md, "Static gradient analysis") and the splitting study."""
import json

import pytest
import torch
import torch.nn.functional as F

from eqprop import ConvHopfield
from eqprop.analysis import gdd, splitting
from eqprop.analysis.common import block_inputs, synthetic_images
from eqprop.chain import conv_ffebm
from eqprop.cli import main
from eqprop.testing import rel_error

# A 6-layer DHN cut into a 3-block conv ff-EBM small enough for tests (8x8 inputs, a max-pool
# inside the first block).
TINY_DHN = {"channels": [3, 4, 6, 6, 8, 8], "pools": "-m---", "fc": [6]}
BLOCKS = [{"channels": [3, 4, 6], "pools": "-m"},
          {"channels": [6, 6, 8], "pools": "--"},
          {"channels": [8, 8], "pools": "-", "fc": [6]}]


def _model(activation: str, slope: float) -> torch.nn.Module:
    torch.manual_seed(0)
    m = conv_ffebm(BLOCKS, in_size=8, num_classes=5, activation=activation, slope=slope, init="kaiming",
                   alpha=0.99, update="async", T1=2000, tol=1e-12)
    return m.double().train()


def _batch():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(3, 3, 8, 8, generator=gen, dtype=torch.float64), torch.randint(0, 5, (3,), generator=gen)


@pytest.mark.parametrize("activation,slope", [("sigmoid", 4.0), ("hardsigmoid", 1.0)])
def test_ep_transient_matches_truncated_bptt_float64(activation, slope):
    model = _model(activation, slope)
    x, y = _batch()
    T2 = 12
    r = gdd.analyze(model, x, y, beta=1e-5, T2=T2)
    assert [b.update for b in model.blocks] == ["async"] * 3, "analysis must restore the blocks' update mode"
    assert len(r["blocks"]) == 3
    moving = False
    for b in r["blocks"]:
        assert b["free"]["converged"] and b["free"]["fixed_point_residual"] < 1e-10
        assert len(b["layers"]) == 2 and len(b["params"]) == 2
        assert not any(b["switches_at_T2"]["pool_argmax"].values())
        assert not any(b["switches_at_T2"]["hardsigmoid_regime"].values())
        for q in b["layers"] + b["params"]:
            # t = 0: both are exactly zero, which eqprop.testing counts as identical
            assert q["cosine"][0] == 1.0 and q["rel_error"][0] == 0.0 and q["ep_norm"][0] == 0.0
            assert len(q["rel_error"]) == T2 + 1 and q["bptt_norm"][-1] > 0
            assert q["final_rel_error"] <= 1e-3, (q["name"], q["final_rel_error"])
            # every step, also before the error current has reached the layer (both exactly zero)
            assert all(e is not None and e <= 1e-3 for e in q["rel_error"]), (q["name"], q["rel_error"])
        for q in b["layers"]:
            first, last = q["bptt"][1], q["bptt"][-1]
            moving |= any(abs(a - z) > 0.1 * abs(z) for a, z in zip(first, last))
    assert r["blocks"][0]["switches_at_T2"]["pool_argmax"] == {"coupling1": 0}
    assert moving, "the transient is trivial: the curves do not move after the first step"


def test_large_beta_is_measurably_off():
    model = _model("sigmoid", 4.0)
    x, y = _batch()
    r = gdd.analyze(model, x, y, beta=2.0, T2=8, delta_source="ep")
    assert r["summary"]["max_layer_rel_error"] > 1e-3


def test_final_gradients_are_the_estimators_gradients():
    """At t = T2 the BPTT curve is the `bptt` estimator's gradient and the EP curve (driven
    by EP's own error currents) is the `ep` estimator's gradient, for every block parameter."""
    model = _model("sigmoid", 4.0)
    x, y = _batch()
    T2, beta = 6, 1e-3
    for source, est, kw in [("bptt", "bptt", {"T2": T2}), ("ep", "ep", {"T2": T2, "beta": beta})]:
        r = gdd.analyze(model, x, y, beta=beta, T2=T2, delta_source=source, keep_tensors=True)
        model.configure_blocks(update="sync").set_estimator(est, **kw)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        model.configure_blocks(update="async")
        for block in model.blocks:
            final = r["tensors"][block.block_name]
            ref = final.params_bptt if est == "bptt" else final.params_ep
            for name, p in block.named_parameters():
                err = rel_error(ref[name], p.grad)
                assert err < 1e-9, (source, block.block_name, name, err)


def test_switches_count_pool_argmax_and_hardsigmoid_regime_changes():
    block = ConvHopfield([1, 1], pools="m", in_size=2, activation="hardsigmoid")
    with torch.no_grad():
        block.couplings[0].conv.weight.zero_()
        block.couplings[0].conv.weight[0, 0, 1, 1] = 1.0  # the identity: the pool picks the largest pixel
    a = [torch.tensor([[[[0.9, 0.1], [0.2, 0.3]]]]), torch.tensor([[[[0.5]]]])]
    b = [torch.tensor([[[[0.1, 0.9], [0.2, 0.3]]]]), torch.tensor([[[[1.5]]]])]
    assert gdd.switches(block, a, b) == {"pool_argmax": {"coupling1": 1},
                                         "hardsigmoid_regime": {"layer1": 0, "layer2": 1}}
    assert gdd.switches(block, a, a) == {"pool_argmax": {"coupling1": 0},
                                         "hardsigmoid_regime": {"layer1": 0, "layer2": 0}}


def test_gdd_rejects_bad_settings():
    model = _model("sigmoid", 1.0)
    x, y = _batch()
    with pytest.raises(ValueError, match="beta"):
        gdd.analyze(model, x, y, beta=0.0, T2=3)
    with pytest.raises(ValueError, match="T2"):
        gdd.analyze(model, x, y, beta=0.1, T2=0)
    with pytest.raises(ValueError, match="delta_source"):
        gdd.analyze(model, x, y, beta=0.1, T2=3, delta_source="id")
    with pytest.raises(ValueError, match="unknown model"):
        gdd.gdd_model("nope")
    with pytest.raises(ValueError, match="variance"):
        gdd.gdd_model("cpu", variance=0.0)


def test_gdd_models_are_the_published_split_at_their_width():
    model, cfg = gdd.gdd_model("cpu")
    assert cfg["variance"] == splitting.GOE_V
    # widths / 8: conv 16 -> 32 and 32 -> 64 inside the first two blocks, dense 64 x 2 x 2 -> 32 in the last
    assert [tuple(c.weight.shape) for b in model.blocks for c in b.couplings] == [(32, 16, 3, 3), (64, 32, 3, 3),
                                                                                 (32, 256)]
    assert [b.update for b in model.blocks] == ["sync"] * 3


def test_gdd_command_writes_figure_and_json(tmp_path, monkeypatch):
    monkeypatch.setitem(gdd.MODELS, "tiny", dict(dhn=TINY_DHN, n_blocks=3, width_div=1, in_size=8, num_classes=5,
                                                 init="kaiming", variance=1.0, alpha=0.99, slope=4.0, batch=2,
                                                 beta=1e-4, T2=5))
    rc = main(["analyze", "gdd", "--model", "tiny", "--activation", "sigmoid", "--dtype", "float64",
               "--out", str(tmp_path)])
    assert rc == 0
    stem = "gdd_tiny_sigmoid_float64_beta0.0001"
    r = json.loads((tmp_path / f"{stem}.json").read_text())
    assert (tmp_path / f"{stem}.png").stat().st_size > 10_000
    assert r["T2"] == 5 and r["beta"] == 1e-4 and len(r["blocks"]) == 3
    assert r["summary"]["max_layer_rel_error"] < 1e-3
    assert all(len(q["ep"]) == 6 for b in r["blocks"] for q in b["layers"])


def test_analyze_unknown_analysis_is_refused():
    with pytest.raises(SystemExit):
        main(["analyze", "nope"])


# --- splitting -----------------------------------------------------------------------

def test_split_dhn_gives_the_published_chains():
    dhn = splitting.DHN_L6
    assert splitting.num_layers(dhn) == 6
    assert splitting.split_dhn(dhn, 1) == [dhn]
    assert splitting.split_dhn(dhn, 2) == [{"channels": [3, 128, 256, 256], "pools": "mmm"},
                                           {"channels": [256, 512, 512], "pools": "m-", "fc": [256]}]
    assert splitting.split_dhn(dhn, 3) == [{"channels": [3, 128, 256], "pools": "mm"},
                                           {"channels": [256, 256, 512], "pools": "mm"},
                                           {"channels": [512, 512], "pools": "-", "fc": [256]}]
    assert splitting.split_dhn(TINY_DHN, 3) == BLOCKS
    assert splitting.default_splits(6) == [1, 2, 3]
    with pytest.raises(ValueError, match="only dense"):
        splitting.split_dhn(dhn, 6)
    with pytest.raises(ValueError, match="cannot split"):
        splitting.split_dhn(dhn, 0)
    with pytest.raises(ValueError, match="divisor"):
        splitting.scale_width(dhn, 0)


def test_l12_split_is_the_scaling_chain():
    assert splitting.num_layers(splitting.DHN_L12) == 12
    assert splitting.split_dhn(splitting.DHN_L12, 6) == [
        {"channels": [3, 128, 128], "pools": "m-"}, {"channels": [128, 128, 128], "pools": "--"},
        {"channels": [128, 256, 256], "pools": "m-"}, {"channels": [256, 256, 256], "pools": "--"},
        {"channels": [256, 512, 512], "pools": "m-"}, {"channels": [512, 512, 512], "pools": "--"}]
    # widths divided, the image channels kept
    assert splitting.split_dhn(splitting.scale_width(splitting.DHN_L6, 8), 2) == [
        {"channels": [3, 16, 32, 32], "pools": "mmm"}, {"channels": [32, 64, 64], "pools": "m-", "fc": [32]}]


def test_dhn_model_is_seeded_and_split():
    a = splitting.dhn_model(splitting.DHN_L12, 6, width_div=32, seed=1)
    b = splitting.dhn_model(splitting.DHN_L12, 6, width_div=32, seed=1)
    assert [blk.num_layers for blk in a.blocks] == [2] * 6
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_sweep_flops_is_the_couplings_multiply_adds():
    # conv 2 -> 3 (3x3) at 4x4 then a 2x2 pool, dense 3*2*2 -> 4: 2*3*9*16 + 12*4 = 912 MACs per sample;
    # a sweep applies each coupling and its adjoint once, 2 FLOPs per multiply-add
    block = ConvHopfield([2, 3], pools="m", fc=[4], in_size=4)
    assert splitting.sweep_flops(block, (2, 4, 4), batch=5) == 2 * 2 * 5 * (2 * 3 * 9 * 16 + 3 * 2 * 2 * 4)
    with pytest.raises(ValueError, match="channels"):
        splitting.sweep_flops(block, (3, 4, 4), batch=1)


def test_block_inputs_are_the_currents_each_block_receives():
    model = splitting.dhn_model(splitting.DHN_L12, 6, width_div=32, T1=7)
    x, _ = synthetic_images(2, seed=5)
    us = block_inputs(model, x)
    assert [tuple(u.shape) for u in us] == [(2, 4, 16, 16), (2, 4, 16, 16), (2, 8, 8, 8), (2, 8, 8, 8),
                                            (2, 16, 4, 4), (2, 16, 4, 4)]
    assert all(b.T1 == 7 for b in model.blocks), "block_inputs must restore T1"
    with torch.no_grad():
        assert torch.equal(us[0], model[0](x))  # the first feedforward map of the input


def test_splitting_command(tmp_path):
    rc = main(["analyze", "splitting", "--splits", "1,3", "--width-div", "32", "--in-size", "16", "--batch", "2",
               "--tol", "1e-4", "--T1", "300", "--T2", "300", "--seeds", "1", "--repeats", "1",
               "--out", str(tmp_path)])
    assert rc == 0
    r = json.loads((tmp_path / "splitting.json").read_text())
    assert [s["blocks"] for s in r["splits"]] == [1, 3]
    one, three = r["splits"]
    assert one["layers_per_block"] == [6] and three["layers_per_block"] == [2, 2, 2]
    for s in r["splits"]:
        assert s["converged"] and s["id_converged"]
        assert len(s["free_iters"]) == s["blocks"] and s["free_iters_total"] == sum(s["free_iters"])
        assert all(i >= 1 for i in s["free_iters"]) and s["nudged_iters_total"] >= 2 * s["blocks"]
        assert s["free_gflop"] == pytest.approx(sum(i * f for i, f in zip(s["free_iters"], s["sweep_gflop"])))
        assert s["cos_ep_id"] > 0.9  # beta = 0.2, tolerance 1e-4: close to ID, not equal
        # a weight and a bias per coupling; a block of n layers has n - 1 couplings
        block_cos = [v for k, v in s["cos_ep_id_per_tensor"].items() if ".couplings." in k]
        assert len(block_cos) == 2 * (6 - s["blocks"]) and s["min_block_tensor_cos_ep_id"] == min(block_cos)
        assert {"relax_time_s", "relax_cpu_s", "step_time_s", "step_cpu_s"} <= set(s)
    # the one block holds every coupling of the DHN but the input map (width / 32, 16x16 input,
    # batch 2): convs 4->8 at 8x8 (pooled), 8->8 at 4x4 (pooled), 8->16 at 2x2 (pooled), 16->16 at
    # 1x1, then dense 16 -> 8
    macs = 4 * 8 * 9 * 64 + 8 * 8 * 9 * 16 + 8 * 16 * 9 * 4 + 16 * 16 * 9 * 1 + 16 * 8
    assert one["sweep_gflop"] == [pytest.approx(2 * 2 * 2 * macs / 1e9)]
    assert "| 3 | 2+2+2 |" in (tmp_path / "splitting.md").read_text()
    assert (tmp_path / "splitting.png").stat().st_size > 10_000


def test_a_bad_analysis_setting_is_a_one_line_user_error(tmp_path, capsys):
    from eqprop.cli import EXIT_USER_ERROR, main

    assert main(["analyze", "gdd", "--beta", "-1", "--out", str(tmp_path)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "gdd: beta must be a positive number, got -1.0" in err and "Traceback" not in err
