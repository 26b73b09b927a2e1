"""A noisy device's state travels with the checkpoint: stop + resume is bit-identical to an
uninterrupted run; checkpoints without it still load, with a note."""
import pytest
import torch

import eqprop
from eqprop.devices import device_blocks, device_state, load_device_state
from eqprop.training import checkpoint
from eqprop.training.checkpoint import CheckpointError
from eqprop.training.trainer import Trainer
from test_training_helpers import synthetic_images, tiny_config

TRAIN, TEST = synthetic_images(32, seed=1), synthetic_images(16, seed=2, split="test")
NOISY = ("model.device={read_noise: 0.05, program_noise: 0.02, drift: 0.01, asymmetry: 0.1, g_max: 3.0, "
         "adc_bits: 6, seed: 3}")


def run(cfg, on_step=None, resume=False, said=None):
    t = Trainer(cfg, TRAIN, TEST, echo=(said.append if said is not None else lambda _m: None), on_step=on_step)
    if resume:
        t.resume()
    return t, t.fit()


def stop_at(epoch, step):
    def hook(t):
        if t.epoch == epoch and t.step == step:
            t.request_stop()
    return hook


@pytest.mark.parametrize("resample", ["step", pytest.param("relaxation", marks=pytest.mark.slow)])
def test_stop_and_resume_with_a_noisy_device_is_bit_identical(tmp_path, resample):
    noisy = NOISY.replace("seed: 3", f"seed: 3, resample: {resample}")
    straight, summary = run(tiny_config(tmp_path / "a", noisy, "epochs=1"))
    cfg = tiny_config(tmp_path / "b", noisy, "epochs=1")
    first, s1 = run(cfg, on_step=stop_at(0, 1))
    assert s1["status"] == "interrupted"
    assert device_blocks(first.model)  # the device is on
    said: list[str] = []
    resumed, s2 = run(cfg, resume=True, said=said)
    assert not any("note:" in m for m in said)
    assert s2["status"] == "completed"
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert s2["last"]["test_top1"] == summary["last"]["test_top1"]
    da, db = device_state(straight.model), device_state(resumed.model)
    assert da.keys() == db.keys() and all(torch.equal(da[k]["generator"], db[k]["generator"]) for k in da)


def test_without_the_saved_state_the_noise_restarts(tmp_path):
    """The test above can fail: dropping the saved state (an old checkpoint) changes the run,
    and the resume says so."""
    straight, _ = run(tiny_config(tmp_path / "a", NOISY, "epochs=1"))
    cfg = tiny_config(tmp_path / "b", NOISY, "epochs=1")
    run(cfg, on_step=stop_at(0, 1))
    path = tmp_path / "b" / "checkpoint.pt"
    state = checkpoint.load(path)
    assert state["devices"]
    del state["devices"]
    checkpoint.save_atomic(state, path)
    said: list[str] = []
    resumed, s2 = run(cfg, resume=True, said=said)
    assert s2["status"] == "completed"
    assert any("holds no device state" in m and "restart from their seeds" in m for m in said)
    sa, sb = straight.model.state_dict(), resumed.model.state_dict()
    assert any(not torch.equal(sa[k], sb[k]) for k in sa)


def test_a_changed_device_starts_from_its_seed(tmp_path):
    cfg = tiny_config(tmp_path, NOISY, "epochs=1")
    run(cfg, on_step=stop_at(0, 1))
    said: list[str] = []
    t = Trainer(tiny_config(tmp_path, NOISY.replace("seed: 3", "seed: 4"), "epochs=1"), TRAIN, TEST, echo=said.append)
    t.resume()
    assert any("device settings changed" in m for m in said)


def test_device_state_round_trip_and_bad_states():
    def model():
        torch.manual_seed(0)
        m = eqprop.dense_ffebm(10, [[8, 6]], num_classes=3, T1=4)
        m.configure_blocks(device={"read_noise": 0.05, "program_noise": 0.02, "g_max": 3.0})
        return m
    a, b = model(), model()
    for m in (a, b):
        for blk in device_blocks(m):
            blk.program_(None)  # draws from the block's generator
    a_state = device_state(a)
    assert a_state and all(s["generator"].dtype == torch.uint8 for s in a_state.values())
    load_device_state(b, a_state)
    assert all(torch.equal(device_state(b)[k]["generator"], a_state[k]["generator"]) for k in a_state)
    name = next(iter(a_state))
    with pytest.raises(ValueError, match=f"device state of {name}.*generator"):
        load_device_state(b, {name: {**a_state[name], "generator": torch.zeros(3)}})
    with pytest.raises(ValueError, match="no block 'nope'"):
        load_device_state(b, {"nope": a_state[name]})


def test_checkpoint_with_a_damaged_device_state_is_refused(tmp_path):
    cfg = tiny_config(tmp_path, NOISY, "epochs=1")
    run(cfg, on_step=stop_at(0, 1))
    path = tmp_path / "checkpoint.pt"
    state = checkpoint.load(path)
    state["devices"] = [1, 2]
    checkpoint.save_atomic(state, path)
    with pytest.raises(CheckpointError, match="'devices' is not a mapping"):
        checkpoint.load(path)
