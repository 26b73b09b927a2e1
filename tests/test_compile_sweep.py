"""compile_sweep: the relaxation's sweeps through torch.compile give the eager states and
gradients, compile without graph breaks, do not recompile for phases they have seen, and
are refused where they do not apply. Compiling costs seconds per graph on a CPU, so most
cases are marked slow; the first test is the one make test runs."""
import copy
import pickle

import pytest
import torch

from eqprop import EP, FFEBM, ConvHopfield, DenseHopfield, set_estimator
from eqprop.spiking import SpikingDenseHopfield
from eqprop.training.config import ConfigError
from eqprop.training.models import build_model
from test_training_helpers import synthetic_images, tiny_config


def _same_states(a, b, tol=1e-12):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype
        assert (x - y).abs().max().item() <= tol


def test_compiled_dense_sweeps_equal_eager_and_do_not_recompile():
    torch.manual_seed(0)
    block = DenseHopfield([6, 8, 5], activation="hardsigmoid", slope=0.5, alpha=2.0, T1=12, tol=None,
                          omega=1.2).double()
    u = torch.randn(4, 6, dtype=torch.float64)
    nudge = torch.randn(4, 5, dtype=torch.float64)
    eager = [block.relax(u)[0], block.relax(u, nudge=nudge)[0], block.relax(u, nudge=nudge, hold_last=True)[0]]
    block.compile_sweep = True
    compiled = [block.relax(u)[0], block.relax(u, nudge=nudge)[0], block.relax(u, nudge=nudge, hold_last=True)[0]]
    for a, b in zip(eager, compiled):
        _same_states(a, b)
    with torch.compiler.set_stance("fail_on_recompile"):  # every phase kind has its graph now
        block.relax(u)
        block.relax(u, nudge=-nudge, hold_last=True)
    state = pickle.loads(pickle.dumps(block))  # the compiled function is rebuilt, never pickled
    assert state._compiled is None and state.compile_sweep
    assert copy.deepcopy(block)._compiled is None


def test_compile_sweep_settings_are_checked():
    block = DenseHopfield([3, 4])
    with pytest.raises(ValueError, match="compile_sweep must be True or False"):
        block.configure(compile_sweep=1)
    assert block.compile_sweep is False
    with pytest.raises(ValueError, match="compile_sweep does not apply to a device model"):
        block.configure(compile_sweep=True, device={"read_noise": 0.01})
    assert block.compile_sweep is False and block.device is None
    spiking = SpikingDenseHopfield.from_dense(DenseHopfield([3, 4]))
    with pytest.raises(ValueError, match="spiking neurons do not run"):
        spiking.configure(compile_sweep=True)


def test_compile_config_key(tmp_path):
    info = {"shape": (1, 8, 8), "num_classes": 10, "kind": "image"}
    model = build_model(tiny_config(tmp_path, "compile=true"), info)
    blocks = [m for m in model.modules() if hasattr(m, "compile_sweep")]
    assert blocks and all(b.compile_sweep for b in blocks)
    with pytest.raises(ConfigError, match="compile=true: .*device model"):
        build_model(tiny_config(tmp_path, "compile=true", "model.device={read_noise: 0.01}"), info)
    with pytest.raises(ConfigError, match="compile must be true or false|'compile' must be true or false"):
        tiny_config(tmp_path, "compile=1")


@pytest.mark.slow
@pytest.mark.parametrize("update", ["async", "sync"])
def test_compiled_conv_sweeps_with_pooling_equal_eager(update):
    torch.manual_seed(1)
    block = ConvHopfield([2, 4, 6], pools="m-", fc=[5], in_size=8, T1=10, tol=None, update=update,
                         init="kaiming", alpha=2.0, slope=0.5).double()
    u = torch.randn(3, 2, 8, 8, dtype=torch.float64)
    nudge = torch.randn(3, 5, dtype=torch.float64)
    eager = [block.relax(u)[0], block.relax(u, nudge=nudge)[0]]
    block.compile_sweep = True
    for a, b in zip(eager, [block.relax(u)[0], block.relax(u, nudge=nudge)[0]]):
        _same_states(a, b)


@pytest.mark.slow
def test_compiled_chain_gives_the_eager_ep_gradient():
    torch.manual_seed(2)
    net = FFEBM(torch.nn.Linear(6, 8),
                DenseHopfield([8, 8], slope=0.5, T1=200, tol=1e-10),
                torch.nn.Linear(8, 3),
                DenseHopfield([3, 4], slope=0.5, T1=200, tol=1e-10)).double()
    set_estimator(net, EP(beta=0.1, T2=200, tol=1e-10, mirror=True))
    x = torch.randn(5, 6, dtype=torch.float64)
    w = torch.randn(5, 4, dtype=torch.float64)

    def grads(model):
        model.zero_grad()
        (model(x) * w).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    eager = grads(net)
    compiled_net = copy.deepcopy(net)
    compiled_net.configure_blocks(compile_sweep=True)
    for a, b in zip(eager, grads(compiled_net)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.slow
def test_trainer_with_compile_trains(tmp_path):
    from eqprop.training.trainer import Trainer
    train, test = synthetic_images(48, seed=1), synthetic_images(32, seed=2, split="test")
    eager = Trainer(tiny_config(tmp_path / "eager", "epochs=1"), train, test, echo=lambda _m: None).fit()
    trainer = Trainer(tiny_config(tmp_path / "compiled", "epochs=1", "compile=true"), train, test,
                      echo=lambda _m: None)
    compiled = trainer.fit()
    blocks = [m for m in trainer.model.modules() if hasattr(m, "compile_sweep")]
    assert blocks and all(b.compile_sweep and b._compiled is not None for b in blocks)  # the sweeps ran compiled
    assert compiled["status"] == "completed"
    assert abs(compiled["last"]["train_loss"] - eager["last"]["train_loss"]) < 1e-4
