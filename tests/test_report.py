"""`eqprop report`: a results page from run folders, with provenance and config drift."""
import json

import pytest

from eqprop.cli import main
from eqprop.training.cli_report import config_changes, render
from eqprop.training.config import ConfigError, load_config, load_config_file, to_yaml
from eqprop.training.runinfo import RUN_INFO, read_run_info
from test_training_helpers import write_fashion_mnist

TINY = ["batch_size=16", "eval_batch_size=16", "model.T1=3", "estimator.ep.T2=2", "progress=false",
        "tensorboard=false", "threads=1"]


def test_a_trained_and_resumed_run_reports_its_epochs_commands_and_changed_keys(tmp_path, capsys):
    data, out = write_fashion_mnist(tmp_path / "data"), tmp_path / "run"
    args = ["train", "fmnist_cpu", *TINY, "--data-dir", str(data), "--out-dir", str(out)]
    assert main([*args, "epochs=1"]) == 0
    assert main([*args, "epochs=2", "--resume"]) == 0
    sessions = read_run_info(out)
    assert [s["start_epoch"] for s in sessions] == [0, 1]
    assert all(s["torch_threads"] == 1 and s["world_size"] == 1 and "train" in s["command"] for s in sessions)
    capsys.readouterr()
    page_path = tmp_path / "results.md"
    assert main(["report", str(out), "--out", str(page_path)]) == 0
    page = page_path.read_text()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in metrics:  # one row per epoch, the numbers as logged
        assert f"| {r['epoch']} | {r['test_top1']:.2f} | {r['test_top5']:.2f} |" in page
    assert "from epoch 2:" in page and "--resume" in page
    # the tiny settings differ from the shipped config, and the page says which keys
    assert "has changed since this run" in page and "model.T1" in page and "batch_size" in page
    assert "eval_batch_size" not in page.split("has changed")[1].split("\n")[0]
    assert "| `cifar10_split_l6_1block` |" in page  # shipped configs without a run are listed
    assert f"eqprop report {out} --out {page_path}" in page
    assert main(["report", str(out), "--check", str(page_path)]) == 0
    page_path.write_text(page + "edited\n")
    assert main(["report", str(out), "--check", str(page_path)]) == 1


def test_config_changes_are_empty_for_the_shipped_config_and_name_changed_keys():
    cfg = load_config("fmnist_cpu", ["epochs=1", "out_dir=x", "threads=1"])
    assert config_changes(cfg) == []
    assert config_changes(load_config("fmnist_cpu", ["optim.lr=0.1", "model.slope=0.5"])) == ["model.slope",
                                                                                             "optim.lr"]
    assert config_changes({**cfg, "name": "not_shipped"}) is None
    # a run saved before a trainer key existed ran with the key's default: not a change
    older = {k: v for k, v in cfg.items() if k != "augment_pad"}
    assert config_changes(older) == []
    assert config_changes({**older, "augment_flip": False}) == ["augment_flip"]


def test_bad_run_folders_raise_naming_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config.yaml is missing"):
        render([tmp_path], "eqprop report")
    (tmp_path / "config.yaml").write_text(to_yaml(load_config("fmnist_cpu")))
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / RUN_INFO).write_text("{not json")
    with pytest.raises(ConfigError, match=RUN_INFO):
        render([tmp_path], "eqprop report")
    (tmp_path / RUN_INFO).unlink()
    page = render([tmp_path], "eqprop report")
    assert "not recorded" in page and "no epoch finished" in page
    assert load_config_file(str(tmp_path / "config.yaml"))["name"] == "fmnist_cpu"


def test_the_shipped_results_page_is_the_report_of_the_committed_demo_run(monkeypatch):
    """docs/results.md is written by `eqprop report` from benchmarks/results/{demo_run,long_run,demo_long_run}
    (`make report`): a changed config, a new config or an edited page makes it out of date until
    the command is re-run."""
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    assert main(["report", "benchmarks/results/demo_run", "benchmarks/results/long_run",
                 "benchmarks/results/demo_long_run", "--check", "docs/results.md"]) == 0
