"""Named configs, the override syntax and its errors."""
import pytest

from eqprop.training.config import ConfigError, list_configs, load_config, parse_value

PUBLISHED = [f"cifar10_split_{m}{t}" for m in ("l6_1block", "l6_2blocks", "l6_3blocks", "l12_3blocks",
                                                "l12_4blocks", "l12_6blocks") for t in ("", "_tol")]
PUBLISHED += [f"{d}_scale_{l}" for d in ("cifar100", "imagenet32") for l in ("l12", "l15")]


def test_every_published_experiment_has_a_config():
    names = list_configs()
    assert set(PUBLISHED + ["fmnist_cpu"]) <= set(names)
    assert not [n for n in names if n.startswith("study_")]


@pytest.mark.parametrize("text,value", [("1e-4", 1e-4), ("3", 3), ("true", True), ("null", None),
                                        ("[1, 2]", [1, 2]), ("ep", "ep"), ("{a: 1}", {"a": 1}), ("0.5", 0.5)])
def test_values_are_typed(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


def test_overrides_apply_dotted_keys():
    cfg = load_config("cifar10_split_l6_2blocks", ["algorithm=id", "optim.lr=1e-4", "epochs=3",
                                                    "model.T1=7", "estimator.ep.beta=0.5"])
    assert (cfg["algorithm"], cfg["optim"]["lr"], cfg["epochs"], cfg["model"]["T1"]) == ("id", 1e-4, 3, 7)
    assert cfg["estimator"]["ep"]["beta"] == 0.5 and cfg["estimator"]["ep"]["T2"] == 20
    assert cfg["name"] == "cifar10_split_l6_2blocks"


def test_unknown_key_names_it_and_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"'optim.lrr'.*did you mean 'optim.lr'.*valid keys under 'optim'.*lr_min"):
        load_config("fmnist_cpu", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"unknown config key 'epoch'.*epochs"):
        load_config("fmnist_cpu", ["epoch=1"])


def test_plus_adds_a_key_and_open_sections_take_new_ones():
    cfg = load_config("fmnist_cpu", ["+extra.note=hi", "estimator.cl.beta=0.1"])
    assert cfg["extra"] == {"note": "hi"} and cfg["estimator"]["cl"] == {"beta": 0.1}


def test_unknown_config_lists_available():
    with pytest.raises(ConfigError,
                       match=r"unknown config 'fmnist_gpu'.*fmnist_cpu.*available configs:.*cifar100_scale"):
        load_config("fmnist_gpu")


@pytest.mark.parametrize("override,match", [("epochs=0", "positive integer"), ("optim.name=rmsprop", "adam"),
                                            ("precision=fp8", "bf16"), ("optim.lr_min=1", "larger than"),
                                            ("resume=maybe", "true or false"), ("epochs", "key=value")])
def test_bad_values_are_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("fmnist_cpu", [override])


def test_bases_and_published_settings():
    tol = load_config("cifar10_split_l6_2blocks_tol")
    assert [b["pools"] for b in tol["model"]["blocks"]] == ["mmm", "m-"]
    assert (tol["model"]["T1"], tol["model"]["tol"], tol["model"]["slope"]) == (1580, 1e-6, 0.65)
    assert (tol["optim"]["lr"], tol["epochs"], tol["estimator"]["ep"]["T2"]) == (3e-4, 100, 20)
    l12 = {n: load_config(f"cifar10_split_l12_{n}blocks")["model"]["blocks"] for n in (3, 4, 6)}
    for n, blocks in l12.items():  # the same twelve layers and pooled layers, cut differently
        widths = [c for b in blocks for c in b["channels"][1:]]
        pooled = [i + 1 for i, p in enumerate("".join(b["pools"] for b in blocks)) if p == "m"]
        assert widths == [128] * 4 + [256] * 4 + [512] * 4 and pooled == [3, 5, 9], n
    im = load_config("imagenet32_scale_l15")
    assert (im["dataset"], im["std_factor"], im["epochs"], im["batch_size"]) == ("imagenet32", 1.5, 100, 256)
    assert len(im["model"]["blocks"]) == 8


def test_config_file_path(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("base: fmnist_cpu\nepochs: 5\n")
    cfg = load_config(str(p))
    assert cfg["epochs"] == 5 and cfg["name"] == "mine"
    p.write_text("epochz: 5\n")
    with pytest.raises(ConfigError, match="epochz"):
        load_config(str(p))
