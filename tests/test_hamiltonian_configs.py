"""The sequence configs (seq_*.yaml) build an HSSM, switch estimator from the command line
and train a step through the ordinary trainer."""
import pytest
import torch

from eqprop import RHEL, make_estimator
from eqprop.data import Dataset
from eqprop.hamiltonian import HSSM
from eqprop.training.config import ConfigError, list_configs, load_config
from eqprop.training.models import build_model
from eqprop.training.trainer import Trainer

SEQ_SHAPES = {"seq_fashion_mnist_row": ((28, 28), 10), "seq_fashion_mnist_pixel": ((784, 1), 10),
              "uea_japanese_vowels": ((29, 12), 9), "uea_basic_motions": ((100, 6), 4)}
SEQ_CONFIGS = [n for n in list_configs() if n.startswith("seq_")]


def random_sequences(cfg, n, split, length=None):
    (T, F), k = SEQ_SHAPES[cfg["dataset"]]
    g = torch.Generator().manual_seed(0)
    return Dataset(x=torch.randn(n, length or T, F, generator=g), y=torch.randint(0, k, (n,), generator=g),
                   num_classes=k, mean=(0.0,) * F, std=(1.0,) * F, name=cfg["dataset"], kind="sequence", split=split)


def test_there_are_sequence_configs():
    assert {"seq_fmnist_row", "seq_fmnist_pixel", "seq_japanese_vowels", "seq_basic_motions"} <= set(SEQ_CONFIGS)


@pytest.mark.parametrize("algorithm", ["rhel", "bptt"])
@pytest.mark.parametrize("name", SEQ_CONFIGS)
def test_every_sequence_config_builds_with_either_estimator(name, algorithm):
    cfg = load_config(name, [f"algorithm={algorithm}"])
    (T, F), k = SEQ_SHAPES[cfg["dataset"]]
    model = build_model(cfg, {"num_classes": k, "kind": "sequence", "shape": (T, F)})
    assert isinstance(model, HSSM) and model.head.out_features == k and model.in_features == F
    expected = make_estimator(algorithm, **cfg["estimator"][algorithm])
    assert all(h.estimator == expected for h in model.hrus)  # the config's settings, e.g. rhel's eps


def test_estimator_settings_reach_every_unit():
    cfg = load_config("seq_fmnist_row", ["algorithm=rhel", "estimator.rhel.eps=0.003", "model.n_blocks=3"])
    model = build_model(cfg, {"num_classes": 10, "kind": "sequence", "shape": (28, 28)})
    assert [h.estimator for h in model.hrus] == [RHEL(eps=0.003, normalize="sample")] * 3


@pytest.mark.parametrize("override, message", [
    ("relax_dtype=bfloat16", "relax_dtype=bfloat16: HSSM has no energy-based block"),
    ("+model.estimator_settings={eps: 0.1}", "model.estimator_settings: the estimator is chosen by"),
    ("model.hiden=8", r"build_hssm: unknown setting\(s\) \['hiden'\]"),
])
def test_sequence_config_errors(override, message):
    cfg = load_config("seq_fmnist_row", [override])
    with pytest.raises(ConfigError, match=message):
        build_model(cfg, {"num_classes": 10, "kind": "sequence", "shape": (28, 28)})


def test_bptt_truncation_is_refused():
    cfg = load_config("seq_fmnist_row", ["algorithm=bptt", "estimator.bptt.T2=20"])
    with pytest.raises(ConfigError, match="T2"):
        build_model(cfg, {"num_classes": 10, "kind": "sequence", "shape": (28, 28)})


@pytest.mark.parametrize("algorithm", ["rhel", "bptt"])
def test_sequence_config_trains_a_step(algorithm, tmp_path):
    small = ["model.hidden=8", "model.state_size=8", "epochs=1", "batch_size=4", "eval_batch_size=4",
             "progress=false", "tensorboard=false", f"out_dir={tmp_path}", f"algorithm={algorithm}"]
    cfg = load_config("seq_fmnist_row", small)
    trainer = Trainer(cfg, random_sequences(cfg, 4, "train"), random_sequences(cfg, 4, "test"),
                      echo=lambda _m: None)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert trainer.fit()["status"] == "completed"
    changed = [k for k in before if "hru" in k and not torch.equal(before[k], trainer.model.state_dict()[k])]
    assert {k.rsplit(".", 1)[-1] for k in changed} >= {"B", "C", "D", "A_raw", "dt_raw"}
