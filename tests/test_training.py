"""Trainer: metrics, curves, NaN handling, precision; the train/eval commands end to end."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from eqprop import EnergyBlock
from eqprop.cli import main
from eqprop.training import checkpoint
from eqprop.training.config import ConfigError
from eqprop.training.metrics import read_metrics
from eqprop.training.models import build_model, relax_summary
from eqprop.training.trainer import CrossEntropy, SquaredError, Trainer, TrainingError, health_warnings
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


def train_losses(out_dir):
    return [r["train_loss"] for r in read_metrics(out_dir / "metrics.jsonl")]


def test_sgd_with_a_step_schedule(tmp_path):
    cfg = tiny_config(tmp_path, "epochs=1", "optim.name=sgd", "optim.lr=0.5", "optim.schedule_unit=step")
    trainer = Trainer(cfg, TRAIN, TEST, **QUIET)
    assert isinstance(trainer.optimizer, torch.optim.SGD)
    lrs = []
    trainer.on_step = lambda t: lrs.append(t.optimizer.param_groups[0]["lr"])
    assert trainer.fit()["status"] == "completed"
    assert len(lrs) == len(trainer.train_loader) and all(a > b for a, b in zip(lrs, lrs[1:]))  # every step


def test_bf16_autocast_with_blocks(tmp_path):
    """bf16 autocast runs the feedforward parts in bfloat16 while every block switches autocast
    off itself: the blocks take a bf16 current and return float32, and training still learns."""
    cfg = tiny_config(tmp_path, "precision=bf16", "estimator.ep.variant=positive")
    trainer = Trainer(cfg, TRAIN, TEST, **QUIET)
    seen = []
    for block in trainer.model.blocks:
        block.register_forward_hook(lambda _m, args, out: seen.append((args[0].dtype, out.dtype)))
    summary = trainer.fit()
    assert summary["status"] == "completed"
    assert seen and {d for pair in seen for d in pair} <= {torch.bfloat16, torch.float32}
    assert any(inp == torch.bfloat16 for inp, _ in seen)  # the conv before a block ran in bf16
    assert all(out == torch.float32 for _, out in seen)  # the block ran with autocast off
    losses = train_losses(tmp_path)
    assert all(math.isfinite(v) for v in losses) and losses[1] < losses[0] - 0.1
    assert summary["last"]["test_top1"] >= 90.0


def test_bf16_autocast_gradient_agrees_with_float32(tmp_path):
    """Autocast touches only the feedforward parts: block gradients stay close to float32's."""
    grads = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(tiny_config(tmp_path, f"precision={precision}"), TRAIN, TEST, **QUIET)
        x, y = next(iter(trainer.train_loader))
        loss, _ = trainer._forward_loss(x, y, trainer.model)
        loss.backward()
        grads[precision] = torch.cat([p.grad.flatten() for p in trainer.model.blocks[0].parameters()])
    assert torch.nn.functional.cosine_similarity(grads["fp32"], grads["bf16"], 0) > 0.98


@pytest.mark.parametrize("algorithm", ["id", "bptt"])
def test_other_estimators_train(tmp_path, algorithm):
    cfg = tiny_config(tmp_path, f"algorithm={algorithm}", "estimator.bptt.T2=3")
    trainer = Trainer(cfg, TRAIN, TEST, **QUIET)
    assert type(trainer.model.blocks[0].estimator).__name__.lower() == algorithm
    assert trainer.fit()["status"] == "completed"
    losses = train_losses(tmp_path)
    assert all(math.isfinite(v) for v in losses) and losses[1] < losses[0] - 0.1


def test_default_objective_is_cross_entropy_on_logits(tmp_path):
    trainer = Trainer(tiny_config(tmp_path), TRAIN, TEST, **QUIET)
    assert isinstance(trainer.objective, CrossEntropy) and not trainer.objective.target_in_forward
    x, y = next(iter(trainer.test_loader))
    with torch.no_grad():
        loss, out = trainer._forward_loss(x, y, trainer.model)
        logits = trainer.model(x)
    assert torch.equal(out, logits) and torch.equal(loss, F.cross_entropy(logits, y))
    assert torch.equal(trainer.objective.predict(out), logits.argmax(1))
    with pytest.raises(TypeError, match="objective must be"):
        Trainer(tiny_config(tmp_path), TRAIN, TEST, objective=F.mse_loss, **QUIET)


def test_squared_error_objective_hands_the_target_to_the_forward(tmp_path):
    """A network holding its output layer (readout=false) trains by cl, which needs the
    target; predictions are the most active output unit."""
    cfg = tiny_config(tmp_path, "model.readout=false", "algorithm=cl", "+estimator.cl.T2=3", "epochs=3",
                      "optim.lr=0.02")
    phases = set()
    record = lambda t: phases.update(t.model[-1].last_relax)
    trainer = Trainer(cfg, TRAIN, TEST, objective=SquaredError(), on_step=record, **QUIET)
    assert isinstance(trainer.model[-1], EnergyBlock) and type(trainer.model[-1].estimator).__name__ == "CL"
    out = torch.tensor([[0.1, 0.9, 0.0], [0.7, 0.2, 0.3]])
    assert torch.equal(trainer.objective.predict(out), torch.tensor([1, 0]))
    assert trainer.objective.loss(out, torch.tensor([1, 0])).item() == pytest.approx(0.5 * (0.02 + 0.22) / 2)
    summary = trainer.fit()
    losses = train_losses(tmp_path)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert summary["last"]["test_top1"] >= 75.0
    assert phases == {"free", "clamped"}  # cl's backward saw the target


def test_dense_model_and_bad_estimator_setting(tmp_path):
    cfg = tiny_config(tmp_path, "epochs=1", "model={kind: dense, blocks: [[16, 8]], T1: 3}")
    assert Trainer(cfg, TRAIN, TEST, **QUIET).fit()["status"] == "completed"
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
    assert main(["train", "nope"]) == 2
    assert "unknown config 'nope'" in capsys.readouterr().err
    assert main(["train", "fmnist_cpu", "optim.lrr=1"]) == 2
    assert "valid keys under 'optim'" in capsys.readouterr().err
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert main(["eval", str(empty)]) == 2
    assert f"checkpoint {empty} is empty" in capsys.readouterr().err
    assert main(["train", "fmnist_cpu", "dataset=mnist", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "MNIST" in err and str(tmp_path / "mnist") in err
    assert main(["train", "fmnist_cpu", "--resume", "--out-dir", str(tmp_path / "none")]) == 2
    assert f"{tmp_path / 'none' / 'checkpoint.pt'} does not exist" in capsys.readouterr().err


def test_hssm_kind_dispatches_to_build_hssm(tmp_path):
    from eqprop.data import Dataset
    from eqprop.hamiltonian import HSSM

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (48,), generator=g)
    x = torch.randn(48, 6, 2, generator=g) + y[:, None, None].float()
    seq = Dataset(x=x, y=y, num_classes=3, mean=(0.0, 0.0), std=(1.0, 1.0), name="toy", kind="sequence")
    cfg = tiny_config(tmp_path, "model={kind: hssm, hidden: 8, state_size: 4, n_blocks: 1}", "algorithm=rhel",
                      "estimator.rhel.eps=0.01", "epochs=1", "channels_last=false")
    trainer = Trainer(cfg, seq, seq, **QUIET)
    assert isinstance(trainer.model, HSSM) and trainer.model.in_features == 2
    assert trainer.fit()["status"] == "completed"
    with pytest.raises(ConfigError, match="model.kind=conv needs images"):
        Trainer(tiny_config(tmp_path, "channels_last=false"), seq, seq, **QUIET)
    with pytest.raises(ConfigError, match="channels_last=true lays out 4-d image batches; dataset 'toy' holds seq"):
        Trainer({**cfg, "channels_last": True}, seq, seq, **QUIET)


def test_augmentation_settings_reach_the_training_loader(tmp_path):
    train, test = synthetic_images(64), synthetic_images(32, seed=1, split="test")
    trainer = Trainer(tiny_config(tmp_path, "augment=true", "augment_pad=2", "augment_padding=zero",
                                  "augment_flip=false", "epochs=1"), train, test, **QUIET)
    loader = trainer.train_loader
    assert (loader.augment, loader.pad, loader.padding_mode, loader.flip) == (True, 2, "zero", False)
    assert not trainer.test_loader.augment
    # the same draws give other batches than without augmentation, so the settings act
    plain = Trainer(tiny_config(tmp_path / "plain", "epochs=1"), train, test, **QUIET).train_loader
    assert not torch.equal(next(iter(loader))[0], next(iter(plain))[0])
    # augment null leaves this dataset unaugmented, so a crop setting would do nothing: refused
    with pytest.raises(ConfigError, match=r"\['augment_pad'\] set, but synthetic is not augmented"):
        Trainer(tiny_config(tmp_path / "null", "augment=null", "augment_pad=2"), train, test, **QUIET)


def image_info(shape=(1, 8, 8), classes=4):
    return {"num_classes": classes, "kind": "image", "shape": shape}


def test_conv_model_holding_its_output_layer(tmp_path):
    """readout=false: the last block holds num_classes output units; output_bias fills their
    bias; pad_to zero-pads the images first (the block then sees the padded size)."""
    cfg = tiny_config(tmp_path, "model.readout=false", "model.output_bias=0.5", "model.pad_to=12",
                      "model.last_linear=true", "model.batchnorm=false")
    model = build_model(cfg, image_info())
    assert isinstance(model[0], torch.nn.ZeroPad2d) and isinstance(model[-1], EnergyBlock)
    out_layer = model[-1].couplings[-1]
    assert out_layer.weight.shape[0] == 4 and torch.all(out_layer.bias == 0.5)
    assert not any(isinstance(m, (torch.nn.Linear, torch.nn.BatchNorm2d)) for m in model)
    x = torch.randn(2, 1, 8, 8)
    assert model[0](x).shape == (2, 1, 12, 12)
    with torch.no_grad():
        assert model(x).shape == (2, 4)


@pytest.mark.parametrize("override, message", [
    ("model.output_bias=0.5", "output_bias applies to the output layer of a model without readout"),
    ("model.readout=maybe", "model.readout must be true or false"),
    ("model.pad_to=6", "model.pad_to must be an integer >= the image size 8"),
    ("+model.estimator=cl", "model.estimator: the estimator is chosen by the config keys 'algorithm'"),
    ("model.blocks=[{channels: [1, 4], pools: 'mm'}]", "model.kind=conv: conv_ffebm: block 0 needs channels"),
])
def test_conv_model_option_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        build_model(tiny_config(tmp_path, override), image_info())


def test_relax_dtype_goes_to_every_block_and_only_to_blocks(tmp_path):
    cfg = tiny_config(tmp_path, "relax_dtype=bfloat16", 'model.blocks=[{channels: [1, 4], pools: "m"}, '
                      '{channels: [4, 4], pools: "-"}]')
    model = build_model(cfg, image_info())
    assert [b.relax_dtype for b in model.blocks] == [torch.bfloat16, torch.bfloat16]
    assert all(b.relax_dtype is None for b in build_model(tiny_config(tmp_path), image_info()).blocks)
    hssm = tiny_config(tmp_path, "model={kind: hssm, hidden: 8, state_size: 4, n_blocks: 1}", "algorithm=rhel",
                       "relax_dtype=bfloat16")
    with pytest.raises(ConfigError, match="relax_dtype=bfloat16: HSSM has no energy-based block"):
        build_model(hssm, {"num_classes": 3, "kind": "sequence", "shape": (6, 2)})


def test_relax_summary_reads_the_relaxation_records(tmp_path):
    model = build_model(tiny_config(tmp_path, "model.readout=false", "algorithm=cep", "+estimator.cep.T2=3"),
                        image_info())
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    SquaredError().loss(model(x, target=y), y).backward()
    assert relax_summary(model) == {"free": 4.0, "nudged+": 3.0, "nudged-": 3.0}


def test_epoch_records_log_equilibrium_health_per_block_and_phase(tmp_path):
    """Fixed T1: every free phase runs T1 iterations and no tolerance is reported; with a
    tolerance the converged fraction appears (and the iterations stop early)."""
    train, test = synthetic_images(64, seed=3), synthetic_images(16, seed=4, split="test")
    fixed = Trainer(tiny_config(tmp_path / "fixed", "epochs=1", "model.T1=7"), train, test,
                    echo=lambda _m: None).fit()["last"]
    assert fixed["eq_block1_free_iters"] == 7 and fixed["eq_block1_nudged+_iters"] == 3
    assert "eq_block1_free_converged" not in fixed and fixed["eq_block1_free_residual"] > 0
    tol = Trainer(tiny_config(tmp_path / "tol", "epochs=1", "model.T1=50", "model.tol=1e-3"), train, test,
                  echo=lambda _m: None).fit()["last"]
    assert tol["eq_block1_free_converged"] == 1.0 and tol["eq_block1_free_iters"] < 50
    assert tol["eq_block1_free_residual"] < 1e-3


def test_the_epoch_summary_warns_when_free_phases_stop_at_their_cap(tmp_path):
    """A tolerance the free phases cannot meet within T1 gives one warning per block in the
    epoch's output, naming the block, the share at tol and the cap; a met tolerance none."""
    train, test = synthetic_images(64, seed=3), synthetic_images(16, seed=4, split="test")
    lines: list[str] = []
    Trainer(tiny_config(tmp_path / "cut", "epochs=1", "model.T1=2", "model.tol=1e-9"), train, test,
            echo=lines.append).fit()
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and "block1's free phases met their tolerance in 0.0%" in warnings[0]
    assert "model.T1=2" in warnings[0] and "eq_block1_free_iters" in warnings[0]
    lines.clear()
    Trainer(tiny_config(tmp_path / "met", "epochs=1", "model.T1=50", "model.tol=1e-3"), train, test,
            echo=lines.append).fit()
    assert not [line for line in lines if line.startswith("warning:")]
    record = {"eq_my_block_free_converged": 0.94, "eq_my_block_nudged+_converged": 0.0,
              "eq_b2_free_converged": 0.95}
    assert [w.split("'s")[0] for w in health_warnings(record, {"model": {}})] == ["warning: my_block"]
    assert "cap model.T1." in health_warnings(record, {"model": {}})[0]
