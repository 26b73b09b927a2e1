"""`eqprop analyze stability`: the sweep's contraction rate against closed forms, and the
command on a checkpoint of a tiny run."""
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eqprop import DenseHopfield
from eqprop.analysis.cli import build_parser
from eqprop.analysis.common import trained_model, training_batches
from eqprop.analysis.stability import active_fraction, sweep_rate
from eqprop.training.config import ConfigError
from eqprop.training.trainer import Trainer
from test_training_helpers import tiny_config, write_fashion_mnist


def _linear_block(seed: int, slope: float, omega: float = 1.0, update: str = "async"):
    """A two-layer block whose equilibrium has every unit in its linear range (small positive
    weights, positive currents), so the sweep's Jacobian is known in closed form."""
    g = torch.Generator().manual_seed(seed)
    b = DenseHopfield([5, 4], activation="hardsigmoid", slope=slope, T1=2000, tol=1e-13, omega=omega,
                      update=update).double()
    # slope * current stays inside (0, 1) for every unit: layer 1 in [0.45, 0.81), layer 2 in
    # [0.4, 0.66), for any slope <= 0.9 and states in [0, 1]
    with torch.no_grad():
        b.couplings[0].core().weight.copy_(0.05 * torch.rand(4, 5, generator=g, dtype=torch.float64) + 0.02)
        b.couplings[0].core().bias.fill_(0.4 / slope)
    u = (0.45 + 0.1 * torch.rand(3, 5, generator=g, dtype=torch.float64)) / slope
    return b, u


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), slope=st.floats(0.3, 0.9), update=st.sampled_from(["async", "sync"]))
def test_rate_is_the_closed_form_in_the_linear_range(seed, slope, update):
    """Async (Gauss-Seidel): (slope sigma_max(W))^2; sync (Jacobi): slope sigma_max(W)."""
    b, u = _linear_block(seed, slope, update=update)
    s, stats = b.relax(u)
    assert stats.converged and torch.all(active_fraction(b, u, s) == 1)
    sigma = torch.linalg.matrix_norm(b.couplings[0].weight.detach(), 2)
    with torch.no_grad():
        rate = sweep_rate(b, u, s, iters=80)
    expected = (slope * sigma) ** (2 if update == "async" else 1)
    assert torch.allclose(rate, expected * torch.ones(3, dtype=torch.float64), rtol=1e-6)


def test_saturated_units_leave_only_the_over_relaxation():
    b, u = _linear_block(0, 0.5, omega=1.3)
    s = [torch.ones(3, 5, dtype=torch.float64), torch.ones(3, 4, dtype=torch.float64)]
    u = u + 10  # every unit of layer 1 far above its range; layer 2's current is positive and large
    with torch.no_grad():
        b.couplings[0].core().bias.fill_(10.0)
        assert torch.all(active_fraction(b, u, s) == 0)
        rate = sweep_rate(b, u, s, iters=20)
    assert torch.allclose(rate, torch.full((3,), 0.3, dtype=torch.float64), rtol=1e-9)  # |1 - omega|


def analyze(*argv: str) -> int:
    parser, module = build_parser("stability")
    return module.run(parser.parse_args(list(argv)))


def test_command_on_a_checkpoint(tmp_path):
    root = write_fashion_mnist(tmp_path / "data", n_train=64, n_test=16)
    out = tmp_path / "run"
    Trainer(tiny_config(out, "epochs=1", f"data_dir={root}", "limit_train=32", "log_every=0"),
            echo=lambda _m: None).fit()
    assert analyze("--checkpoints", str(out), "--labels", "tiny", "--batches", "2", "--batch", "8", "--T", "200",
                   "--iters", "20", "--omega", "1", "--data-dir", str(root), "--threads", "1",
                   "--out", str(tmp_path / "stab")) == 0
    result = json.loads((tmp_path / "stab.json").read_text())
    rows = result["runs"][0]["rows"]
    assert result["runs"][0]["label"] == "tiny" and len(rows) == 2  # 2 batches x 1 block
    for r in rows:
        assert len(r["rate"]) == 8 and all(0 <= v < 10 for v in r["rate"]) and r["omega"] == 1
        assert all(0 <= a <= 1 for a in r["active"])
    assert "| tiny |" in (tmp_path / "stab.md").read_text()
    # the run trained channels-last (tiny_config's base); the analyses load it in that layout
    model, cfg, train, _ = trained_model(out / "checkpoint.pt", str(root))
    w = next(p for p in model.parameters() if p.ndim == 4 and p.shape[1] > 1)  # a layout-telling weight
    assert cfg["channels_last"] and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    assert training_batches(cfg, train, 8, 1).memory_format == torch.channels_last


@pytest.mark.parametrize("argv, match", [
    (["--checkpoints", "/nonexistent/x"], "no checkpoint file"), (["--checkpoints", "x", "--iters", "3"], "--iters"),
    (["--checkpoints", "x", "--tol", "0"], "--tol must be > 0"), (["--checkpoints", "x", "--batch", "0"], "--batch")])
def test_bad_options(argv, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        analyze(*argv, "--out", str(tmp_path / "o"))
