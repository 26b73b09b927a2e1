"""CUDA paths (skipped without a GPU; benchmarks/gpu_check.sh runs them with `pytest -m cuda`),
and the CPU-side pieces of that check: the synthetic dataset writer and its script."""
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from eqprop import EP, ID, ConvHopfield
from eqprop.data import load_dataset
from eqprop.testing import rel_error

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.synthetic_data import write_cifar10  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def test_synthetic_cifar10_files_read_back_with_the_library_reader(tmp_path):
    write_cifar10(tmp_path, per_batch=20, seed=1)
    train, test = load_dataset("cifar10", "train", tmp_path), load_dataset("cifar10", "test", tmp_path)
    assert len(train) == 100 and len(test) == 20 and tuple(train.x.shape[1:]) == (3, 32, 32)
    assert int(train.y.max()) < 10
    with pytest.raises(ValueError, match="per_batch must be >= 1"):
        write_cifar10(tmp_path, per_batch=0)


def test_gpu_check_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")], check=True)


def _block():
    torch.manual_seed(0)
    return ConvHopfield([3, 8, 8], pools="m-", fc=[10], in_size=8, T1=40, tol=None, init="kaiming", slope=0.5)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("estimator", [EP(beta=0.05, T2=40), ID(tol=1e-10, max_iter=500),
                                       ID(solver="minres", tol=1e-10, max_iter=500)], ids=["ep", "id", "id-minres"])
def test_gradients_on_cuda_equal_the_cpu_in_float64(estimator):
    block = _block().double()
    block.estimator = estimator
    u = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    grads = {}
    for device in ("cpu", "cuda"):
        b = _block().double().to(device)
        b.load_state_dict(block.state_dict())
        b.estimator = estimator
        x = u.to(device).requires_grad_(True)
        out = b(x)
        (out * torch.arange(out.numel(), device=device, dtype=out.dtype).view_as(out)).sum().backward()
        grads[device] = [x.grad.cpu()] + [p.grad.cpu() for p in b.parameters()]
    for a, c in zip(grads["cpu"], grads["cuda"]):
        assert rel_error(c, a) < 1e-8


@pytest.mark.cuda
@cuda
def test_bfloat16_relaxation_on_cuda_runs_and_stays_close_to_float32():
    block = _block().cuda()
    u = torch.randn(8, 3, 8, 8, device="cuda")
    s32, _ = block.relax(u)
    block.configure(relax_dtype=torch.bfloat16)
    s16, stats = block.relax(u)
    assert stats.iters == 40 and s16[-1].dtype == torch.float32
    assert rel_error(s16[-1], s32[-1]) < 0.05


def _host_syncs(fn) -> int:
    """How many host-device synchronisations fn() causes (CUDA's sync debug warnings)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return len([w for w in caught if "synchroniz" in str(w.message)])


@pytest.mark.cuda
@cuda
def test_a_fixed_length_relaxation_synchronises_the_host_once():
    block = _block().cuda()
    u = torch.randn(8, 3, 8, 8, device="cuda")
    block.relax(u)  # warm-up (allocations, cuDNN)
    assert _host_syncs(lambda: block.relax(u)) <= 1


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["float32", "bfloat16"])
def test_compiled_sweeps_on_cuda_equal_eager_and_synchronise_once(dtype):
    block = _block().cuda().configure(relax_dtype=dtype)
    u = torch.randn(8, 3, 8, 8, device="cuda")
    eager, _ = block.relax(u)
    block.configure(compile_sweep=True)
    compiled, stats = block.relax(u)  # compiles (triton kernels: fused bias, activation)
    assert stats.iters == 40
    for a, b in zip(eager, compiled):
        assert rel_error(b, a) < (1e-5 if dtype is None else 0.05)
    assert _host_syncs(lambda: block.relax(u)) <= 1
