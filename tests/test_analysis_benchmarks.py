"""The benchmark suite's pieces (benchmarks/run.py) at tiny sizes."""
import importlib.util
import json
from pathlib import Path

import pytest
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("eqprop_benchmarks", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["L6", "L12"])
def test_analytic_flops_match_torch_flop_counter(bench, name):
    model = bench.build(name, 16, "cpu")
    x, _ = bench.batch(2, "cpu")
    us = bench.block_inputs(model, x)
    assert len(us) == len(model.blocks)
    for block, u in zip(model.blocks, us):
        block.update = "sync"
        with FlopCounterMode(display=False) as counter:
            block.relax(u, T=3, tol=None)
        assert counter.get_total_flops() == 3 * bench.coupling_flops(block, u)


def test_scaled_models_keep_the_image_channels(bench):
    spec = bench.scaled_blocks(bench.MODELS["L6"]["blocks"], 8)
    assert spec == [{"channels": [3, 16, 32, 32], "pools": "mmm"},
                    {"channels": [32, 64, 64], "pools": "m-", "fc": [32]}]
    assert sum(b.num_layers for b in bench.build("L12", 16, "cpu").blocks) == 12


def test_memory_case_reports_a_step_peak(bench):
    out = bench.memory_case({"model": "L12", "batch": 2, "estimator": "bptt", "T2": 2, "div": 32, "device": "cpu"})
    assert out["peak_mib"] >= 0 and out["total_peak_mib"] > out["peak_mib"] and out["seconds"] > 0


def test_step_part_writes_json_and_markdown(bench, tmp_path):
    rc = bench.main(["--quick", "--parts", "step", "--models", "L12", "--batch", "2", "--out", str(tmp_path),
                     "--tag", "t"])
    assert rc == 0
    res = json.loads((tmp_path / "t.json").read_text())
    assert [r["estimator"] for r in res["step"]] == ["ep", "id", "bptt"]
    assert all(r["min_s"] > 0 and r["batch"] == 2 for r in res["step"])
    md = (tmp_path / "t.md").read_text()
    assert "| L12 | 2 | ep | 15 | 5 |" in md and "vs bptt" in md


def test_unknown_part_is_refused(bench, tmp_path):
    with pytest.raises(SystemExit, match="unknown part"):
        bench.main(["--parts", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown model"):
        bench.main(["--models", "L7", "--out", str(tmp_path)])


@pytest.mark.slow
def test_quick_suite_runs(bench, tmp_path):
    assert bench.main(["--quick", "--memory-T2", "2,4", "--memory-models", "L12", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "cpu.json").read_text())
    assert {"peak", "step", "memory", "relax"} <= set(res)
    assert [(r["estimator"], r["T2"]) for r in res["memory"]] == [("ep", 2), ("ep", 4), ("bptt", 2), ("bptt", 4),
                                                                   ("id", None)]
    assert (tmp_path / "cpu.md").read_text().count("| L12 |") >= 3
