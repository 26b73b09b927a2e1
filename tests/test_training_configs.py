"""Every shipped training config builds its model, and (slow) trains a step on data of its shape."""
import pytest
import torch

import eqprop
from eqprop.data import Dataset
from eqprop.training.config import list_configs, load_config
from eqprop.training.models import build_model
from eqprop.training.trainer import Trainer

SHAPES = {"fashion_mnist": (1, 28, 28), "mnist": (1, 28, 28), "cifar10": (3, 32, 32), "cifar100": (3, 32, 32),
          "imagenet32": (3, 32, 32), "svhn": (3, 32, 32)}
CLASSES = {"cifar100": 100, "imagenet32": 1000}
IMAGE_CONFIGS = [n for n in list_configs() if load_config(n)["dataset"] in SHAPES]


def data_info(cfg):
    return {"num_classes": CLASSES.get(cfg["dataset"], 10), "kind": "image", "shape": SHAPES[cfg["dataset"]]}


@pytest.mark.parametrize("name", IMAGE_CONFIGS)
def test_every_config_builds(name):
    cfg = load_config(name)
    with torch.device("meta"):  # shapes and settings checked, no memory or init cost
        model = build_model(cfg, data_info(cfg))
    assert model[-1].out_features == data_info(cfg)["num_classes"]
    if cfg["model"]["kind"] == "mlp":  # no energy-based block (eqprop.target_prop)
        return
    assert len(model.blocks) == len(cfg["model"]["blocks"])
    for block in model.blocks:
        name = cfg["algorithm"]  # the config's estimator, with its settings
        assert block.estimator == eqprop.make_estimator(name, **(cfg["estimator"].get(name) or {}))
        assert (block.T1, block.tol) == (cfg["model"]["T1"], cfg["model"]["tol"])


def random_images(cfg, n, split):
    c, h, w = SHAPES[cfg["dataset"]]
    k = CLASSES.get(cfg["dataset"], 10)
    g = torch.Generator().manual_seed(0)
    return Dataset(x=torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g),
                   y=torch.randint(0, k, (n,), generator=g), num_classes=k, mean=(0.5,) * c, std=(0.25,) * c,
                   name=cfg["dataset"], kind="image", split=split)


def one_step(name, algorithm, tmp_path):
    small = ["model.T1=2", "estimator.ep.T2=2", "estimator.id.max_iter=2", "estimator.bptt.T2=2", "epochs=1",
             "batch_size=2", "eval_batch_size=2", "progress=false", "tensorboard=false", f"out_dir={tmp_path}",
             f"algorithm={algorithm}", "threads=1"]
    cfg = load_config(name, small)
    trainer = Trainer(cfg, random_images(cfg, 2, "train"), random_images(cfg, 2, "test"), echo=lambda _m: None)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.fit()
    assert summary["status"] == "completed"
    blocks = [k for k in before if "couplings" in k and k.endswith("weight")]
    assert all(not torch.equal(before[k], trainer.model.state_dict()[k]) for k in blocks)


def test_one_published_config_trains_a_step(tmp_path):
    one_step("cifar10_split_l6_3blocks", "ep", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ep", "id"])
@pytest.mark.parametrize("name", IMAGE_CONFIGS)
def test_every_config_trains_a_step(name, algorithm, tmp_path):
    if load_config(name)["model"]["kind"] == "mlp":
        pytest.skip("model.kind=mlp has no energy-based block to relax (tests/test_target_prop.py trains it)")
    one_step(name, algorithm, tmp_path)
