"""Checkpoints: atomic and safe; resuming ends bit-identical to an uninterrupted run."""
import os
import signal

import pytest
import torch

from eqprop.training import checkpoint
from eqprop.training.checkpoint import CheckpointError
from eqprop.training.trainer import Trainer
from test_training_helpers import synthetic_images, tiny_config

TRAIN, TEST = synthetic_images(96, seed=1), synthetic_images(32, seed=2, split="test")


def run(cfg, on_step=None, resume=False):
    t = Trainer(cfg, TRAIN, TEST, echo=lambda _m: None, on_step=on_step)
    if resume:
        t.resume()
    return t, t.fit()


def assert_same_state(a: Trainer, b: Trainer):
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    oa, ob = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert oa and oa.keys() == ob.keys()  # both have taken steps, on the same parameters
    for i in oa:
        assert oa[i].keys() == ob[i].keys(), i
        for k in oa[i]:
            assert torch.equal(torch.as_tensor(oa[i][k]), torch.as_tensor(ob[i][k])), (i, k)


def test_resume_after_one_epoch_is_bit_identical(tmp_path):
    straight, summary = run(tiny_config(tmp_path / "a"))
    assert summary["status"] == "completed" and summary["epoch"] == 2
    rng_after_straight = torch.get_rng_state()

    def stop_at_epoch_end(t):
        if t.epoch == 0 and t.step == len(t.train_loader):
            t._stop = True
    cfg = tiny_config(tmp_path / "b")
    first, s1 = run(cfg, on_step=stop_at_epoch_end)
    assert s1["status"] == "interrupted" and (s1["epoch"], s1["step"]) == (0, len(first.train_loader))
    resumed, s2 = run(cfg, resume=True)
    assert s2["status"] == "completed" and s2["epoch"] == 2
    assert_same_state(straight, resumed)
    assert torch.equal(rng_after_straight, torch.get_rng_state())
    assert s2["last"]["test_top1"] == summary["last"]["test_top1"]
    assert s2["last"]["train_loss"] == summary["last"]["train_loss"]
    fresh = Trainer(cfg, TRAIN, TEST, echo=lambda _m: None).model.state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in straight.model.state_dict().items())  # it trained


def test_ctrl_c_mid_epoch_then_resume_is_bit_identical(tmp_path):
    straight, _ = run(tiny_config(tmp_path / "a", "optim.schedule_unit=step"))

    def ctrl_c(t):  # a real SIGINT, delivered to the trainer's handler
        if t.epoch == 1 and t.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
    cfg = tiny_config(tmp_path / "b", "optim.schedule_unit=step")
    _, s1 = run(cfg, on_step=ctrl_c)
    assert s1["status"] == "interrupted" and (s1["epoch"], s1["step"]) == (1, 2)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored
    resumed, s2 = run(cfg, resume=True)
    assert_same_state(straight, resumed)
    assert resumed.scheduler.last_epoch == straight.scheduler.last_epoch


def test_atomic_save_and_safe_load(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save_atomic({"format": checkpoint.FORMAT, "x": torch.ones(2)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind
    with pytest.raises(CheckpointError, match=r"c.pt lacks"):
        checkpoint.load(path)


@pytest.mark.parametrize("content,match", [(b"", "is empty"), (b"not a checkpoint at all", "cannot be read"),
                                           (None, "does not exist")])
def test_bad_files_name_the_file(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"bad.pt.*{match}|{match}.*bad.pt"):
        checkpoint.load(path)


class Payload:  # an object that weights_only loading must refuse to build
    def __reduce__(self):
        return (print, ("code ran",))


def test_truncated_and_code_carrying_files_are_refused(tmp_path, tiny_run):
    good = tiny_run / "checkpoint.pt"
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cut.pt.*cannot be read"):
        checkpoint.load(cut)
    evil = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "obj": Payload()}, evil)
    with pytest.raises(CheckpointError, match="evil.pt.*cannot be read safely"):
        checkpoint.load(evil)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="other.pt is not an eqprop training checkpoint"):
        checkpoint.load(other)


def test_checkpoint_of_another_architecture(tmp_path, tiny_run):
    cfg = tiny_config(tiny_run, 'model.blocks=[{channels: [1, 6, 8], pools: "m-"}]')
    t = Trainer(cfg, TRAIN, TEST, echo=lambda _m: None)
    with pytest.raises(CheckpointError, match=r"checkpoint.pt was written for a different architecture.*size mismatch"):
        t.resume()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(out, "epochs=1")
    Trainer(cfg, TRAIN, TEST, echo=lambda _m: None).fit()
    return out
