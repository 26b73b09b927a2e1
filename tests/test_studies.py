"""`eqprop study`: the algorithms study end to end on tiny MNIST-format files, its config
translation and report, the shipped study configs, and the precision study."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from eqprop import EnergyBlock
from eqprop.cli import main
from eqprop.studies.algorithms import ALL_RULES, markdown_table, run_config, study_config, study_configs, summarize
from eqprop.studies.precision import precision_study
from eqprop.training.config import ConfigError
from eqprop.training.models import build_model
from test_training_helpers import write_idx

SMALL = ['model.blocks=[{channels: [1, 4, 8], pools: "m-"}]', "model.T1=5", "estimator.cep.T2=3",
         "estimator.cl.T2=3", "estimator.tbp.K=3", "estimator.rbp.max_iter=20", "epochs=3", "batch_size=16",
         "eval_batch_size=32", "limit_train=null", "limit_test=null", "optim.lr=0.01", "channels_last=false"]


def write_band_mnist(root: Path, n_train: int = 96, n_test: int = 48, side: int = 12, classes: int = 4) -> Path:
    """MNIST idx files of noisy images in which class k lights up the k-th horizontal band."""
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, classes, n)
        x = rng.integers(0, 60, (n, side, side))
        band = side // classes
        for k in range(classes):
            x[y == k, k * band:(k + 1) * band, :] += 150
        write_idx(root / "mnist" / f"{prefix}-images-idx3-ubyte.gz", x)
        write_idx(root / "mnist" / f"{prefix}-labels-idx1-ubyte.gz", y)
    return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_band_mnist(tmp_path_factory.mktemp("data"))


def study(data_dir: Path, out: Path, rules: str, *extra: str) -> int:
    return main(["study", "algorithms", *SMALL, "--dataset", "mnist", "--data-dir", str(data_dir), "--out", str(out),
                 "--rules", rules, *extra])


def table_rows(text: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in text.splitlines() if re.match(r"\| [A-Z]+ \|", line)]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_algorithms_study_end_to_end(data_dir, tmp_path, capsys):
    out = tmp_path / "study"
    assert study(data_dir, out, "cep,cl,tbp") == 0
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert [r["rule"] for r in runs] == ["cep", "cl", "tbp"] and all(r["seed"] == 0 for r in runs)
    assert len({r["init_digest"] for r in runs}) == 1  # every rule starts from the same weights
    assert runs[0]["settings"] == {"beta": 0.2, "T2": 3, "precision": "deviation"}
    for r in runs:
        assert [e["epoch"] for e in r["epochs"]] == [1, 2, 3]
        for e in r["epochs"]:
            assert 0.0 <= e["train_error"] <= 100.0 and 0.0 <= e["test_error"] <= 100.0
            assert math.isfinite(e["train_loss"]) and math.isfinite(e["test_loss"])
        losses = [e["train_loss"] for e in r["epochs"]]
        assert losses[-1] < losses[0], (r["rule"], losses)  # an easy problem: the cost falls
        if r["rule"] != "cl":  # cl follows its own contrast, not this cost's gradient
            assert losses[-1] < 0.2 * losses[0], (r["rule"], losses)
        assert r["test_error"] <= 25.0, r["rule"]
        assert (Path(r["out_dir"]) / "metrics.jsonl").is_file()
    assert runs[1]["epochs"][0]["iters"].keys() == {"free", "clamped"}  # cl clamped the output to the target
    rows = table_rows((out / "table.md").read_text())
    assert list(rows) == ["CEP", "CL", "TBP"]
    for rule, cells in rows.items():
        run = next(r for r in runs if r["rule"] == rule.lower())
        assert float(cells[0]) == pytest.approx(run["test_error"], abs=0.01)
        assert 0.0 <= float(cells[1]) <= 100.0
    assert (out / "curves.png").stat().st_size > 1000
    assert "CEP" in capsys.readouterr().out


def test_resume_trains_only_the_missing_runs(data_dir, tmp_path):
    out = tmp_path / "study"
    assert study(data_dir, out, "tbp", "--set", "epochs=1") == 0
    first = json.loads((out / "results.json").read_text())["runs"]
    assert study(data_dir, out, "tbp,rbp", "--resume", "--set", "epochs=1") == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r["rule"] for r in runs] == ["tbp", "rbp"] and runs[0] == first[0]
    assert "adjoint" in runs[1]["epochs"][0]["iters"]  # rbp ran implicit differentiation
    assert list(table_rows((out / "table.md").read_text())) == ["TBP", "RBP"]
    assert study(data_dir, out, "tbp", "--resume", "--set", "epochs=1", "optim.lr=0.02") == 0  # new config: rerun
    rerun = json.loads((out / "results.json").read_text())["runs"]
    assert [r["rule"] for r in rerun] == ["tbp"] and rerun[0]["init_digest"] == runs[0]["init_digest"]


@pytest.mark.parametrize("args, message", [
    (["--rules", "cep,xyz"], "unknown rule(s) ['xyz']"),
    (["--set", "estimator.cep.gamma=1"], "estimator.cep="),
    (["--set", "optim.lrr=1"], "valid keys under 'optim'"),
    (["--config", "study_nope"], "unknown study config 'study_nope'"),
])
def test_study_errors(data_dir, tmp_path, capsys, args, message):
    assert study(data_dir, tmp_path / "out", "cep", *args) == 2  # a user error
    assert message in capsys.readouterr().err


def test_run_config_translation(tmp_path):
    cfg = study_config("study_fmnist_cpu", ["epochs=1"])
    run = run_config(cfg, "ccpl", 3, tmp_path, channels=3)
    assert (run["algorithm"], run["seed"], run["epochs"]) == ("ccpl", 3, 1)
    assert run["out_dir"] == str(tmp_path / "runs" / "ccpl-seed3")
    assert run["model"]["blocks"][0]["channels"] == [3, 16, 32] and cfg["model"]["blocks"][0]["channels"][0] is None
    assert set(ALL_RULES) <= set(cfg["estimator"])
    cfg["model"]["blocks"][0]["channels"][0] = 1
    assert run_config(cfg, "cep", 0, tmp_path, channels=1)["model"]["blocks"][0]["channels"][0] == 1
    with pytest.raises(ConfigError, match=r"channels\[0\] is 1 but the dataset's images have 3 channel"):
        run_config(cfg, "cep", 0, tmp_path, channels=3)


@pytest.mark.parametrize("name", ["study_fmnist_cpu", "study_published"])
def test_shipped_study_configs_build_a_network_holding_its_output_layer(name, tmp_path):
    assert name in study_configs()
    cfg = run_config(study_config(name), "cep", 0, tmp_path, channels=1)
    with torch.device("meta"):
        model = build_model(cfg, {"num_classes": 10, "kind": "image", "shape": (1, 28, 28)})
    assert isinstance(model[-1], EnergyBlock) and len(model.blocks) == 1
    assert model[-1].couplings[-1].weight.shape[0] == 10
    assert isinstance(model[0], torch.nn.ZeroPad2d) == (cfg["model"]["pad_to"] == 32)


def test_table_marks_diverged_runs():
    ok = {"rule": "cep", "seed": 0, "test_error": 12.0, "seconds_per_epoch": 2.0,
          "epochs": [{"train_error": 10.0, "test_error": 12.0}]}
    rows = summarize([ok, {**ok, "seed": 1, "test_error": 14.0}, {"rule": "nep", "seed": 0, "error": "NaN"}],
                     ["cep", "nep"])
    table = markdown_table(rows, "t")
    assert "| CEP | 13.00 ± 1.41 | 10.00 | 2.0 | 2 |" in table
    assert "| NEP | diverged | - | - | 0 (+1 diverged) |" in table


def test_precision_study(data_dir, tmp_path):
    from eqprop.studies.algorithms import load_data

    cfg = study_config("study_fmnist_cpu", [*SMALL, "dataset=mnist", f"data_dir={data_dir}"])
    logs = []
    table = precision_study(cfg, "cep", ["bfloat16"], load_data(cfg), steps=1, out=tmp_path, log=logs.append)
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("float32", "-"), ("bfloat16", "deviation"),
                                                            ("bfloat16", "block")]
    assert float(rows[1][2]) > 0.99  # 16-bit relaxation, float32-accurate second phases
    assert -1.0 <= float(rows[2][2]) <= 1.0 and len(logs) == 2


def test_eval_of_a_study_checkpoint_uses_the_squared_error_it_was_trained_with(data_dir, tmp_path):
    from eqprop.training.cli_eval import evaluate_checkpoint
    from eqprop.training.metrics import read_metrics

    out = tmp_path / "study"
    assert study(data_dir, out, "cep", "epochs=1") == 0
    run = out / "runs" / "cep-seed0"
    logged = read_metrics(run / "metrics.jsonl")[-1]
    evaluated = evaluate_checkpoint(str(run / "checkpoint.pt"), data_dir=str(data_dir))
    assert abs(evaluated["loss"] - logged["test_loss"]) < 1e-5  # not a cross-entropy of the outputs
    assert abs(evaluated["top1"] - logged["test_top1"]) < 1e-9
