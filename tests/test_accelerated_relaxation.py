"""Over-relaxation (omega) and Anderson acceleration (anderson) of a block's relaxation:
same fixed points as the plain sweep, fewer sweeps, layouts kept, bad settings refused."""
import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eqprop import ConvHopfield, DenseHopfield
from eqprop.blocks import relative_change
from eqprop.solvers import AndersonMixer
from eqprop.spiking import SpikingDenseHopfield
from eqprop.training.trainer import Trainer
from test_training_helpers import synthetic_images, tiny_config, write_fashion_mnist


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), omega=st.floats(0.5, 1.5), m=st.integers(0, 6),
       update=st.sampled_from(["sync", "async"]))
def test_accelerated_relaxations_reach_the_plain_fixed_point(seed, omega, m, update):
    torch.manual_seed(seed)
    block = DenseHopfield([6, 12, 9, 4], slope=0.5, update=update, T1=3000, tol=1e-13).double()
    u = torch.randn(5, 6, dtype=torch.float64)
    plain, plain_stats = block.relax(u)
    assert plain_stats.converged
    block.configure(omega=omega, anderson=m)
    fast, stats = block.relax(u)
    assert stats.converged
    assert float(relative_change(fast, plain)) < 1e-10


def test_anderson_and_over_relaxation_need_fewer_sweeps_on_a_slow_convex_block():
    # identity units and a coupling of norm 0.97: a convex energy (SPD Hessian) whose plain
    # Gauss-Seidel sweep contracts slowly; SOR converges for 0 < omega < 2 on it
    torch.manual_seed(0)
    block = DenseHopfield([4, 8, 8], activation="identity", T1=3000, tol=1e-8).double()
    with torch.no_grad():
        q = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))[0]
        block.couplings[1].linear.weight.copy_(0.97 * q)
        block.couplings[0].linear.weight.mul_(0.1)
    u = torch.randn(4, 4, dtype=torch.float64)
    plain_s, plain = block.relax(u)
    results = {}
    for kw in ({"anderson": 5}, {"omega": 1.6}):
        block.configure(omega=kw.get("omega", 1.0), anderson=kw.get("anderson", 0))
        s, results[str(kw)] = block.relax(u)
        assert float(relative_change(s, plain_s)) < 1e-6
    assert plain.converged and all(r.converged for r in results.values())
    assert all(3 * r.iters < plain.iters for r in results.values()), (plain.iters, results)


def test_anderson_keeps_channels_last_and_a_held_last_layer():
    torch.manual_seed(1)
    block = ConvHopfield([2, 4, 4], pools="--", in_size=6, slope=0.5, T1=300, tol=1e-12, anderson=4).double()
    u = torch.randn(3, 2, 6, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    s, stats = block.relax(u)
    assert stats.converged and all(x.is_contiguous(memory_format=torch.channels_last) for x in s)
    ref, _ = block.configure(anderson=0).relax(u.contiguous())
    assert float(relative_change(s, ref)) < 1e-10
    clamp = torch.rand_like(ref[-1])
    s0 = [x.clone() for x in ref[:-1]] + [clamp]
    held, _ = block.configure(anderson=4).relax(u, s0=s0, hold_last=True, T=20, tol=None)
    assert torch.equal(held[-1], clamp)


def test_anderson_solves_a_linear_fixed_point_in_about_n_steps():
    # x = A x + b: Anderson with a long enough history is a Krylov method (GMRES-like)
    g = torch.Generator().manual_seed(0)
    n = 6
    a = 0.9 * torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]  # slow: |eig| = 0.9
    b = torch.randn(2, n, generator=g, dtype=torch.float64)
    x_star = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - a, b.T).T
    mixer, x = AndersonMixer(n + 2), [torch.zeros(2, n, dtype=torch.float64)]
    for _ in range(n + 2):
        x = mixer.mix(x, [x[0] @ a.T + b])
    assert torch.allclose(x[0], x_star, atol=1e-8)
    plain = torch.zeros(2, n, dtype=torch.float64)
    for _ in range(n + 2):
        plain = plain @ a.T + b
    assert (plain - x_star).norm() > 0.1


@pytest.mark.parametrize("settings_, match", [
    ({"omega": 0.0}, "omega"), ({"omega": 2.0}, "omega"), ({"omega": True}, "omega"), ({"omega": "1"}, "omega"),
    ({"anderson": -1}, "anderson"), ({"anderson": 2.5}, "anderson"), ({"anderson": True}, "anderson"),
])
def test_bad_solver_settings_are_refused_and_nothing_changes(settings_, match):
    block = DenseHopfield([4, 3])
    with pytest.raises(ValueError, match=match):
        block.configure(**settings_)
    assert (block.omega, block.anderson) == (1.0, 0)
    with pytest.raises(ValueError, match=match):
        DenseHopfield([4, 3], **settings_)


def test_device_models_and_spiking_blocks_refuse_the_solvers():
    with pytest.raises(ValueError, match="not circuits"):
        DenseHopfield([4, 3], device={"read_noise": 0.01}, anderson=3)
    block = DenseHopfield([4, 3], device={"read_noise": 0.01})
    with pytest.raises(ValueError, match="not circuits"):
        block.configure(omega=1.2)
    with pytest.raises(ValueError, match="omega and anderson"):
        SpikingDenseHopfield([4, 3], anderson=2)
    with pytest.raises(ValueError, match="m must be a positive integer"):
        AndersonMixer(0)


def test_solver_benchmark_on_a_training_checkpoint(tmp_path):
    root = write_fashion_mnist(tmp_path / "data", n_train=64, n_test=16)
    out = tmp_path / "run"
    Trainer(tiny_config(out, "epochs=1", f"data_dir={root}", "limit_train=32", "log_every=0"),
            echo=lambda _m: None).fit()
    repo = str(Path(__file__).resolve().parents[1])
    sys.path.insert(0, repo)
    try:
        from benchmarks import solver
    finally:
        sys.path.remove(repo)
    assert solver.main(["--checkpoints", str(out / "checkpoint.pt"), "--labels", "tiny", "--batches", "1",
                        "--batch", "4", "--T", "50", "--data-dir", str(root), "--out", str(tmp_path / "s")]) == 0
    result = json.loads((tmp_path / "s.json").read_text())
    rows = result["runs"][0]["rows"]
    assert {r["name"] for r in rows} == {s["name"] for s in solver.SETTINGS}
    assert all(r["iters"] >= 1 and r["distance_to_reference"] < 1e-2 for r in rows)
    assert "| tiny |" in (tmp_path / "s.md").read_text()


def test_the_trainer_runs_anderson_and_a_resume_may_change_it(tmp_path):
    train, test = synthetic_images(32, seed=1), synthetic_images(16, seed=2, split="test")
    cfg = tiny_config(tmp_path, "model.anderson=3", "model.omega=1.1", "model.T1=30", "model.tol=1e-4",
                      "epochs=1")
    t = Trainer(cfg, train, test, echo=lambda _m: None)
    assert all((b.anderson, b.omega) == (3, 1.1) for b in t.model.blocks)
    assert t.fit()["status"] == "completed"
    said: list[str] = []
    t2 = Trainer(tiny_config(tmp_path, "model.anderson=0", "model.T1=30", "model.tol=1e-4", "epochs=2"), train,
                 test, echo=said.append)
    t2.resume()
    assert all((b.anderson, b.omega) == (0, 1.0) for b in t2.model.blocks)
    assert t2.fit()["status"] == "completed"


def test_anderson_restarts_a_sample_whose_residual_grows_and_keeps_the_layout():
    # sample 0 converges (x -> x / 2), sample 1's residual grows at its third call: only its history is dropped
    mixer = AndersonMixer(3)
    x = torch.ones(2, 4, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    xs = [x]
    for step in [1.0, 0.5, 4.0]:  # sample 1's residual G(x) - x
        g = xs[0] / 2
        g[1] = xs[0][1] + step
        xs = mixer.mix(xs, [g])
    assert mixer.restarts.tolist() == [0, 1]
    assert mixer.valid[1].sum().item() == 1 and mixer.valid[0].sum().item() == 3
    assert xs[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(xs[0][1], g[1])  # the restarted sample took the plain step
