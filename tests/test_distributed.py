"""Device choice per rank and failure propagation across ranks (gloo on CPU; CUDA mocked)."""
import os

import pytest
import torch

from eqprop.training import distributed
from eqprop.training.distributed import DistInfo, gather_errors, rank_seed, resolve_device
from test_training_helpers import free_port, join_as_rank, spawn_ranks


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two visible GPUs, no real CUDA call."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(d))
    return chosen


def test_each_torchrun_rank_gets_its_local_gpu(fake_cuda):
    assert resolve_device("cuda", local_rank=1, world_size=2) == torch.device("cuda", 1)
    assert resolve_device("auto", local_rank=0, world_size=2) == torch.device("cuda", 0)
    assert fake_cuda == [torch.device("cuda", 1), torch.device("cuda", 0)]
    assert resolve_device("cuda:1", local_rank=0, world_size=1) == torch.device("cuda", 1)  # one process: as asked


def test_an_explicit_gpu_under_torchrun_is_refused(fake_cuda):
    with pytest.raises(ValueError, match=r"device='cuda:0' with 2 processes would put every rank on GPU 0"):
        resolve_device("cuda:0", local_rank=1, world_size=2)
    with pytest.raises(RuntimeError, match=r"cuda:2 does not exist: 2 GPU\(s\) are visible"):
        resolve_device("cuda", local_rank=2, world_size=4)
    assert fake_cuda == []


def test_device_names_are_checked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'gpu0' is not a device name"):
        resolve_device("gpu0")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_rank_seeds_differ_and_rank_zero_keeps_the_seed():
    seeds = [rank_seed(7, DistInfo(rank=r, world_size=4)) for r in range(4)]
    assert seeds[0] == 7 and len(set(seeds)) == 4


def test_gather_errors_in_one_process():
    info = DistInfo()
    assert gather_errors(None, info) == []
    assert gather_errors(ValueError("bad"), info) == [(0, "ValueError: bad")]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    join_as_rank(rank, world, port)
    info = distributed.setup("cpu")
    try:
        err = RuntimeError(f"diverged at step 3 on rank {rank}") if rank == 1 else None
        failed = gather_errors(err, info)
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write(repr(failed))
    finally:
        distributed.teardown(info)



def test_a_failure_on_one_rank_reaches_every_rank(tmp_path, monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    spawn_ranks(_worker, 2, free_port(), str(tmp_path))
    expected = repr([(1, "RuntimeError: diverged at step 3 on rank 1")])
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == [expected, expected]


def _silent_peer_worker(rank: int, world: int, port: int, out: str) -> None:
    join_as_rank(rank, world, port)
    info = distributed.setup("cpu", timeout_s=3)
    if rank == 0:
        import time
        t0 = time.monotonic()
        try:
            distributed.all_reduce_sum(torch.ones(1), info)
            message = "returned"
        except RuntimeError as e:
            message = f"failed after {time.monotonic() - t0:.1f} s: {e}"
        with open(os.path.join(out, "rank0.txt"), "w") as f:
            f.write(message)
    else:  # never joins the collective: gone quiet, as a hung or dead rank is
        import time
        time.sleep(8)


def test_a_rank_that_never_answers_fails_the_others_after_the_timeout(tmp_path, monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    spawn_ranks(_silent_peer_worker, 2, free_port(), str(tmp_path), timeout_s=120)
    message = (tmp_path / "rank0.txt").read_text()
    assert message.startswith("failed after"), message
    assert float(message.split()[2]) < 8  # the timeout, not the peer's return, ended the wait


def test_sync_batchnorm_keeps_parameters_and_equals_batch_norm_in_one_process():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3),
                                torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(3 * 4 * 4)))
    reference = torch.nn.Sequential(*[m for m in __import__("copy").deepcopy(model)])
    params = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    distributed.sync_batchnorm(model, torch.device("cpu"))
    assert isinstance(model[1], distributed.SyncBatchNorm) and isinstance(model[2][1], distributed.SyncBatchNorm)
    assert [id(p) for p in model.parameters()] == params and list(model.state_dict()) == keys
    x = torch.randn(5, 1, 6, 6)
    assert torch.equal(model(x), reference(x))  # no process group: plain batch norm
    assert torch.equal(model[1].running_mean, reference[1].running_mean)
    with pytest.raises(ValueError, match="for 4-d inputs.*got a 2-d input"):
        model[1](torch.randn(4, 3))
