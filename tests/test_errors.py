"""Errors a user can act on: each names the block (or estimator), the setting and the value."""
import dataclasses
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import eqprop
from eqprop import BPTT, CL, EP, FFEBM, ID, RHEL, TBP, ConvHopfield, CpL, DenseHopfield, DivergenceError
from eqprop.activations import Identity, make_activation
from eqprop.hamiltonian import LinearHRU
from eqprop.registry import make_estimator, register_estimator, set_estimator, unregister_estimator


def test_wrong_input_shape_names_block_and_shape():
    block = ConvHopfield([3, 4], pools="m", name="block2")
    with pytest.raises(ValueError, match=r"block2.*\(2, 5, 8, 8\)"):
        block(torch.randn(2, 5, 8, 8))
    dense = DenseHopfield([6, 4], name="dense")
    with pytest.raises(ValueError, match=r"dense.*\(2, 7, 3\)"):
        dense(torch.randn(2, 7, 3))
    with pytest.raises(TypeError, match="dense.*floating-point"):
        dense(torch.ones(2, 6, dtype=torch.long))


@pytest.mark.parametrize("bad", [(float("nan"),), (float("inf"),), (-float("inf"),), (float("inf"), -float("inf"))])
def test_non_finite_input(bad):
    block = DenseHopfield([4, 3], name="blk", estimator=EP())
    u = torch.randn(2, 4)
    u.view(-1)[:len(bad)] = torch.tensor(bad)
    with pytest.raises(ValueError, match="blk.*NaN or inf"):
        block(u)


@settings(max_examples=40, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, 1.0, -2.5, 3.0e38, -3.0e38, float("nan"), float("inf"),
                                        -float("inf")]), min_size=8, max_size=8),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_property_input_refused_exactly_when_it_holds_nan_or_inf(values, dtype):
    block = DenseHopfield([4, 3], name="blk", estimator=EP()).to(dtype)
    u = torch.tensor(values, dtype=dtype).reshape(2, 4)
    if torch.isfinite(u).all():
        block(u)  # huge finite inputs (their sum may overflow) are accepted
    else:
        with pytest.raises(ValueError, match="blk.*NaN or inf"):
            block(u)


def test_finite_input_whose_sum_overflows_is_accepted():
    block = DenseHopfield([4, 3], name="blk", estimator=EP())
    u = torch.full((2, 4), 3.0e38)  # finite, but its float32 sum is inf
    assert torch.isfinite(block(u)).all()
    half = DenseHopfield([4, 3], name="half", estimator=EP()).to(torch.float16)
    assert torch.isfinite(half(torch.full((2, 4), 6.0e4, dtype=torch.float16))).all()  # float16 sum: 4.8e5


def test_diverging_relaxation_raises():
    block = DenseHopfield([5, 5], activation="identity", name="unstable", T1=200, estimator=EP())
    with torch.no_grad():
        block.couplings[0].linear.weight.fill_(3.0)
    with pytest.raises(DivergenceError, match="unstable.*diverged"):
        block(torch.randn(2, 5))


@pytest.mark.parametrize("make,match", [
    (lambda: EP(beta=0), "ep: beta"),
    (lambda: EP(beta=-0.1), "ep: beta"),
    (lambda: EP(beta=float("nan")), "ep: beta"),
    (lambda: EP(T2=0), "ep: T2"),
    (lambda: EP(T2=2.5), "ep: T2"),
    (lambda: EP(variant="sideways"), "ep: variant"),
    (lambda: EP(normalize="layer"), "ep: normalize"),
    (lambda: EP(tol=-1.0), "ep: tol"),
    (lambda: EP(precision="half"), "ep: precision"),
    (lambda: EP(refine=-1), "ep: refine"),
    (lambda: ID(max_iter=0), "id: max_iter"),
    (lambda: ID(tol=0), "id: tol"),
    (lambda: BPTT(T2=-3), "bptt: T2"),
    (lambda: RHEL(eps=0), "rhel: eps"),
    (lambda: RHEL(normalize="all"), "rhel: normalize"),
    (lambda: CL(T2=0), "cl: T2"),
    (lambda: CpL(eta=1.0), "cpl: eta"),
    (lambda: CpL(variant="both"), "cpl: variant"),
    (lambda: TBP(K=0), "tbp: K"),
    (lambda: EP().replace(beta=-1.0), "ep: beta"),
    (lambda: make_estimator("backprop"), "unknown estimator 'backprop'"),
    (lambda: make_estimator("ep", gamma=1), "gamma"),
    (lambda: make_estimator("pep", variant="negative"), r"pep fixes \{'variant': 'positive'\}"),
    (lambda: make_estimator(EP(), beta=0.1), "estimator.replace"),
    (lambda: DenseHopfield([4, 3], T1=0, name="b1"), "b1: T1"),
    (lambda: DenseHopfield([4, 3], update="random", name="b1"), "b1: update"),
    (lambda: DenseHopfield([4, 3], first="middle"), "first"),
    (lambda: DenseHopfield([4, 3], tol=0), "tol"),
    (lambda: DenseHopfield([4, 3], check_every=0), "check_every"),
    (lambda: DenseHopfield([4, 3], check_inputs="yes"), "check_inputs"),
    (lambda: DenseHopfield([4, 3], relax_dtype=torch.int8), "relax_dtype"),
    (lambda: DenseHopfield([4, 0]), "widths"),
    (lambda: ConvHopfield([3, 4, 5], pools="m"), "pools"),
    (lambda: ConvHopfield([3, 4], pools="m", fc=[3]), "in_size"),
    (lambda: make_activation("relu"), "unknown activation"),
    (lambda: make_activation("hardsigmoid", slope=0), "slope"),
])
def test_invalid_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_estimator_settings_that_are_not_settings_are_refused():
    """The class attributes of an estimator (its name, what it applies to) are not settings:
    make_estimator refuses them with the same ValueError as any unknown setting, and does not
    list them among the settings it takes."""
    for name, bad in (("ep", "name"), ("bptt", "applies_to"), ("cl", "needs_target")):
        with pytest.raises(ValueError, match=f"has no setting.*{bad}"):
            make_estimator(name, **{bad: "x"})
    with pytest.raises(ValueError) as info:
        make_estimator("bptt", eps=1e-3)
    assert "it takes ['T2']" in str(info.value)


def test_estimators_are_frozen():
    est = EP(beta=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        est.beta = 0.2
    assert est.replace(beta=0.2) == EP(beta=0.2) and est == EP(beta=0.1)


def test_registering_estimators():
    with pytest.raises(ValueError, match="'ep' is already registered"):
        register_estimator("ep", EP)
    with pytest.raises(ValueError, match="non-empty string"):
        register_estimator("", EP)
    with pytest.raises(TypeError, match="must be callable"):
        register_estimator("not-callable", 3)
    assert "not-callable" not in eqprop.estimator_names()
    register_estimator("test-returns-a-dict", lambda **kw: {})
    try:
        with pytest.raises(TypeError, match="not an eqprop Estimator"):
            make_estimator("test-returns-a-dict")
    finally:
        unregister_estimator("test-returns-a-dict")
    assert "test-returns-a-dict" not in eqprop.estimator_names()
    with pytest.raises(ValueError, match="is not registered"):
        unregister_estimator("test-returns-a-dict")


def test_estimators_that_do_not_fit_the_module():
    block = DenseHopfield([4, 3], name="blk")
    with pytest.raises(ValueError, match="blk: estimator 'rhel' does not apply to an energy-based block"):
        set_estimator(block, "rhel")
    set_estimator(block, "bptt")  # T2=None: as many unrolled steps as the block's T1
    assert block.estimator == BPTT(T2=None)
    block.estimator = None
    with pytest.raises(ValueError, match="blk: estimator 'rhel'"):
        block.estimator = RHEL()
    with pytest.raises(TypeError, match="blk: an estimator must be an eqprop estimator object"):
        block.estimator = "ep"
    assert block.estimator is None  # nothing changed
    unit = LinearHRU(3, 4)
    with pytest.raises(ValueError, match="estimator 'ep' does not apply to a Hamiltonian unit"):
        unit.set_estimator("ep")
    with pytest.raises(ValueError, match="takes no T2"):
        unit.set_estimator("bptt", T2=20)
    with pytest.raises(ValueError, match="does not apply to a Hamiltonian unit"):
        LinearHRU(3, 4, estimator="id")
    assert unit.estimator == RHEL()
    assert unit.set_estimator("bptt").estimator == BPTT()  # through every time step
    with pytest.raises(ValueError, match="holds no energy-based block or Hamiltonian unit"):
        set_estimator(nn.Linear(3, 3), "ep")


def test_set_estimator_changes_nothing_when_one_block_does_not_fit():
    model = FFEBM(DenseHopfield([4, 3]), nn.Linear(3, 4), DenseHopfield([4, 3]))
    holder = nn.Sequential(model, LinearHRU(3, 4))
    with pytest.raises(ValueError, match="does not apply"):
        set_estimator(holder, "id")  # the HRU refuses ID
    assert [b.estimator for b in model.blocks] == [EP(), EP()]
    set_estimator(holder, "id", blocks=[0, 1])
    assert [b.estimator for b in model.blocks] == [ID(), ID()]
    for bad in ([2.0], [True], [-1], [3]):
        with pytest.raises(ValueError, match="block index"):
            set_estimator(holder, "ep", blocks=bad)


def test_settings_changed_after_construction_are_checked_at_forward():
    block = DenseHopfield([4, 3], name="late")
    block.T1 = -5
    with pytest.raises(ValueError, match="late: T1"):
        block(torch.randn(2, 4))
    model = FFEBM(DenseHopfield([4, 3]))
    with pytest.raises(ValueError, match="block index 3"):
        model.set_estimator("ep", blocks=[3])
    with pytest.raises(ValueError, match="unknown relaxation setting"):
        model.configure_blocks(T3=4)


def test_targets_errors(sq_loss):
    block = DenseHopfield([4, 3], name="out", estimator=CL(T2=5))
    u, y = torch.randn(2, 4), torch.rand(2, 3)
    with pytest.raises(ValueError, match="cl \\(out\\): no target given"):
        sq_loss(block(u), y).backward()
    with pytest.raises(ValueError, match="integer labels must have shape"):
        block(u, target=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="y must be a tensor"):
        block(u, target=[0, 1])
    with pytest.raises(ValueError, match="integer labels or real targets"):
        block(u, target=torch.zeros(2, 3, dtype=torch.bool))
    readout = FFEBM(block, nn.Linear(3, 3))
    with pytest.raises(ValueError, match="not an energy-based block"):
        readout(u, target=y)
    with pytest.raises(ValueError, match="not an energy-based block"):
        with eqprop.targets(readout, y):
            pass
    with pytest.raises(ValueError, match="holds no energy-based block"):
        with eqprop.targets(nn.Linear(3, 3), y):
            pass


def test_targets_context_is_per_thread_and_captured_at_forward(sq_loss):
    block = DenseHopfield([4, 3], name="out", estimator=CL(T2=5))
    u, y = torch.randn(2, 4, requires_grad=True), torch.rand(2, 3)
    seen = []
    with eqprop.targets(block, y):
        assert eqprop.current_target(block) is y or torch.equal(eqprop.current_target(block), y)
        worker = threading.Thread(target=lambda: seen.append(eqprop.current_target(block)))
        worker.start()
        worker.join()
        out = block(u)
    assert seen == [None]
    assert eqprop.current_target(block) is None
    sq_loss(out, y).backward()  # after the context: the target was kept with the forward
    assert u.grad is not None and set(block.last_relax) == {"free", "clamped"}


def test_last_layer_linear_option():
    block = DenseHopfield([4, 3], last_linear=True)
    assert isinstance(block.activations[-1], Identity)
    assert not isinstance(block.activations[0], Identity)


@pytest.mark.parametrize("build, match", [
    (lambda: eqprop.conv_ffebm([{"pools": "m-"}]), r"block 0 needs 'channels'"),
    (lambda: eqprop.conv_ffebm([{"channels": [1, 4, 4], "pools": "mm"}], in_size=2),
     r"block 0 pools 'mm' halve its 2x2 input 2 times.*in_size=2 allows 1"),
    (lambda: eqprop.conv_ffebm([{"channels": [1, 4, 4], "pools": "mm"}, {"channels": [4, 4], "pools": "m", "fc": [3]}],
                               in_size=4), r"block 1 pools 'm' halve its 1x1 input"),
    (lambda: eqprop.conv_ffebm([{"channels": [1, 0], "pools": "m"}]), r"block 0 channels must be positive"),
    (lambda: eqprop.conv_ffebm(["not a dict"]), r"block 0 must be a dict"),
    (lambda: ConvHopfield([2, 3, 3], "mm", fc=[4], in_size=3), r"halve an input of size 3 below one pixel"),
    (lambda: eqprop.dense_ffebm(4, [3]), r"block 0 must be a non-empty list of layer widths"),
    (lambda: eqprop.dense_ffebm(0, [[3]]), r"in_features must be a positive integer"),
])
def test_model_building_errors_name_the_block_and_setting(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_a_built_model_names_a_wrong_input_size():
    model = eqprop.conv_ffebm([{"channels": [1, 4, 4], "pools": "m-"}], in_size=8, T1=2)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"built for inputs of shape \(1, 8, 8\).*got \(1, 6, 6\)"):
        model(torch.randn(2, 1, 6, 6))


@pytest.mark.parametrize("estimator", [EP(beta=0.1, T2=5), ID(max_iter=20), CL(T2=5)])
def test_an_overflowed_error_current_gives_non_finite_gradients_not_an_error(estimator):
    """A float16 gradient scaler's overflow step sends inf into the block's backward: the
    estimators return non-finite gradients (so the scaler skips the step) instead of relaxing."""
    block = DenseHopfield([3, 4, 2], T1=5, name="blk")
    block.estimator = estimator
    u = torch.randn(2, 3, requires_grad=True)
    out = block(u, target=torch.tensor([0, 1]))
    out.backward(torch.full_like(out, float("inf")))
    assert all(p.grad is not None and torch.isnan(p.grad).all() for p in block.parameters())
    assert torch.isnan(u.grad).all()
    scaler_skips = not all(torch.isfinite(p.grad).all() for p in block.parameters())
    assert scaler_skips
