"""MetaplasticAdam: m = 0 is Adam; for m > 0 exactly the updates towards zero are scaled by
1 - tanh^2(m W_h); bad settings raise; it trains binarized networks by backprop and by EP."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import eqprop
from eqprop.binary import binarize_weights, binary_mlp, latent_weights
from eqprop.metaplastic import MetaplasticAdam, metaplastic_factor, metaplastic_groups

DT = torch.float64
SETTINGS = settings(max_examples=25, deadline=None)


@st.composite
def problems(draw):
    """(params, grads per step, lr, weight_decay, betas): a few tensors and gradient sequences."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    shapes = draw(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3))
    steps = draw(st.integers(1, 4))
    scale = draw(st.sampled_from([1e-3, 0.1, 1.0, 3.0]))
    params = [torch.randn(s, generator=g, dtype=DT) * scale for s in shapes]
    grads = [[torch.randn(s, generator=g, dtype=DT) for s in shapes] for _ in range(steps)]
    lr = draw(st.sampled_from([1e-3, 1e-2, 0.1]))
    wd = draw(st.sampled_from([0.0, 1e-2]))
    betas = draw(st.sampled_from([(0.9, 0.999), (0.5, 0.9), (0.0, 0.99)]))
    return params, grads, lr, wd, betas


def run(opt_cls, params, grads, **kw):
    ps = [p.clone().requires_grad_(True) for p in params]
    opt = opt_cls(ps, **kw)
    for step in grads:
        for p, g in zip(ps, step):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps]


@SETTINGS
@given(problems())
def test_meta_zero_is_adam(problem):
    params, grads, lr, wd, betas = problem
    ours = run(MetaplasticAdam, params, grads, lr=lr, weight_decay=wd, betas=betas, meta=0.0)
    ref = run(torch.optim.Adam, params, grads, lr=lr, weight_decay=wd, betas=betas, foreach=False)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


@SETTINGS
@given(problems(), st.floats(0.05, 5.0))
def test_attenuation_exactly_towards_zero(problem, meta):
    """One step from the same state: where Adam's update points towards zero it is scaled by
    1 - tanh^2(m W_h); elsewhere it is Adam's update unchanged."""
    params, grads, lr, wd, betas = problem
    params = [p + (p == 0).to(DT) for p in params]  # no exact zeros: a direction is defined everywhere
    ours = run(MetaplasticAdam, params, grads[:1], lr=lr, weight_decay=wd, betas=betas, meta=meta)
    ref = run(MetaplasticAdam, params, grads[:1], lr=lr, weight_decay=wd, betas=betas, meta=0.0)
    for w, a, b in zip(params, ours, ref):
        adam = b - w
        towards = torch.sign(adam) == -torch.sign(w)
        expected = torch.where(towards, adam * metaplastic_factor(w, meta), adam)
        torch.testing.assert_close(a - w, expected, rtol=1e-12, atol=1e-15)
        # away from zero: never attenuated (bitwise the same parameter)
        assert torch.equal(a[~towards], b[~towards])
        if towards.any():
            f = metaplastic_factor(w, meta)[towards]
            assert bool((f <= 1).all())


def test_large_hidden_weights_are_frozen_towards_zero():
    w = torch.tensor([5.0, -5.0, 5.0, -5.0], dtype=DT, requires_grad=True)
    opt = MetaplasticAdam([w], lr=0.1, meta=2.0)
    w.grad = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=DT)  # first two: towards zero
    opt.step()
    d = w.detach() - torch.tensor([5.0, -5.0, 5.0, -5.0], dtype=DT)
    assert d[0].abs() < 1e-6 and d[1].abs() < 1e-6  # f = 1 - tanh^2(10) ~ 8e-9
    torch.testing.assert_close(d[2:], torch.tensor([0.1, -0.1], dtype=DT), rtol=1e-6, atol=0)


@pytest.mark.parametrize("meta", [-0.1, float("nan"), float("inf"), True, "1"])
def test_invalid_meta_raises(meta):
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="meta must be a finite number >= 0"):
        MetaplasticAdam([p], meta=meta)
    with pytest.raises(ValueError, match="parameter group 0"):
        MetaplasticAdam([{"params": [p], "meta": meta}])


@pytest.mark.parametrize("kw, match", [({"lr": -1.0}, "lr"), ({"betas": (1.0, 0.9)}, "betas"),
                                       ({"eps": -1e-8}, "eps"), ({"weight_decay": -1.0}, "weight_decay")])
def test_invalid_settings_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        MetaplasticAdam([nn.Parameter(torch.zeros(2))], **kw)


def test_groups_split_hidden_weights_from_the_rest():
    net = binary_mlp([12, 8, 3])
    groups = metaplastic_groups(net, 1.5)
    hidden = {id(p) for p in latent_weights(net)}
    assert {id(p) for p in groups[0]["params"]} == hidden and groups[0]["meta"] == 1.5
    assert groups[1]["meta"] == 0.0 and not hidden & {id(p) for p in groups[1]["params"]}
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(net.parameters()))
    with pytest.raises(ValueError, match="no binarized weights"):
        metaplastic_groups(nn.Linear(3, 2), 1.0)
    with pytest.raises(ValueError, match="meta must be"):
        metaplastic_groups(net, -1.0)


def test_trains_a_binarized_mlp_by_backprop():
    torch.manual_seed(0)
    x = torch.randn(128, 10)
    y = (x[:, 0] + x[:, 1] > 0).long()
    net = binary_mlp([10, 64, 2])
    opt = MetaplasticAdam(metaplastic_groups(net, 1.0), lr=0.01)
    for _ in range(100):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    assert (net(x).argmax(1) == y).float().mean() > 0.9


def test_trains_binary_energy_blocks_by_ep():
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    y = (x[:, 0] > 0).long()
    model = eqprop.dense_ffebm(6, [[16, 8]], num_classes=2, T1=15, estimator_settings={"T2": 8, "beta": 0.5})
    binarize_weights(model)
    opt = MetaplasticAdam(metaplastic_groups(model, 1.0), lr=0.01)
    latent = latent_weights(model)
    before = [w.detach().clone() for w in latent]
    for _ in range(40):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in latent)
        opt.step()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, latent))
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.85


# ---- the continual-learning study ------------------------------------------------------------

def fake_split(n: int, seed: int, split: str):
    from eqprop.data import Dataset
    g = torch.Generator().manual_seed(seed)
    return Dataset(x=torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g),
                   y=torch.arange(n) % 10, num_classes=10, mean=(0.5,), std=(0.25,), name="fashion_mnist",
                   kind="image", split=split)


@pytest.mark.parametrize("benchmark, net, n_out", [("permuted", "bnn", 10), ("split", "bnn", 2),
                                                   ("permuted", "ep", 10)])
def test_continual_study_records_every_task_after_every_task(benchmark, net, n_out, tmp_path):
    from eqprop.studies.continual import make_tasks, parse_settings, run_continual, write_report
    s = parse_settings([f"benchmark={benchmark}", f"net={net}", "tasks=3", "metas=[0, 2]", "hidden=[8, 6]",
                        "train_per_task=40", "test_per_task=20", "epochs_per_task=1", "batch_size=20", "T1=3",
                        "T2=2"])
    train, test = fake_split(200, 0, "train"), fake_split(100, 1, "test")
    tasks, k = make_tasks(s, train, test, seed=0)
    assert k == n_out and len(tasks) == 3
    if benchmark == "permuted":  # the same images, each task with its own pixel order
        assert not torch.equal(tasks[0].x_test, tasks[1].x_test)
        assert torch.equal(tasks[0].x_test.sort(1).values, tasks[1].x_test.sort(1).values)
    else:
        assert set(tasks[1].y_train.tolist()) <= {0, 1}
    runs = run_continual(s, train, test, [0], log=lambda _m: None)
    assert [r["method"] for r in runs] == ["full precision", "m=0", "m=2"]
    for r in runs:
        assert len(r["acc"]) == 3 and all(len(row) == 3 and all(0 <= a <= 100 for a in row) for row in r["acc"])
    table = write_report(s, runs, tmp_path, 1, log=lambda _m: None)
    assert "| m=2 |" in table and (tmp_path / "results.json").is_file()


@pytest.mark.parametrize("item, match", [("tasks=1", "tasks must be at least 2"),
                                         ("metas=[-1]", "metas must be a list of finite numbers >= 0"),
                                         ("benchmark=rotated", "benchmark must be one of"),
                                         ("colour=1", "unknown setting 'colour'"), ("tasks", "key=value"),
                                         ("hidden=[]", "hidden must be"), ("lr=0", "lr must be"),
                                         ("net=ep hidden=[8]", "at least two widths")])
def test_continual_settings_errors(item, match):
    from eqprop.studies.continual import parse_settings
    from eqprop.training.config import ConfigError
    with pytest.raises(ConfigError, match=match):
        parse_settings(item.split())
    with pytest.raises(ConfigError, match="at most 5 class pairs"):
        parse_settings(["benchmark=split", "tasks=6"])


# ---- optim.name=metaplastic in training configs -------------------------------------------------

def _trainer(tmp_path, name, *overrides):
    from eqprop.training.trainer import Trainer
    from test_training_helpers import synthetic_images, tiny_config
    cfg = tiny_config(tmp_path / name, "model.binary={weights: true}", "epochs=1", "dtype=float64", "limit_train=32",
                      *overrides)
    return Trainer(cfg, synthetic_images(32, seed=1), synthetic_images(16, seed=2, split="test"),
                   echo=lambda _m: None)


def test_train_config_metaplastic_trains_and_m0_is_adam(tmp_path):
    meta0 = _trainer(tmp_path, "m0", "optim.name=metaplastic", "optim.m=0")
    adam = _trainer(tmp_path, "adam", "optim.name=adam")
    assert isinstance(meta0.optimizer, MetaplasticAdam) and isinstance(adam.optimizer, torch.optim.Adam)
    hidden, rest = meta0.optimizer.param_groups
    assert hidden["meta"] == 0 and rest["meta"] == 0
    assert {id(p) for p in hidden["params"]} == {id(w) for w in latent_weights(meta0.model)}
    before = {k: v.clone() for k, v in meta0.model.state_dict().items()}
    for t in (meta0, adam):
        assert t.fit()["status"] == "completed" and t.epoch == 1
    s0, sa = meta0.model.state_dict(), adam.model.state_dict()
    for k in sa:
        torch.testing.assert_close(s0[k], sa[k], rtol=0, atol=1e-12, msg=k)
    latent = [k for k in s0 if k.endswith("original")]
    assert latent and all(not torch.equal(s0[k], before[k]) for k in latent)  # it trained the latent weights
    meta5 = _trainer(tmp_path, "m5", "optim.name=metaplastic", "optim.m=5")
    assert [g["meta"] for g in meta5.optimizer.param_groups] == [5, 0.0]


def test_resume_puts_the_configs_m_into_the_hidden_group(tmp_path):
    from eqprop.training.trainer import apply_optim_settings
    t = _trainer(tmp_path, "r", "optim.name=metaplastic", "optim.m=1.5")
    apply_optim_settings(t.optimizer, {**t.cfg["optim"], "m": 4.0})
    assert [g["meta"] for g in t.optimizer.param_groups] == [4.0, 0.0]


@pytest.mark.parametrize("overrides, match", [
    (["optim.name=metaplastic"], "'optim.m' .* must be a finite number >= 0, got None"),
    (["optim.name=metaplastic", "optim.m=-1"], "'optim.m' .* must be a finite number >= 0, got -1"),
    (["optim.name=metaplastic", "optim.m=.nan"], "'optim.m' .* must be a finite number >= 0"),
    (["optim.name=metaplastic", "optim.m=true"], "'optim.m' .* must be a finite number >= 0"),
    (["optim.m=2"], "'optim.m' applies to optim.name=metaplastic only"),
])
def test_train_config_metaplastic_errors(overrides, match):
    from eqprop.training.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=match):
        load_config("fmnist_binary_weights", overrides)


def test_train_config_metaplastic_needs_binary_weights(tmp_path):
    from eqprop.training.config import ConfigError
    from eqprop.training.trainer import Trainer
    from test_training_helpers import synthetic_images, tiny_config
    cfg = tiny_config(tmp_path, "optim.name=metaplastic", "optim.m=1")
    with pytest.raises(ConfigError, match=r"optim.name=metaplastic needs binary weights \(model.binary.weights"):
        Trainer(cfg, synthetic_images(32, seed=1), synthetic_images(16, seed=2, split="test"), echo=lambda _m: None)
