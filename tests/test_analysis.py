"""Static gradient analysis (SPEC §5) and the splitting study."""
import json

import pytest
import torch
import torch.nn.functional as F

from eqprop.analysis import gdd, splitting
from eqprop.chain import conv_ffebm
from eqprop.cli import main

# A 3-block conv ff-EBM small enough for tests (8x8 inputs, a max-pool inside the first block).
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
            assert q["cosine"][0] is None and q["rel_error"][0] == 0.0  # t = 0: both are zero
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
                err = float((p.grad - ref[name]).norm() / p.grad.norm())
                assert err < 1e-9, (source, block.block_name, name, err)


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
        gdd.build_model("nope")


def test_gdd_command_writes_figure_and_json(tmp_path, monkeypatch):
    monkeypatch.setitem(gdd.MODELS, "tiny", dict(blocks=BLOCKS, in_size=8, num_classes=5, init="kaiming",
                                                 variance=1.0, alpha=0.99, slope=4.0, batch=2, beta=1e-4, T2=5))
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
    assert splitting.default_splits(6) == [1, 2, 3]
    with pytest.raises(ValueError, match="only dense"):
        splitting.split_dhn(dhn, 6)
    with pytest.raises(ValueError, match="cannot split"):
        splitting.split_dhn(dhn, 0)
    with pytest.raises(ValueError, match="divisor"):
        splitting.scale_width(dhn, 0)


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
        assert len(s["free_iters"]) == s["blocks"] and s["free_iters_total"] == sum(s["free_iters"])
        assert all(i >= 1 for i in s["free_iters"]) and s["nudged_iters_total"] >= 2 * s["blocks"]
        assert s["relax_time_s"] > 0 and s["step_time_s"] > 0
        assert -1.0 <= s["cos_ep_id"] <= 1.0
    assert "| 3 | 2+2+2 |" in (tmp_path / "splitting.md").read_text()
    assert (tmp_path / "splitting.png").stat().st_size > 10_000
