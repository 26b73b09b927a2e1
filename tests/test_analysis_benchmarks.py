"""The benchmark suite's parts (benchmarks/) at tiny sizes."""
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from torch.utils.flop_counter import FlopCounterMode

from eqprop.analysis.splitting import sweep_flops

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    """The benchmark package (benchmarks/ at the repository root), imported as `make bench` runs it."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import common, memory, relax, run
    finally:
        sys.path.remove(str(ROOT))
    return {"common": common, "memory": memory, "relax": relax, "run": run}


@pytest.mark.parametrize("name", ["L6", "L12"])
def test_analytic_flops_match_torch_flop_counter(bench, name):
    common = bench["common"]
    model = common.build(name, 16, "cpu")
    x, _ = common.batch(2, "cpu")
    us = common.block_inputs(model, x)
    assert len(us) == len(model.blocks)
    for block, u in zip(model.blocks, us):
        block.configure(update="sync")
        with FlopCounterMode(display=False) as counter:
            block.relax(u, T=3, tol=None)
        assert counter.get_total_flops() == 3 * sweep_flops(block, tuple(u.shape[1:]), u.shape[0])


def test_benchmark_models_are_the_published_splits(bench):
    common = bench["common"]
    l6 = common.build("L6", 8, "cpu")
    # L = 6 cut into 2 blocks, widths / 8: convs 16 -> 32 -> 32 in block 1; 64 -> 64 at 2x2, then
    # dense 64 x 2 x 2 -> 32 in block 2
    assert [tuple(c.weight.shape) for b in l6.blocks for c in b.couplings] == [
        (32, 16, 3, 3), (32, 32, 3, 3), (64, 64, 3, 3), (32, 256)]
    assert [(b.T1, b.update, b.estimator.beta, b.estimator.T2) for b in l6.blocks] == [(60, "async", 0.2, 20)] * 2
    l12 = common.build("L12", 16, "cpu", estimator="bptt", T2=3)
    assert [b.num_layers for b in l12.blocks] == [2] * 6
    assert {(b.T1, b.estimator.name, b.estimator.T2) for b in l12.blocks} == {(15, "bptt", 3)}


def test_step_memory_grows_with_T2_for_bptt_and_not_for_ep(bench):
    """Each case in a fresh process, as the memory part runs them (the three at once)."""
    memory = bench["memory"]
    cases = [("bptt", 2), ("bptt", 20), ("ep", 20)]
    spec = {"model": "L12", "batch": 4, "div": 16, "device": "cpu", "threads": 1}
    with ThreadPoolExecutor(len(cases)) as pool:
        outs = list(pool.map(lambda c: memory.run_case({**spec, "estimator": c[0], "T2": c[1]}), cases))
    peak = {c: out["peak_mib"] for c, out in zip(cases, outs)}
    # BPTT keeps every unrolled step for its backward: at least the states of the 12 layers
    # (4 x (4 x 8 x 16 x 16 + 4 x 16 x 8 x 8 + 4 x 32 x 4 x 4) floats = 0.22 MiB) per step
    states_mib = 4 * (4 * 8 * 256 + 4 * 16 * 64 + 4 * 32 * 16) * 4 / 2 ** 20
    assert peak["bptt", 20] - peak["bptt", 2] > 18 * states_mib, peak
    # EP's nudged phases keep nothing per step: 20 of them need less than 2 unrolled BPTT steps
    assert peak["ep", 20] < peak["bptt", 2], peak
    assert all(out["total_peak_mib"] > out["peak_mib"] for out in outs)


def test_relax_part_counts_the_couplings_flops(bench):
    rows = bench["relax"].part_relax(["L12"], [2], 32, "cpu", 1, False, 2)
    assert [(r["update"], r["dtype"], r["layout"]) for r in rows] == [
        (u, d, layout) for u in ("sync", "async") for d in ("float32", "bfloat16")
        for layout in ("nchw", "channels_last")]
    # widths / 32: one 3x3 conv inside each of the 6 blocks, 36864 multiply-adds per sample each
    # (4 -> 4 at 16x16, 8 -> 8 at 8x8, 16 -> 16 at 4x4); map and adjoint, 2 FLOPs each, batch 2, 2 sweeps
    assert {r["flop_per_relax"] for r in rows} == {6 * 36864 * 2 * 2 * 2 * 2}
    assert all(r["sweeps"] == 2 and r["gflops"] == pytest.approx(r["flop_per_relax"] / r["seconds"] / 1e9)
               for r in rows)


def test_step_part_writes_json_and_markdown(bench, tmp_path):
    rc = bench["run"].main(["--quick", "--parts", "step", "--models", "L12", "--batch", "2", "--out", str(tmp_path),
                            "--tag", "t"])
    assert rc == 0
    res = json.loads((tmp_path / "t.json").read_text())
    assert set(res) == {"meta", "step"}
    assert [r["estimator"] for r in res["step"]] == ["ep", "id", "bptt"]
    ep, ident, bptt = res["step"]
    # no tolerance: every block runs T1 = 15 free steps, EP T2 = 5 steps per nudged phase
    assert ep["iters"] == [{"free": 15, "nudged+": 5, "nudged-": 5}] * 6
    assert bptt["iters"] == [{"free": 15}] * 6
    assert all(set(b) == {"free", "adjoint"} and b["free"] == 15 for b in ident["iters"])
    assert all(r["batch"] == 2 and r["min_s"] <= r["median_s"] and len(r["times_s"]) == 1 for r in res["step"])
    md = (tmp_path / "t.md").read_text()
    assert "| L12 | 2 | ep | 15 | 5 |" in md and "vs bptt" in md


def test_unknown_part_is_refused(bench, tmp_path):
    main = bench["run"].main
    with pytest.raises(SystemExit, match="unknown part"):
        main(["--parts", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown part"):
        main(["--parts", "proposals", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown model"):
        main(["--models", "L7", "--out", str(tmp_path)])


@pytest.mark.slow
def test_quick_suite_runs(bench, tmp_path):
    assert bench["run"].main(["--quick", "--parts", "step,memory,relax,data", "--memory-T2", "2,4",
                              "--memory-models", "L12", "--relax-sweeps", "2", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "cpu.json").read_text())
    assert {"step", "memory", "relax", "data"} <= set(res)
    assert [(r["estimator"], r["T2"]) for r in res["memory"]] == [("ep", 2), ("ep", 4), ("bptt", 2), ("bptt", 4),
                                                                   ("id", None)]
    ep2, ep4, bptt2, bptt4, _ = (r["peak_mib"] for r in res["memory"])
    assert bptt4 > bptt2 and abs(ep4 - ep2) < 0.5 * (bptt4 - bptt2)
    assert 0 < res["data"][0]["share"] < 1
    assert (tmp_path / "cpu.md").read_text().count("| L12 |") >= 3


@pytest.mark.slow
def test_peak_part_runs(bench, tmp_path):
    assert bench["run"].main(["--quick", "--parts", "peak", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "cpu.json").read_text())
    dtypes = ("float32", "bfloat16")
    assert set(res["peak"]) == ({f"matmul_{d}" for d in dtypes}
                                | {f"conv_{d}_{layout}" for d in dtypes for layout in ("nchw", "channels_last")})
    assert res["peak"]["matmul_float32"]["size"] == 256 and res["peak"]["conv_float32_nchw"]["batch"] == 4
    assert res["peak_ref_gflops"]["float32"] == max(v["gflops"] for k, v in res["peak"].items() if "float32" in k)


def test_demo_search_table_names_changed_settings_overlaps_and_fidelity(tmp_path, capsys):
    """benchmarks/demo_search.py: one row per run folder, the settings that differ from the
    reference config (run-placement keys ignored), overlapping runs, and the lowest monitored cosines."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import demo_search
    finally:
        sys.path.remove(str(ROOT))
    from eqprop.training.config import load_config, to_yaml
    starts = {"a": "2026-01-01T10:00:00+00:00", "b": "2026-01-01T10:01:00+00:00", "c": "2026-01-01T11:00:00+00:00"}
    overrides = {"a": ["optim.lr=0.006", "threads=1"], "b": ["model.slope=0.5", "out_dir=x"], "c": []}
    for name, over in overrides.items():
        d = tmp_path / name
        d.mkdir()
        (d / "config.yaml").write_text(to_yaml(load_config("fmnist_cpu", over)))
        trace = [{"step": 100, "fidelity_flat_cos": 0.99, "fidelity_worst_tensor_cos": 0.9},
                 {"step": 200, "fidelity_flat_cos": 0.98, "fidelity_worst_tensor_cos": 0.95}] if name == "a" else []
        (d / "metrics.jsonl").write_text(json.dumps({
            "epoch": 1, "test_top1": 85.5, "iters_free": 9.0, "iters_nudged+": 5.0, "iters_nudged-": 3.0,
            "train_time_s": 100.0, "eval_time_s": 20.0, "epoch_time_s": 120.0, "eq_block2_free_converged": 0.5,
            "trace": trace}) + "\n")
        (d / "run_info.json").write_text(json.dumps({"sessions": [
            {"started": starts[name], "torch_threads": 1, "world_size": 1}]}))
    assert demo_search.main([str(tmp_path)]) == 0
    rows = {line.split(" | ")[0][2:]: line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "optim.lr=0.006" in rows["a"] and "threads" not in rows["a"].split(" | ")[1]
    assert "model.slope=0.5" in rows["b"] and "out_dir" not in rows["b"]
    assert "(none)" in rows["c"] and rows["c"].endswith("| alone |")
    assert rows["a"].endswith("| 0.9800, 0.9000 | b |") and rows["b"].endswith("| - | a |")
    assert "| 50.0% |" in rows["a"] and "| 9.0 / 5.0 / 3.0 |" in rows["a"]
    (tmp_path / "c" / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match="no epoch finished"):
        demo_search.main([str(tmp_path)])


def test_ff_twin_is_the_first_sweep_and_trains(tmp_path):
    """benchmarks/ff_twin.py: with the ff-EBM's parameters the twin's output equals one
    asynchronous sweep of every block from zero (T1 = 1, odd layers first), and its command
    trains on Fashion-MNIST files and writes its epochs."""
    import torch

    from eqprop.chain import conv_ffebm
    from test_training_helpers import write_fashion_mnist
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import ff_twin
    finally:
        sys.path.remove(str(ROOT))
    torch.manual_seed(0)
    blocks = [{"channels": [1, 4, 4], "pools": "m-"}, {"channels": [4, 6, 5], "pools": "mm"}]
    ebm = conv_ffebm(blocks, num_classes=3, in_size=8, slope=0.35, T1=1, tol=None, update="async", first="odd")
    net = ff_twin.twin({"kind": "conv", "blocks": blocks, "slope": 0.35}, 8, 3)
    with torch.no_grad():
        for a, b in zip(net.parameters(), ebm.parameters(), strict=True):
            a.copy_(b)
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(net(x), ebm(x))
    with pytest.raises(SystemExit, match="dense layers"):
        ff_twin.twin({"kind": "conv", "blocks": [{"channels": [1, 4], "pools": "m", "fc": [8]}]}, 8, 3)

    root = write_fashion_mnist(tmp_path / "data", n_train=64, n_test=16)
    out = tmp_path / "twin.json"
    assert ff_twin.main(["fmnist_demo", "epochs=2", "batch_size=16", "eval_batch_size=16", "--data-dir", str(root),
                         "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [e["epoch"] for e in res["epochs"]] == [1, 2] and all(0 <= e["test_top1"] <= 100 for e in res["epochs"])
    assert res["overrides"] == ["epochs=2", "batch_size=16", "eval_batch_size=16"] and res["parameters"] > 0
    rows = ff_twin.table(tmp_path).splitlines()
    top1 = " / ".join(f"{e['test_top1']:.2f}" for e in res["epochs"])
    assert len(rows) == 3 and rows[2].startswith("| twin | fmnist_demo: `epochs=2`, ") and f"| {top1} |" in rows[2]
    with pytest.raises(SystemExit, match="no result files"):
        ff_twin.table(tmp_path / "data")


def test_step_variants_side_by_side(tmp_path):
    """benchmarks/step.py's side-by-side part: every variant timed, its gradient compared with
    the first's (a variant against itself: cosine 1), the bfloat16 relaxation close to float32."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import step
    finally:
        sys.path.remove(str(ROOT))
    variants = ["f32_cl_tol1e-5_ep1e-4_mirror", "bf16_cl_tol1e-5_ep1e-4_mirror", "f32_cl_tol1e-5_ep1e-4_mirror"]
    rows = step.part_variants(["L12"], variants, n=2, repeats=1, div=16)
    assert [r["variant"] for r in rows] == variants and all(r["cpu_median_s"] > 0 for r in rows)
    assert rows[2]["cos_to_first"] > 0.999999 and rows[1]["cos_to_first"] > 0.9
    assert rows[1]["relax_dtype"] == "bfloat16" and len(rows[1]["iters_timed"]) == 1
    assert "| L12 | bf16_cl_tol1e-5_ep1e-4_mirror |" in step.markdown_variants(rows)
