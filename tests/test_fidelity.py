"""`eqprop analyze fidelity` and the trainer's monitoring (monitor_fidelity, log_every)."""
import argparse
import json

import pytest
import torch

from eqprop.analysis import fidelity
from eqprop.analysis.cli import build_parser
from eqprop.training.config import ConfigError
from eqprop.training.metrics import plot_curves, read_metrics
from eqprop.training.trainer import Trainer
from test_training_helpers import synthetic_images, tiny_config, write_fashion_mnist

TRAIN, TEST = synthetic_images(48, seed=1), synthetic_images(16, seed=2, split="test")
QUIET = dict(echo=lambda _m: None)
TINY = ["--width-div", "32", "--in-size", "16", "--batch", "2", "--T1", "8", "--T2", "3", "--threads", "1"]


def analyze(*argv: str) -> int:
    parser, module = build_parser("fidelity")
    return module.run(parser.parse_args(list(argv)))


def test_cli_writes_the_json_on_a_tiny_model(tmp_path):
    pytest.importorskip("matplotlib")
    assert analyze("--models", "dhn3", "--seeds", "1", "--betas", "0.2", "--pools", "free", "held",
                   "--variants", "centered", "positive", *TINY, "--out", str(tmp_path)) == 0
    result = json.loads((tmp_path / "fidelity.json").read_text())
    rows = result["models"]["dhn3"]["seeds"]
    assert len(rows) == 2 * 2  # variants x pools
    for r in rows:
        assert {"seed", "beta", "pool", "variant", "worst_tensor_cos", "flat_cos", "flat_cos_bptt", "per_tensor",
                "switches", "free", "checkpoint", "step"} <= set(r)
        assert -1 <= r["worst_tensor_cos"] <= 1 and -1 <= r["flat_cos"] <= 1
        assert r["worst_tensor"] in r["per_tensor"] and r["worst_tensor"].split(".")[0] in ("1", "3", "5")
        assert r["worst_tensor_cos"] == min(v["cos_id"] for k, v in r["per_tensor"].items() if k.split(".")[1] ==
                                            "couplings")
        assert r["checkpoint"] is None and r["step"] == 0 and len(r["free"]) == 3
        assert set(r["switches"]["blocks"]) == {"block1", "block2", "block3"}
    assert {(r["seed"], r["variant"], r["pool"]) for r in rows} == {
        (1, v, p) for v in ("centered", "positive") for p in ("free", "held")}
    refs = result["models"]["dhn3"]["references"]
    assert [r["seed"] for r in refs] == [1] and all(r["bptt_vs_id"]["flat_cos"] > 0.99 for r in refs)
    assert (tmp_path / "fidelity.png").stat().st_size > 1000 and "| dhn3 |" in (tmp_path / "fidelity.md").read_text()


def test_ep_agrees_with_id_as_beta_goes_to_zero_in_float64():
    """The measurement itself: at a small beta in float64 EP must match ID on every tensor
    (and a large beta must not), so the numbers of the tool are those of the estimators."""
    args = argparse.Namespace(width_div=32, in_size=16, batch=2, T1=50)
    model, x, y = fidelity._dhn(1, 0, args, torch.float64)
    grid = [{"beta": b, "variant": "centered", "pool": "free", "T2": 40, "tol": None} for b in (1e-4, 2.0)]
    out = fidelity.measure(model, x, y, grid, with_switches=False, echo=lambda _m: None)
    small, large = out["rows"]
    assert small["worst_tensor_cos"] > 1 - 1e-6 and small["flat_cos"] > 1 - 1e-6
    assert large["worst_tensor_cos"] < 0.999


def test_damped_id_rows(tmp_path):
    """--id-damping: ID rows after the EP rows, compared with ID, BPTT and each EP row; a tiny
    damping is close to the exact ID, a large one is not; the table names them; the figure
    (EP rows only) is still drawn."""
    pytest.importorskip("matplotlib")
    assert analyze("--models", "dhn1", "--seeds", "0", "--betas", "0.2", "0.01", "--pools", "free",
                   "--id-damping", "1e-6", "3", *TINY, "--dtype", "float64", "--out", str(tmp_path)) == 0
    result = json.loads((tmp_path / "fidelity.json").read_text())
    rows = result["models"]["dhn1"]["seeds"]
    assert [r["estimator"] for r in rows] == ["ep", "ep", "id", "id"]
    tiny, large = rows[2], rows[3]
    assert tiny["damping"] == 1e-6 and tiny["pool"] == "damping 1e-06" and "switches" not in tiny
    assert tiny["flat_cos"] > 1 - 1e-6 and large["flat_cos"] < tiny["flat_cos"]
    assert [v["beta"] for v in tiny["vs_ep"]] == [0.2, 0.01]
    # a negligible damping: its cosine with the EP row at beta 0.01 is that row's cosine with ID
    assert tiny["vs_ep"][1]["flat_cos"] == pytest.approx(rows[1]["flat_cos"], abs=1e-6)
    table = (tmp_path / "fidelity.md").read_text()
    assert "| id | damping 3 |" in table and "| - |" in table
    assert (tmp_path / "fidelity.png").stat().st_size > 1000


def test_checkpoints_of_a_run(tmp_path):
    root = write_fashion_mnist(tmp_path / "data", n_train=64, n_test=16)
    out = tmp_path / "run"
    Trainer(tiny_config(out, "epochs=1", f"data_dir={root}", "limit_train=32", "log_every=0"), **QUIET).fit()
    assert analyze("--models", "none", "--checkpoints", str(out), "--seeds", "0", "--betas", "0.25", "--pools",
                   "free", "--batch", "4", "--data-dir", str(root), "--no-figure", "--threads", "1",
                   "--out", str(tmp_path / "fid")) == 0
    rows = json.loads((tmp_path / "fid" / "fidelity.json").read_text())["models"]["fmnist_cpu@checkpoints"]["seeds"]
    assert len(rows) == 1 and rows[0]["checkpoint"] == str(out / "checkpoint.pt")
    assert rows[0]["epoch"] == 1 and rows[0]["step"] == 2  # 32 examples in batches of 16
    assert rows[0]["T2"] == 3  # the run's own estimator.ep.T2
    assert analyze("--models", "none", "--checkpoints", str(out), "--seeds", "0", "--betas", "0.25", "--pools",
                   "free", "--batch", "4", "--data-dir", str(root), "--no-figure", "--threads", "1", "--anderson", "3",
                   "--omega", "1.1", "--mirror", "--ep-tol", "1e-5", "--out", str(tmp_path / "fid_aa")) == 0
    result = json.loads((tmp_path / "fid_aa" / "fidelity.json").read_text())
    assert result["settings"]["anderson"] == 3 and result["settings"]["omega"] == 1.1
    row = result["models"]["fmnist_cpu@checkpoints"]["seeds"][0]
    assert row["flat_cos"] > 0.5 and row["mirror"] is True and row["tol"] == 1e-5


@pytest.mark.parametrize("argv, match", [
    (["--models", "nope"], "unknown model"), (["--betas", "0"], "betas must be > 0"),
    (["--batch", "0"], "--batch must be a positive integer"), (["--models", "none"], "nothing to measure"),
    (["--seeds", "-1"], "--seeds must be"), (["--checkpoints", "/nonexistent/x"], "no such file or folder"),
    (["--T1", "0"], "--T1 must be a positive integer"), (["--anderson", "-1"], "--anderson must be"),
    (["--omega", "2"], "--omega must be in"), (["--ep-tol", "0"], "--ep-tol must be > 0"),
    (["--id-damping", "0"], "--id-damping must be finite"), (["--id-damping", "inf"], "--id-damping must be"),
    (["--replot", "/nonexistent.json"], "--replot .*no such file")])
def test_bad_options(argv, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        analyze(*argv, "--out", str(tmp_path))


def test_gradients_of_has_no_side_effects():
    args = argparse.Namespace(width_div=32, in_size=16, batch=2, T1=8)
    model, x, y = fidelity._dhn(3, 0, args, torch.float32)
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bn
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    ests = [b.estimator for b in model.blocks]
    records = [b.last_relax for b in model.blocks]
    g = fidelity.gradients_of(model, fidelity.ID(**fidelity.REFERENCE), x, y)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters()) and any(v.abs().sum() > 0 for v in g.values())
    assert [b.estimator for b in model.blocks] == ests and all(a is b.last_relax for a, b in zip(records,
                                                                                              model.blocks))
    model(x)  # a plain forward in train mode moves the running statistics: the check above can fail
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_monitor_fidelity_leaves_training_bit_identical(tmp_path):
    runs = {}
    for every in (0, 1):
        cfg = tiny_config(tmp_path / str(every), "epochs=1", f"monitor_fidelity={every}", "log_every=2")
        trainer = Trainer(cfg, TRAIN, TEST, **QUIET)
        trainer.fit()
        runs[every] = (trainer, read_metrics(tmp_path / str(every) / "metrics.jsonl")[-1])
    (plain, rec0), (watched, rec1) = runs[0], runs[1]
    a, b = plain.model.state_dict(), watched.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # parameters and BN statistics
    assert rec0["train_loss"] == rec1["train_loss"]
    steps = len(watched.train_loader)
    fid = [p for p in rec1["trace"] if "fidelity_flat_cos" in p]
    assert [p["step"] for p in fid] == list(range(1, steps + 1))
    assert all(0.5 < p["fidelity_flat_cos"] <= 1 + 1e-9 and p["fidelity_worst_tensor_cos"] <= 1 + 1e-9 for p in fid)
    assert rec1["fidelity_flat_cos"] == fid[-1]["fidelity_flat_cos"] and "fidelity_flat_cos" not in rec0
    health = [p for p in rec0["trace"]]
    assert [p["step"] for p in health] == list(range(2, steps + 1, 2))
    assert all("eq_block1_free_iters" in p and not any("nudged" in k for k in p) for p in health)
    assert (tmp_path / "1" / "curves.png").stat().st_size > 1000


def test_curves_draw_the_trace(tmp_path):
    pytest.importorskip("matplotlib")
    trace = [{"step": s, "epoch_progress": s / 10, "eq_block1_free_iters": 5 + s, "fidelity_flat_cos": 0.99}
             for s in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train_loss": 1.0, "train_top1": 50.0,
                                                        "eq_block1_free_iters": 10.0, "trace": trace}) + "\n")
    png = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert png is not None and png.stat().st_size > 1000


@pytest.mark.parametrize("override", ["monitor_fidelity=-1", "monitor_fidelity=1.5", "monitor_fidelity=true",
                                      "log_every=-2", "log_every=x"])
def test_config_validation(tmp_path, override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"config key '{key}' must be an integer >= 0"):
        tiny_config(tmp_path, override)


def test_monitor_refuses_a_model_without_energy_blocks(tmp_path):
    with pytest.raises(ValueError, match="monitor_fidelity: .* holds no energy-based block"):
        fidelity.FidelityMonitor(torch.nn.Linear(3, 2), torch.zeros(1, 3), torch.zeros(1, dtype=torch.long))
