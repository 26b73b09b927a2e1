"""Named configs, the override syntax and its errors; properties of merging and overriding."""
import copy
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from eqprop.training.config import (
    DEFAULTS,
    NOT_SET,
    ConfigError,
    apply_override,
    check_resume,
    config_changes,
    list_configs,
    load_config,
    load_config_file,
    merge,
    parse_value,
    to_yaml,
)

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
    plain = load_config("cifar10_split_l6_2blocks")
    cfg = load_config("cifar10_split_l6_2blocks", ["algorithm=id", "optim.lr=1e-4", "epochs=3",
                                                    "model.T1=7", "estimator.ep.beta=0.5"])
    assert (cfg["algorithm"], cfg["optim"]["lr"], cfg["epochs"], cfg["model"]["T1"]) == ("id", 1e-4, 3, 7)
    assert type(cfg["optim"]["lr"]) is float and cfg["estimator"]["ep"]["beta"] == 0.5
    # everything not overridden keeps the file's value, e.g. the sibling T2 of estimator.ep.beta
    expected = copy.deepcopy(plain)
    expected.update(algorithm="id", epochs=3)
    expected["optim"]["lr"], expected["model"]["T1"], expected["estimator"]["ep"]["beta"] = 1e-4, 7, 0.5
    assert cfg == expected and cfg["name"] == plain["name"] == "cifar10_split_l6_2blocks"


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
                                            ("resume=maybe", "true or false"), ("epochs", "key=value"),
                                            ("dist_timeout_s=0", "'dist_timeout_s' must be a positive number"),
                                            ("dist_timeout_s=.inf", "'dist_timeout_s' must be a positive number"),
                                            ("tf32=1", "'tf32' must be true or false"),
                                            ("augment=maybe", "'augment' must be true, false or null"),
                                            ("augment_pad=-1", "'augment_pad' must be an integer >= 0"),
                                            ("augment_padding=reflect", "'augment_padding' must be one of"),
                                            ("augment_flip=1", "'augment_flip' must be true or false"),
                                            ("augment_pad=2", r"\['augment_pad'\] set, but augment is false"),
                                            ("augment_flip=false", "augment is false")])
def test_bad_values_are_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("fmnist_cpu", [override])


def test_resume_changes_listed_or_refused_by_name():
    saved = load_config("fmnist_cpu")
    allowed = load_config("fmnist_cpu", ["epochs=6", "optim.lr=1e-3", "optim.schedule=constant", "model.T1=50",
                                         "model.tol=null", "algorithm=id", "estimator.ep.beta=0.1", "resume=true",
                                         "eval_every=2"])
    assert check_resume(saved, allowed, "c.pt") == [
        ("algorithm", "ep", "id"), ("epochs", 3, 6), ("estimator.ep.beta", 0.25, 0.1), ("eval_every", 1, 2),
        ("model.T1", 30, 50), ("model.tol", 1e-4, None), ("optim.lr", 3e-3, 1e-3),
        ("optim.schedule", "cosine", "constant")]
    for override, key in [("model.slope=0.5", "model.slope"), ("model.kind=dense", "model.kind"),
                          ("optim.name=sgd", "optim.name"), ("batch_size=32", "batch_size"), ("seed=1", "seed"),
                          ("dataset=mnist", "dataset"), ("limit_train=10", "limit_train"),
                          ("dtype=float64", "dtype"), ("std_factor=2", "std_factor")]:
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)} cannot change on resume: the run in c.pt has "):
            check_resume(saved, load_config("fmnist_cpu", [override]), "c.pt")
    with pytest.raises(ConfigError, match=r"dataset_options.permute_seed cannot change on resume: the run in c.pt "
                                          r"has \(not set\), the command asks for 3"):
        check_resume(saved, load_config("fmnist_cpu", ["dataset_options.permute_seed=3"]), "c.pt")
    # a checkpoint written before a key was added to DEFAULTS compares as if it had the default
    old = {k: v for k, v in saved.items() if k != "eval_every"}
    assert check_resume(old, saved) == [] and config_changes({"a": {}}, {"a": {"b": 1}}) == [("a.b", NOT_SET, 1)]


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


# ------------------------------------------------------------------ properties of merging and overrides

OPEN = ("model", "estimator", "dataset_options")  # sections that take new keys without '+'
PROPERTY = settings(max_examples=50, deadline=None, database=None)

keys = st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True).filter(lambda k: k not in OPEN)


def not_a_number(s: str) -> bool:
    """parse_value reads a YAML string that Python takes as a float ("1e-4") as that float (documented)."""
    try:
        float(s)
    except ValueError:
        return True
    return False


scalars = (st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=False)
           | st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=8).filter(not_a_number))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
                      max_leaves=8)
configs = st.dictionaries(keys, values, min_size=1, max_size=5)


def paths(cfg: dict, prefix: str = "") -> list[str]:
    """Every dotted key of nested mappings (sections and leaves), not descending into lists."""
    out = []
    for k, v in cfg.items():
        p = f"{prefix}.{k}" if prefix else k
        out.append(p)
        if isinstance(v, dict):
            out += paths(v, p)
    return out


def get(cfg: dict, path: str):
    for part in path.split("."):
        cfg = cfg[part]
    return cfg


def put(cfg: dict, path: str, value) -> dict:
    """A deep copy of cfg with `value` at `path` (sections created as needed)."""
    out = copy.deepcopy(cfg)
    *parents, last = path.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return out


def scribble(x) -> None:
    """Change every list and mapping inside x in place (to show that a result shares nothing)."""
    if isinstance(x, dict):
        for v in x.values():
            scribble(v)
        x["scribbled"] = True
    elif isinstance(x, list):
        for v in x:
            scribble(v)
        x.append("scribbled")


def ordered(x):
    """x with every mapping as its list of items, so that == also compares the order of keys."""
    if isinstance(x, dict):
        return [(k, ordered(v)) for k, v in x.items()]
    return [ordered(v) for v in x] if isinstance(x, list) else x


def as_text(value) -> str:
    """An override's right-hand side that YAML reads back as `value`."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30)
    return text.removesuffix("\n...\n").strip()


@PROPERTY
@given(values)
def test_property_values_round_trip_through_override_text(value):
    assert parse_value(as_text(value)) == value


@PROPERTY
@given(st.integers(), st.floats(allow_nan=False, allow_infinity=False))
def test_property_numbers_are_typed_as_written(i, x):
    assert type(parse_value(str(i))) is int and parse_value(str(i)) == i
    assert type(parse_value(repr(x))) is float and parse_value(repr(x)) == x  # also "1e-05", "1e+16"


@PROPERTY
@given(configs | st.just(DEFAULTS), values, st.data())
def test_property_override_lands_at_its_key_and_nothing_else_changes(cfg, value, data):
    path = data.draw(st.sampled_from(paths(cfg)))
    before = copy.deepcopy(cfg)
    out = apply_override(cfg, f"{path}={as_text(value)}")
    assert cfg == before  # the input is not modified
    assert get(out, path) == value
    assert out == put(cfg, path, value)  # and every other key is as it was
    scribble(out)
    assert cfg == before  # nor shared with the result


@PROPERTY
@given(configs, values, values, st.data())
def test_property_overriding_twice_equals_overriding_with_the_last_value(cfg, first, last, data):
    path = data.draw(st.sampled_from(paths(cfg)))
    twice = apply_override(apply_override(cfg, f"{path}={as_text(first)}"), f"{path}={as_text(last)}")
    assert twice == apply_override(cfg, f"{path}={as_text(last)}")


@PROPERTY
@given(configs, keys, keys, values, st.data())
def test_property_unknown_keys_raise_naming_the_key_and_plus_adds_them(cfg, new, sub, value, data):
    sections = [""] + [p for p in paths(cfg) if isinstance(get(cfg, p), dict)]
    where = data.draw(st.sampled_from(sections))
    section = get(cfg, where) if where else cfg
    assume(new not in section)
    for key in (f"{where}.{new}" if where else new, f"{where}.{new}.{sub}" if where else f"{new}.{sub}"):
        with pytest.raises(ConfigError, match=re.escape(f"unknown config key {key!r}")):
            apply_override(cfg, f"{key}={as_text(value)}")
        with pytest.raises(ConfigError, match=re.escape(f"+{key}=VALUE")):
            apply_override(cfg, f"{key}={as_text(value)}")
        assert apply_override(cfg, f"+{key}={as_text(value)}") == put(cfg, key, value)


@PROPERTY
@given(configs, st.data())
def test_property_merge_equals_the_overrides_of_its_leaves(base, data):
    leaves = [p for p in paths(base) if not isinstance(get(base, p), dict)]
    chosen = data.draw(st.lists(st.sampled_from(leaves), unique=True) if leaves else st.just([]))
    update: dict = {}
    expected = base
    for path in chosen:
        value = data.draw(values)
        update = put(update, path, value)
        expected = apply_override(expected, f"{path}={as_text(value)}")
    before = copy.deepcopy((base, update))
    merged = merge(base, update)
    assert merged == expected and (base, update) == before
    assert merge(merged, update) == merged  # idempotent
    assert merge(base, {}) == base and merge(base, base) == base
    assert merge(base, {k: {} for k, v in base.items() if isinstance(v, dict)}) == base  # empty sections keep theirs
    scribble(merged)
    assert (base, update) == before  # the result shares nothing with its inputs


@PROPERTY
@given(configs, keys, values, st.data())
def test_property_merge_refuses_unknown_keys_unless_allowed(base, new, value, data):
    sections = [""] + [p for p in paths(base) if isinstance(get(base, p), dict)]
    where = data.draw(st.sampled_from(sections))
    assume(new not in (get(base, where) if where else base))
    key = f"{where}.{new}" if where else new
    update = put({}, key, value)
    with pytest.raises(ConfigError, match=re.escape(f"unknown config key {key!r}")):
        merge(base, update)
    assert merge(base, update, allow_new=True) == put(base, key, value)


@PROPERTY
@given(configs)
def test_property_configs_round_trip_through_the_yaml_dump_and_load(cfg):
    assume("base" not in cfg)  # a file's `base:` names the config it starts from
    assert ordered(yaml.safe_load(to_yaml(cfg))) == ordered(cfg)  # values, and the order of keys
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "roundtrip.yaml"
        path.write_text(to_yaml(cfg))
        assert load_config_file(str(path)) == {"name": "roundtrip", **cfg}
