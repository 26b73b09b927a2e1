"""Trainer: metrics, curves, NaN handling, precision; the train/eval commands end to end."""
import json

import pytest
import torch

from eqprop.cli import main
from eqprop.training import checkpoint
from eqprop.training.trainer import Trainer, TrainingError
from test_training_helpers import synthetic_images, tiny_config, write_fashion_mnist

TRAIN, TEST = synthetic_images(96, seed=1), synthetic_images(64, seed=2, split="test")
QUIET = dict(echo=lambda _m: None)


def test_trainer_learns_and_logs(tmp_path):
    cfg = tiny_config(tmp_path, "epochs=3")
    summary = Trainer(cfg, TRAIN, TEST, **QUIET).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for key in ("train_loss", "train_top1", "train_top5", "test_loss", "test_top1", "test_top5", "lr",
                "iters_free", "iters_nudged+", "iters_nudged-", "epoch_time_s", "data_share"):
        assert key in records[-1], key
    assert records[-1]["iters_free"] == 4 and records[-1]["iters_nudged+"] == 3  # fixed T1, T2
    assert records[0]["lr"] == 0.01 and records[-1]["lr"] < records[1]["lr"]  # cosine annealing
    assert records[-1]["test_top1"] >= 90.0  # 4 bands of light: easy once trained
    assert (tmp_path / "curves.png").stat().st_size > 1000 and (tmp_path / "config.yaml").exists()
    assert summary["status"] == "completed" and summary["last"] == records[-1]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def poison(t):
        if t.epoch == 1 and t.step == 1:
            with torch.no_grad():
                t.model[-1].weight.fill_(float("nan"))
    cfg = tiny_config(tmp_path)
    trainer = Trainer(cfg, TRAIN, TEST, on_step=poison, **QUIET)
    with pytest.raises(TrainingError, match=r"NaN/inf at epoch 2, step 2.*checkpoint.pt\) is kept"):
        trainer.fit()
    saved = checkpoint.load(tmp_path / "checkpoint.pt")
    assert saved["position"] == {"epoch": 1, "step": 0}
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def test_sgd_step_schedule_and_bf16_autocast(tmp_path):
    cfg = tiny_config(tmp_path, "epochs=1", "optim.name=sgd", "optim.schedule_unit=step", "precision=bf16",
                      "estimator.ep.variant=positive")
    summary = Trainer(cfg, TRAIN, TEST, **QUIET).fit()
    assert summary["status"] == "completed" and summary["last"]["train_loss"] > 0


@pytest.mark.parametrize("algorithm", ["id", "bptt"])
def test_other_estimators_train(tmp_path, algorithm):
    cfg = tiny_config(tmp_path, "epochs=1", f"algorithm={algorithm}", "estimator.bptt.T2=3")
    trainer = Trainer(cfg, TRAIN, TEST, **QUIET)
    assert type(trainer.model.blocks[0].estimator).__name__.lower() == algorithm
    assert trainer.fit()["last"]["train_loss"] > 0


def test_dense_model_and_bad_estimator_setting(tmp_path):
    cfg = tiny_config(tmp_path, "epochs=1", "model={kind: dense, blocks: [[16, 8]], T1: 3}")
    assert Trainer(cfg, TRAIN, TEST, **QUIET).fit()["status"] == "completed"
    from eqprop.training.config import ConfigError
    with pytest.raises(ConfigError, match=r"algorithm=ep .*gamma"):
        Trainer(tiny_config(tmp_path, "estimator.ep.gamma=1"), TRAIN, TEST, **QUIET)
    with pytest.raises(ConfigError, match=r"unknown model setting\(s\) \['widht'\]"):
        Trainer(tiny_config(tmp_path, "model.widht=3"), TRAIN, TEST, **QUIET)


def test_train_and_eval_commands(tmp_path, capsys, monkeypatch):
    data = write_fashion_mnist(tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", "fmnist_cpu", "epochs=1", "batch_size=16", "eval_batch_size=16", "model.T1=3",
            "estimator.ep.T2=2", "progress=false", "tensorboard=false", "threads=1",
            "--data-dir", str(data), "--out-dir", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "test accuracy: top-1" in text and (out / "curves.png").exists()
    assert main(["eval", str(out / "checkpoint.pt"), "--data-dir", str(data)]) == 0
    assert "fashion_mnist test set (16 examples)" in capsys.readouterr().out
    resumed = [a if a != "epochs=1" else "epochs=2" for a in args] + ["--resume"]
    assert main(resumed) == 0
    assert "resumed from" in capsys.readouterr().out
    assert checkpoint.load(out / "checkpoint.pt")["position"]["epoch"] == 2


def test_command_errors(tmp_path, capsys):
    assert main(["train", "--list"]) == 0
    assert "cifar10_split_l6_2blocks" in capsys.readouterr().out
    assert main(["train", "nope"]) == 1
    assert "unknown config 'nope'" in capsys.readouterr().err
    assert main(["train", "fmnist_cpu", "optim.lrr=1"]) == 1
    assert "valid keys under 'optim'" in capsys.readouterr().err
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert main(["eval", str(empty)]) == 1
    assert f"checkpoint {empty} is empty" in capsys.readouterr().err
    assert main(["train", "fmnist_cpu", "dataset=mnist", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "MNIST" in err and str(tmp_path / "mnist") in err
    assert main(["train", "fmnist_cpu", "--resume", "--out-dir", str(tmp_path / "none")]) == 1
    assert f"{tmp_path / 'none' / 'checkpoint.pt'} does not exist" in capsys.readouterr().err


def test_hssm_kind_dispatches_to_build_hssm(tmp_path):
    from eqprop.data import Dataset
    from eqprop.hamiltonian import HSSM
    from eqprop.training.config import ConfigError

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (48,), generator=g)
    x = torch.randn(48, 6, 2, generator=g) + y[:, None, None].float()
    seq = Dataset(x=x, y=y, num_classes=3, mean=(0.0, 0.0), std=(1.0, 1.0), name="toy", kind="sequence")
    cfg = tiny_config(tmp_path, "model={kind: hssm, hidden: 8, state_size: 4, n_blocks: 1}", "algorithm=rhel",
                      "estimator.rhel.eps=0.01", "epochs=1")
    trainer = Trainer(cfg, seq, seq, **QUIET)
    assert isinstance(trainer.model, HSSM) and trainer.model.in_features == 2
    assert trainer.fit()["status"] == "completed"
    with pytest.raises(ConfigError, match="model.kind=conv needs images"):
        Trainer(tiny_config(tmp_path), seq, seq, **QUIET)
