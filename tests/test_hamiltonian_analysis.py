"""`eqprop analyze rhel` on tiny sizes: files written, gradients agree, memory behaves."""
import argparse
import json

import pytest

from eqprop.analysis import rhel


def _args(tmp_path, *extra):
    parser = argparse.ArgumentParser()
    rhel.add_arguments(parser)
    return parser.parse_args(["--hidden", "4", "--state-size", "6", "--batch", "2", "--features", "2",
                              "--num-classes", "3", "--eps-length", "12", "--eps", "1e-2", "1e-4",
                              "--lengths", "5", "20", "--memory-lengths", "40", "160", "--repeats", "1",
                              "--threads", "1", "--dtype", "float64", "--out", str(tmp_path), *extra])


def test_analyze_rhel_writes_tables_and_measures_memory(tmp_path):
    assert rhel.run(_args(tmp_path, "--length-eps", "1e-4")) == 0
    res = json.loads((tmp_path / "rhel.json").read_text())
    assert (tmp_path / "rhel.png").stat().st_size > 0 and "| eps |" in (tmp_path / "rhel.md").read_text()
    for kind in ("linear", "nonlinear"):
        r = res["kinds"][kind]
        assert r["eps"]["rows"][-1]["max_rel_error"] < 1e-6 and r["eps"]["rows"][-1]["min_cosine"] > 0.999999
        assert all(row["max_rel_error"] < 1e-6 for row in r["length"]["rows"])
        short, long = r["memory"]
        # RHEL holds nothing beyond inputs/outputs that grows with length; BPTT does
        assert long["rhel"]["beyond_io_bytes"] <= short["rhel"]["beyond_io_bytes"] + 1024
        assert long["bptt"]["beyond_io_bytes"] > 3 * short["bptt"]["beyond_io_bytes"] > 0


def test_analyze_rhel_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="eps"):
        rhel.run_analysis(_args(tmp_path, "--eps", "0"))
    with pytest.raises(ValueError, match="batch"):
        rhel.run_analysis(_args(tmp_path, "--batch", "0"))
