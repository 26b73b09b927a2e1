"""Checkpoints: atomic, two kept, safe and checked loads (truncated, corrupt, hand-edited,
code-carrying files), RNG states; resuming ends bit-identical to an uninterrupted run."""
import os
import signal

import pytest
import torch

from eqprop.training import checkpoint
from eqprop.training.checkpoint import CheckpointError
from eqprop.training.config import ConfigError
from eqprop.training.metrics import read_metrics
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
            t.request_stop()
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
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs in a background job
    _, s1 = run(cfg, on_step=ctrl_c)
    assert s1["status"] == "interrupted" and (s1["epoch"], s1["step"]) == (1, 2)
    assert signal.getsignal(signal.SIGINT) is before  # the handler of before the run is back
    resumed, s2 = run(cfg, resume=True)
    assert_same_state(straight, resumed)
    assert resumed.scheduler.last_epoch == straight.scheduler.last_epoch


def test_atomic_save_and_safe_load(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save_atomic({"format": checkpoint.FORMAT, "x": torch.ones(2)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind
    with pytest.raises(CheckpointError, match=r"c.pt lacks"):
        checkpoint.load(path)


@pytest.mark.parametrize("content,match", [(b"", "is empty"), (b"not a checkpoint at all", "not a valid eqprop"),
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


@pytest.mark.parametrize("keep", [0.5, -30, -1])  # cut in the middle, inside the end record, the last byte
def test_truncated_files_are_named_truncated(tmp_path, tiny_run, keep):
    good = (tiny_run / "checkpoint.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good[: int(len(good) * keep) if keep > 0 else len(good) + keep])
    with pytest.raises(CheckpointError, match=r"cut.pt is truncated \(\d+ bytes") as info:
        checkpoint.load(cut)
    assert "Errno" not in str(info.value)


def test_corrupt_and_code_carrying_files_are_refused_without_unsafe_advice(tmp_path, tiny_run):
    data = bytearray((tiny_run / "checkpoint.pt").read_bytes())
    data[len(data) // 3] ^= 0xFF  # a flipped byte inside a tensor: torch would load it silently
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="flipped.pt is corrupt: its part .* fails its checksum"):
        checkpoint.load(flipped)
    evil = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "obj": Payload()}, evil)
    with pytest.raises(CheckpointError, match="evil.pt is not a valid eqprop checkpoint or comes from an untrusted "
                                              "source.*print") as info:
        checkpoint.load(evil)
    message = str(info.value)
    assert "weights_only" not in message and "safe_globals" not in message and "\n" not in message
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(1)}, other)
    with pytest.raises(CheckpointError, match="other.pt is not an eqprop training checkpoint"):
        checkpoint.load(other)


def edited(tmp_path, tiny_run, edit) -> object:
    state = torch.load(tiny_run / "checkpoint.pt", weights_only=True)
    edit(state)
    path = tmp_path / "edited.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("edit,match", [
    (lambda s: s["position"].update(epoch="two"), r"'position.epoch' must be an integer >= 0, got 'two'"),
    (lambda s: s["position"].pop("step"), r"'position' must be \{'epoch': E, 'step': S\}, got \{'epoch': 1\}"),
    (lambda s: s["rng"].pop("numpy"), r"'rng.numpy' is missing"),
    (lambda s: s.update(model={"w": 1.0}), r"'model' is not a mapping of parameter names to tensors"),
    (lambda s: s.update(optimizer=[1, 2]), r"'optimizer' is not a mapping"),
])
def test_hand_edited_checkpoints_name_the_key(tmp_path, tiny_run, edit, match):
    with pytest.raises(CheckpointError, match=rf"edited.pt: {match}; the file was edited or is damaged"):
        checkpoint.load(edited(tmp_path, tiny_run, edit))


def test_checkpoint_of_another_architecture(tmp_path, tiny_run):
    cfg = tiny_config(tiny_run, 'model.blocks=[{channels: [1, 6, 8], pools: "m-"}]')
    t = Trainer(cfg, TRAIN, TEST, echo=lambda _m: None)
    with pytest.raises(ConfigError, match=r"model.blocks cannot change on resume: the run in .*checkpoint.pt has "
                                          r"\[\{'channels': \[1, 4, 8\].*holds the parameters of that architecture"):
        t.resume()
    # a checkpoint whose tensors were swapped for another shape: the config agrees, the state does not
    path = edited(tmp_path, tiny_run, lambda s: s["model"].update({k: torch.zeros(3) for k in list(s["model"])[:1]}))
    t = Trainer(tiny_config(tiny_run), TRAIN, TEST, echo=lambda _m: None)
    with pytest.raises(CheckpointError, match=r"edited.pt was written for a different architecture.*size mismatch"):
        t.resume(path)


def test_two_checkpoints_kept_and_resume_falls_back_to_the_older(tmp_path):
    """A 3-epoch run keeps epochs 3 and 2; with the newer one truncated, resuming says so,
    trains epoch 3 again from the older one, and ends where the uninterrupted run ended."""
    cfg = tiny_config(tmp_path, "epochs=3")
    straight, _ = run(cfg)
    out = tmp_path
    newest, older = out / "checkpoint.pt", out / "checkpoint.prev.pt"
    assert checkpoint.load(newest)["position"]["epoch"] == 3 and checkpoint.load(older)["position"]["epoch"] == 2
    newest.write_bytes(newest.read_bytes()[:1000])
    said = []
    t = Trainer(cfg, TRAIN, TEST, echo=said.append)
    t.resume()
    assert any(f"{newest} is truncated" in m and f"resuming from the previous checkpoint {older}" in m
               and "the end of epoch 2" in m for m in said), said
    assert t.fit()["status"] == "completed"  # epoch 3 trained again, its record replaced
    assert_same_state(straight, t)
    assert [r["epoch"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    # the damaged checkpoint was replaced, not kept as the previous one
    assert checkpoint.load(newest)["position"]["epoch"] == 3 and checkpoint.load(older)["position"]["epoch"] == 2
    # a rotation interrupted between its two renames leaves only the previous checkpoint
    newest.unlink()
    state, used = checkpoint.load_latest(newest, echo=said.append)
    assert used == older and "does not exist; resuming from the previous checkpoint" in said[-1]
    older.write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="does not exist; the previous checkpoint cannot be used either: .*junk|"
                                              "does not exist; the previous checkpoint cannot be used either"):
        checkpoint.load_latest(newest)


def test_stale_temporary_files_are_removed_at_start(tmp_path):
    stale = [tmp_path / ".checkpoint.pt.k2j3h.tmp", tmp_path / ".metrics.jsonl.x1.tmp"]
    other = tmp_path / "notes.tmp"  # not a file of the run: kept
    for p in (*stale, other):
        p.write_bytes(b"partial")
    said = []
    Trainer(tiny_config(tmp_path, "epochs=1"), TRAIN, TEST, echo=said.append).fit()
    assert not any(p.exists() for p in stale) and other.exists()
    assert any("removed 2 temporary file(s)" in m and ".checkpoint.pt.k2j3h.tmp" in m for m in said)
    assert not list(tmp_path.glob(".*.tmp"))


def test_checkpoints_load_on_the_cpu_first(tmp_path, tiny_run, monkeypatch):
    seen = []
    real = torch.load
    monkeypatch.setattr(checkpoint.torch, "load", lambda *a, **k: seen.append(k) or real(*a, **k))
    t = Trainer(tiny_config(tiny_run), TRAIN, TEST, echo=lambda _m: None)
    t.resume()
    assert seen and all(k["map_location"] == "cpu" and k["weights_only"] is True for k in seen)
    assert all(p.device.type == "cpu" for p in t.model.parameters())


def test_cuda_rng_states_restored_only_for_visible_devices(tiny_run, monkeypatch):
    state = checkpoint.load(tiny_run / "checkpoint.pt")["rng"]
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8) + i for i in range(3)]  # written with 3 GPUs
    checkpoint.set_rng_state(state)  # no CUDA here (or whatever is visible): no error
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((int(s[0]), device)))
    checkpoint.set_rng_state(state)
    assert restored == [(0, 0)]
    restored.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # more GPUs now than saved
    checkpoint.set_rng_state(state)
    assert restored == [(0, 0), (1, 1), (2, 2)]


def test_kill_point_is_a_documented_test_hook(monkeypatch):
    """SIGKILL at the N-th time a point is reached when EQPROP_KILL_AT names it (the soak
    test kills real processes with it); nothing without the variable."""
    sent = []
    monkeypatch.setattr(checkpoint.os, "kill", lambda pid, sig: sent.append((pid, sig)))
    monkeypatch.setattr(checkpoint, "_kill_counts", {})
    monkeypatch.delenv("EQPROP_KILL_AT", raising=False)
    for _ in range(3):
        checkpoint.kill_point("save")
    assert sent == []
    monkeypatch.setenv("EQPROP_KILL_AT", "log:1,save:2")
    for _ in range(3):
        checkpoint.kill_point("save")
    assert sent == [(os.getpid(), signal.SIGKILL)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config(out, "epochs=1")
    Trainer(cfg, TRAIN, TEST, echo=lambda _m: None).fit()
    return out
