"""`eqprop analyze rhel` on tiny sizes: files written, gradients agree, memory behaves."""
import argparse
import json

import pytest
import torch

from eqprop.analysis import rhel


def _args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    rhel.add_arguments(parser)
    return parser.parse_args(["--hidden", "4", "--state-size", "6", "--batch", "2", "--features", "2",
                              "--num-classes", "3", "--eps-length", "12", "--eps", "1e-2", "1e-4",
                              "--lengths", "5", "20", "--memory-lengths", "64", "256", "--repeats", "1",
                              "--threads", "1", "--dtype", "float64", "--out", str(tmp_path), *extra])


def test_analyze_rhel_writes_tables_and_measures_memory(tmp_path):
    assert rhel.run(_args(tmp_path, "--length-eps", "1e-4")) == 0
    res = json.loads((tmp_path / "rhel.json").read_text())
    md = (tmp_path / "rhel.md").read_text()
    assert (tmp_path / "rhel.png").stat().st_size > 10_000
    first = [line.split(" | ")[0] for line in md.splitlines() if line.startswith("| ")]
    for case in ("| 0.01", "| 0.0001", "| 5", "| 20", "| 64", "| 256"):  # one row per case and kind
        assert first.count(case) == 2, (case, md)
    for kind in ("linear", "nonlinear"):
        r = res["kinds"][kind]
        large, small = r["eps"]["rows"]
        assert "input" in small["per_parameter"] and "head.weight" in small["per_parameter"]
        assert small["max_rel_error"] < 1e-6 and small["min_cosine"] > 0.999999
        assert all(row["max_rel_error"] < 1e-6 for row in r["length"]["rows"])
        short, long = r["memory"]
        # RHEL holds nothing beyond inputs/outputs that grows with length; BPTT does
        assert long["rhel"]["beyond_io_bytes"] <= short["rhel"]["beyond_io_bytes"] + 1024
        assert long["bptt"]["beyond_io_bytes"] > 3 * short["bptt"]["beyond_io_bytes"] > 0
    # the linear unit's centered echo is exact at any eps; the nonlinear one's error is second
    # order in eps (100 times smaller eps: 1e4 times smaller error)
    assert res["kinds"]["linear"]["eps"]["rows"][0]["max_rel_error"] < 1e-10
    large, small = res["kinds"]["nonlinear"]["eps"]["rows"]
    assert large["max_rel_error"] / small["max_rel_error"] == pytest.approx(1e4, rel=0.5)


def test_compare_gives_relative_error_and_cosine():
    ref = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([1.0, 0.0])}
    est = {"a": torch.tensor([3.0, 4.5]), "b": torch.tensor([0.0, 2.0])}
    out = rhel.compare(est, ref)
    assert out["a"]["rel_error"] == pytest.approx(0.5 / 5)
    assert out["a"]["cosine"] == pytest.approx((9 + 18) / (5 * 29.25 ** 0.5))
    assert out["b"] == {"rel_error": pytest.approx(5 ** 0.5), "cosine": 0.0}
    assert rhel.summary(out) == {"max_rel_error": out["b"]["rel_error"], "min_cosine": 0.0, "worst": "b",
                                 "median_rel_error": pytest.approx((0.1 + 5 ** 0.5) / 2)}


def test_analyze_rhel_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="eps"):
        rhel.run_analysis(_args(tmp_path, "--eps", "0"))
    with pytest.raises(ValueError, match="batch"):
        rhel.run_analysis(_args(tmp_path, "--batch", "0"))
