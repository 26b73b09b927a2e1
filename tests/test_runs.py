"""Runs from the command line and the trainer: resume applies changed settings or refuses
them by name, a finished run says it is complete, a folder holding a run is never reused by
accident, a trained epoch survives a failing evaluation, and every user error is one line
with exit status 2 (a traceback only with --debug)."""
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from eqprop.cli import main
from eqprop.training import checkpoint
from eqprop.training.metrics import read_metrics
from eqprop.training.trainer import Trainer, TrainingError
from test_training_helpers import synthetic_images, tiny_config, write_fashion_mnist

TRAIN, TEST = synthetic_images(64, seed=1), synthetic_images(32, seed=2, split="test")
QUIET = dict(echo=lambda _m: None)
ARGS = ["model.blocks=[{channels: [1, 4], pools: m}]", "model.T1=3", "estimator.ep.T2=2", "batch_size=16",
        "eval_batch_size=16", "progress=false", "tensorboard=false", "threads=1", "optim.schedule_unit=epoch"]
LR_MIN = 1e-5  # fmnist_cpu's optim.lr_min


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fashion_mnist(tmp_path_factory.mktemp("data"), n_train=32, n_test=16)


def train(data, out, *extra):
    return main(["train", "fmnist_cpu", *ARGS, "--data-dir", str(data), "--out-dir", str(out), *extra])


def cosine(lr, t, total):
    return LR_MIN + (lr - LR_MIN) * (1 + math.cos(math.pi * t / total)) / 2


def lrs(out):
    return {r["epoch"]: r["lr"] for r in read_metrics(out / "metrics.jsonl")}


def test_resume_extends_a_finished_run_and_applies_new_optimizer_settings(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(data, out, "epochs=2") == 0
    capsys.readouterr()
    before = (out / "checkpoint.pt").read_bytes()
    assert train(data, out, "--resume") == 0  # finished, nothing more asked: says so, trains nothing
    text = capsys.readouterr().out
    assert f"the run in {out} is complete: 2 epoch(s) trained, epochs=2; nothing to do" in text
    assert "continuing" not in text and (out / "checkpoint.pt").read_bytes() == before
    # flags before overrides: 2 more epochs at a new lr; the cosine runs over 4 epochs from epoch 3
    assert train(data, out, "--resume", "epochs=4", "optim.lr=0.002") == 0
    text = capsys.readouterr().out
    assert "resuming with changed settings: epochs 2 -> 4, optim.lr 0.003 -> 0.002" in text
    assert "continuing at epoch 3 (learning rate 0.001" in text
    got = lrs(out)
    assert got[1] == 0.003 and got[3] == pytest.approx(cosine(0.002, 2, 4), rel=1e-12)
    assert got[4] == pytest.approx(cosine(0.002, 3, 4), rel=1e-12)
    assert got[3] > 0.5 * 0.002  # not stuck at lr_min
    # overrides before the flag; weight_decay reaches the optimizer, the config records it
    assert train(data, out, "epochs=5", "optim.weight_decay=0.01", "--resume") == 0
    state = checkpoint.load(out / "checkpoint.pt")
    group = state["optimizer"]["param_groups"][0]
    assert group["weight_decay"] == 0.01 and group["lr"] == pytest.approx(LR_MIN)
    assert sorted(lrs(out)) == [1, 2, 3, 4, 5] and lrs(out)[5] == pytest.approx(cosine(0.002, 4, 5), rel=1e-12)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["optim"]["weight_decay"] == 0.01 and saved["epochs"] == 5 and state["config"]["epochs"] == 5


def test_resume_with_another_schedule_and_sgd_settings(tmp_path):
    cfg = tiny_config(tmp_path, "epochs=1", "optim.name=sgd", "optim.lr=0.05")
    Trainer(cfg, TRAIN, TEST, **QUIET).fit()
    changed = tiny_config(tmp_path, "epochs=3", "optim.name=sgd", "optim.lr=0.02", "optim.momentum=0.5",
                          "optim.nesterov=true", "optim.schedule=constant", "optim.schedule_unit=step")
    seen = []
    t = Trainer(changed, TRAIN, TEST, echo=seen.append, on_step=lambda t: seen.append(t.optimizer.param_groups[0]))
    t.resume()
    assert any("optim.schedule 'cosine' -> 'constant'" in m for m in seen if isinstance(m, str))
    assert t.fit()["status"] == "completed"
    groups = [g for g in seen if isinstance(g, dict)]
    assert len(groups) == 2 * len(t.train_loader)
    assert all(g["lr"] == 0.02 and g["momentum"] == 0.5 and g["nesterov"] for g in groups)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    assert train(data, out, "epochs=1") == 0
    return out


@pytest.mark.parametrize("override,key", [
    ("optim.name=sgd", "optim.name"), ("model.blocks=[{channels: [1, 6], pools: m}]", "model.blocks"),
    ("batch_size=8", "batch_size"), ("seed=3", "seed"), ("dataset=mnist", "dataset"), ("dtype=float64", "dtype"),
])
def test_resume_refuses_settings_that_cannot_change(data, finished, capsys, override, key):
    capsys.readouterr()
    assert train(data, finished, "--resume", "epochs=2", override) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"eqprop train: error: {key} cannot change on resume: the run in {finished}")
    assert "Start a new run to change it (another out_dir, or --overwrite" in err and err.count("\n") == 1


def test_a_folder_holding_a_run_needs_resume_or_overwrite(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(data, out, "epochs=2") == 0
    capsys.readouterr()
    assert train(data, out, "epochs=1") == 2  # a forgotten --resume: nothing of the old run is touched
    err = capsys.readouterr().err
    assert f"out_dir {out} already holds a run (config.yaml, metrics.jsonl, checkpoint.pt, checkpoint.prev.pt, " \
           f"data_files.json, run_info.json); " \
           f"continue it with --resume, or replace it with --overwrite" in err
    assert len(read_metrics(out / "metrics.jsonl")) == 2 and (out / "checkpoint.prev.pt").exists()
    record = json.loads((out / "data_files.json").read_text())  # the files the run read
    files = [f for d in record["datasets"] for f in d["files"]]
    assert {d["split"] for d in record["datasets"]} == {"train", "test"} and len(files) == 4
    assert all(Path(f["path"]).is_file() and Path(f["path"]).stat().st_size == f["size"] for f in files)
    assert all(Path(f["path"]).is_relative_to(data) for f in files)  # --data-dir is the only place read
    assert train(data, out, "--resume", "--overwrite") == 2
    assert "--resume and --overwrite exclude each other" in capsys.readouterr().err
    assert train(data, out, "epochs=1", "seed=5", "--overwrite") == 0  # replaces it
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    assert not (out / "checkpoint.prev.pt").exists() and checkpoint.load(out / "checkpoint.pt")["config"]["seed"] == 5
    only_log = tmp_path / "log"
    only_log.mkdir()
    (only_log / "metrics.jsonl").write_text('{"epoch": 1}\n')
    assert train(data, only_log, "epochs=1") == 2
    assert "already holds a run (metrics.jsonl)" in capsys.readouterr().err
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    assert train(data, not_a_folder / "run", "epochs=1") == 2
    assert f"eqprop train: error: out_dir {not_a_folder / 'run'} cannot be written: " in capsys.readouterr().err


def test_a_run_stopped_before_its_first_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("name: fmnist_cpu\n")
    assert train(data, out, "--resume") == 2
    assert "stopped before its first checkpoint was written" in capsys.readouterr().err


def test_user_errors_are_one_line_with_status_2_and_debug_shows_the_traceback(data, tmp_path, capsys):
    cases = [
        (["model.T1=0"], "eqprop train: error: model.T1=0: block1: T1 must be a positive integer"),
        (["model.blocks=[{pools: m}]"], "eqprop train: error: model.blocks[0] has no 'channels'"),
        (["optim.lr=-1"], "eqprop train: error: config key 'optim.lr' must be a number >= 0, got -1"),
    ]
    for extra, message in cases:
        assert train(data, tmp_path / "r", *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err, err
    assert main(["--debug", "train", "fmnist_cpu", *ARGS, "model.T1=0", "--out-dir", str(tmp_path / "r"),
                 "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ValueError: block1: T1 must be" in err
    assert err.rstrip().splitlines()[-1].startswith(cases[0][1])


def test_eval_of_a_hand_edited_checkpoint(finished, tmp_path, capsys):
    state = torch.load(finished / "checkpoint.pt", weights_only=True)
    state["position"] = {"epoch": -1, "step": 0}
    torch.save(state, tmp_path / "edited.pt")
    assert main(["eval", str(tmp_path / "edited.pt")]) == 2
    err = capsys.readouterr().err
    assert "'position.epoch' must be an integer >= 0, got -1; the file was edited or is damaged" in err
    assert err.count("\n") == 1


class Batches(list):
    """Stands in for the test loader: fixed batches."""
    num_examples = 8


def bad_batches(loader, kind):
    x, y = next(iter(loader))
    if kind == "label":
        return Batches([(x, torch.full_like(y, 9))])  # 4 classes
    return Batches([(x[:, :, :6, :6], y)])  # images of another size


@pytest.mark.parametrize("kind,cause", [("label", "out of bounds"), ("size", "shape")])
def test_a_failing_evaluation_keeps_the_trained_epoch(tmp_path, kind, cause):
    cfg = tiny_config(tmp_path, "epochs=2")
    t = Trainer(cfg, TRAIN, TEST, **QUIET)
    good = t.test_loader
    t.test_loader = bad_batches(good, kind)
    with pytest.raises(TrainingError, match=rf"evaluation after epoch 1 failed: .*{cause}.*The trained epoch is "
                                            rf"saved in .*checkpoint.pt; fix the cause and continue with --resume"):
        t.fit()
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert state["position"] == {"epoch": 1, "step": 0} and state["pending"]["epoch"] == 1
    said = []
    again = Trainer(cfg, TRAIN, TEST, echo=said.append)
    again.resume()
    assert any("continuing at the evaluation of epoch 1" in m for m in said)
    assert again.fit()["status"] == "completed" and len(good) == len(again.test_loader)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2] and all("test_top1" in r for r in records)


def test_errors_inside_training_carry_epoch_and_step(tmp_path):
    def blow_up(t):
        if t.epoch == 1 and t.step == 2:
            with torch.no_grad():
                for p in t.model.blocks[0].parameters():
                    p.fill_(float("inf"))
    t = Trainer(tiny_config(tmp_path), TRAIN, TEST, on_step=blow_up, **QUIET)
    with pytest.raises(TrainingError, match=r"relaxation diverged at epoch 2, step 3: block1: .*The last good "
                                            r"checkpoint \(.*checkpoint.pt\) is kept"):
        t.fit()
    assert checkpoint.load(tmp_path / "checkpoint.pt")["position"] == {"epoch": 1, "step": 0}

    t = Trainer(tiny_config(tmp_path / "b"), TRAIN, TEST, **QUIET)
    x, y = next(iter(t.train_loader))
    with pytest.raises(TrainingError, match=r"training failed at epoch 1, step 1: .*out of bounds.*No checkpoint "
                                            r"was written yet"):
        t.train_step(x, torch.full_like(y, 7))
