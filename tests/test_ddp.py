"""DistributedDataParallel on CPU (gloo): 2 processes equal 1 process on the combined batch."""
import os

import torch

from eqprop.training.trainer import Trainer
from test_training_helpers import free_port, free_ports, join_as_rank, spawn_ranks, synthetic_images, tiny_config

# a dense model (no batch-norm, whose statistics would be per rank), EP with fixed
# iterations, float64 so that only the order of the gradient sums differs
OVERRIDES = ("model={kind: dense, blocks: [[12, 6]], T1: 6}", "estimator.ep.T2=4", "dtype=float64",
             "epochs=1", "batch_size=16", "optim.lr=0.005", "dist_timeout_s=120")


def _data():
    return synthetic_images(64, seed=3), synthetic_images(16, seed=4, split="test")


def _fit_and_save(trainer: Trainer, rank: int, out: str) -> None:
    """Train to the end and write this rank's weights and last metrics to out/rank<r>.pt."""
    try:
        summary = trainer.fit()
        torch.save({"state": trainer.model.state_dict(), "last": summary["last"]},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        trainer.close()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    join_as_rank(rank, world, port)
    torch.set_num_threads(1)
    train, test = _data()
    _fit_and_save(Trainer(tiny_config(out, *OVERRIDES), train, test, echo=lambda _m: None), rank, out)


def test_two_gloo_processes_equal_one_process(tmp_path, monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    train, test = _data()
    single = Trainer(tiny_config(tmp_path / "one", *OVERRIDES), train, test, echo=lambda _m: None)
    one = single.fit()
    assert len(single.train_loader) == 4  # several optimizer steps

    out = tmp_path / "two"
    out.mkdir()
    spawn_ranks(_worker, 2, free_port(), str(out))
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, p in single.model.state_dict().items():
        for r in ranks:
            assert torch.allclose(r["state"][name], p, rtol=0, atol=1e-12), name
    init = Trainer(tiny_config(tmp_path / "init", *OVERRIDES), train, test, echo=lambda _m: None).model
    block_params = [k for k in init.state_dict() if "couplings" in k]
    assert block_params and all(not torch.equal(init.state_dict()[k], single.model.state_dict()[k])
                                for k in block_params)  # the EP gradients reached the block
    # metrics are reduced over ranks: the same numbers as one process
    for key in ("train_loss", "train_top1", "test_loss", "test_top1"):
        for r in ranks:
            assert abs(r["last"][key] - one["last"][key]) < 1e-9, key


def _stop_resume_worker(rank: int, world: int, port: int, port2: int, out: str) -> None:
    """Stop after the first step of epoch 1 (a partly done epoch), then resume in a new
    process group (as a second torchrun launch would; a group re-created on the port of the
    one just destroyed can meet the old group's store)."""
    join_as_rank(rank, world, port)
    torch.set_num_threads(1)
    train, test = _data()
    cfg = tiny_config(os.path.join(out, "run"), *OVERRIDES)

    def stop_mid_epoch(t):
        if t.epoch == 0 and t.step == 1:
            t.request_stop()
    first = Trainer(cfg, train, test, echo=lambda _m: None, on_step=stop_mid_epoch)
    try:
        assert first.fit()["status"] == "interrupted"
    finally:
        first.close()
    join_as_rank(rank, world, port2)
    second = Trainer(cfg, train, test, echo=lambda _m: None)
    second.resume()
    _fit_and_save(second, rank, out)


def test_two_ranks_stopped_mid_epoch_resume_to_the_one_process_run(tmp_path, monkeypatch):
    """The stopped epoch's metric sums are reduced over the ranks before the save and counted
    once at resume: the resumed 2-rank run reports what one uninterrupted process does."""
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    train, test = _data()
    one = Trainer(tiny_config(tmp_path / "one", *OVERRIDES), train, test, echo=lambda _m: None).fit()
    spawn_ranks(_stop_resume_worker, 2, *free_ports(2), str(tmp_path))
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for key in ("train_loss", "train_top1", "test_loss", "test_top1"):
            assert abs(got["last"][key] - one["last"][key]) < 1e-9, (r, key)


# a conv model with batch norm in its feedforward parts (between and before the blocks); SGD,
# since Adam turns the rounding noise of the gradient of a conv bias before a batch norm
# (exactly zero in exact arithmetic) into steps of the size of the learning rate
BN_OVERRIDES = ('model.blocks=[{channels: [1, 4, 8], pools: "m-"}, {channels: [8, 8], pools: "-"}]', "model.T1=6",
                "estimator.ep.T2=4", "dtype=float64", "epochs=1", "batch_size=16", "dist_timeout_s=120",
                "optim.name=sgd", "optim.lr=0.05")


def _bn_worker(rank: int, world: int, port: int, out: str, sync: bool) -> None:
    join_as_rank(rank, world, port)
    torch.set_num_threads(1)
    train, test = _data()
    cfg = tiny_config(os.path.join(out, f"run{rank}"), *BN_OVERRIDES, f"sync_batchnorm={str(sync).lower()}")
    _fit_and_save(Trainer(cfg, train, test, echo=lambda _m: None), rank, out)


def test_synchronised_batch_norm_makes_two_ranks_equal_one_process(tmp_path, monkeypatch):
    """With sync_batchnorm the batch statistics are the global batch's: parameters, running
    statistics and metrics of 2 gloo ranks equal one process; without it they differ."""
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    train, test = _data()
    single = Trainer(tiny_config(tmp_path / "one", *BN_OVERRIDES), train, test, echo=lambda _m: None)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in single.model.modules())
    one = single.fit()
    reference = single.model.state_dict()
    for sync in (True, False):
        out = tmp_path / f"sync{sync}"
        out.mkdir()
        spawn_ranks(_bn_worker, 2, free_port(), str(out), sync)
        ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
        assert set(ranks[0]["state"]) == set(reference)  # the same checkpoint keys either way
        gaps = {name: max((r["state"][name].double() - p.double()).abs().max().item() for r in ranks)
                for name, p in reference.items() if p.is_floating_point()}
        if sync:
            assert max(gaps.values()) < 1e-10, sorted(gaps.items(), key=lambda kv: -kv[1])[:4]
            for key in ("train_loss", "train_top1", "test_loss", "test_top1"):
                assert all(abs(r["last"][key] - one["last"][key]) < 1e-9 for r in ranks), key
        else:  # per-rank statistics: another trajectory (the running means differ at once)
            assert max(gaps[n] for n in gaps if n.endswith("running_mean")) > 1e-6, gaps
