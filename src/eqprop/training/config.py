"""Named experiment configs (YAML) with Hydra-style `key=value` overrides.

    cfg = load_config("cifar10_split_l6_2blocks", ["algorithm=id", "optim.lr=1e-4", "epochs=3"])

A config file is merged onto `DEFAULTS`, so every config has the same keys; a file may start
from another one with `base: <name>`. Overrides use dotted keys and YAML-typed values
(`1e-4`, `true`, `null`, `[1,2]`, `{a: 1}`); an unknown key is an error listing the valid
ones, and `+key=value` adds a key that does not exist yet (e.g. the settings of a new
estimator, `+estimator.cl.beta=0.1`).

Resuming a run keeps its checkpoint's config; `check_resume` refuses the changes that cannot
carry over (`FIXED_ON_RESUME`: the architecture, data, optimizer, batch size, seed, dtype)
and `config_changes` lists the others, which take effect from the resumed step.
"""
from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..blocks import RELAX_SETTINGS

__all__ = ["AUGMENT_KEYS", "CHOICES", "DEFAULTS", "EXCLUDED_PREFIXES", "FIXED_ON_RESUME", "RELAX_KEYS",
           "ConfigError", "apply_override", "apply_overrides", "augment_settings_set", "check_resume",
           "config_changes", "config_comment", "config_dir", "list_configs", "load_config", "load_config_file",
           "merge", "parse_value", "to_yaml", "validate"]

DEFAULTS: dict[str, Any] = {
    "name": None,                # set to the config's name when loaded
    "dataset": "fashion_mnist",  # a name known to eqprop.data.load_dataset
    "dataset_options": {},       # extra keyword arguments of load_dataset (e.g. permute_seed)
    "data_dir": None,            # null: --data-dir, $EQPROP_DATA, then ~/.cache/eqprop
    "augment": None,             # random crop + flip; null: the loader's default (on for CIFAR/ImageNet32)
    "augment_pad": 4,            # random crop: shift each training image by up to this many pixels
    "augment_padding": "edge",   # edge | zero: what fills the pixels a shift uncovers
    "augment_flip": True,        # random horizontal flip of half the training images
    "std_factor": None,          # normalise by std_factor * std; null: 3 (CIFAR), 1.5 (ImageNet32), else 1
    "limit_train": None,         # use only the first N training / test examples (null: all)
    "limit_test": None,
    "model": {"kind": "conv"},   # kind conv | dense | hssm | spiking_dense | vf_dense | mlp | dtp_dense
    "algorithm": "ep",           # any name eqprop.make_estimator knows (ep, id, bptt, ...)
    "estimator": {               # settings per algorithm; the one named by `algorithm` is used
        "ep": {"beta": 0.2, "variant": "centered", "T2": 20},
        "id": {"max_iter": 200, "tol": 1.0e-6},
        "bptt": {"T2": 20},
    },
    "optim": {
        "name": "adam",          # adam | sgd | metaplastic (MetaplasticAdam on binary weights)
        "lr": 1.0e-4,
        "lr_min": 1.0e-6,        # cosine annealing from lr to lr_min over all epochs
        "weight_decay": 3.0e-4,
        "momentum": 0.9,         # sgd only
        "nesterov": False,       # sgd only
        "m": None,               # metaplastic only: metaplasticity strength m >= 0 (0: Adam)
        "schedule": "cosine",    # cosine | constant
        "schedule_unit": "epoch",  # epoch | step: when the cosine schedule advances
    },
    "epochs": 100,
    "batch_size": 128,           # global batch (divided among DDP ranks)
    "eval_batch_size": 512,
    "seed": 0,
    "device": "auto",            # auto | cpu | cuda | cuda:N
    "threads": None,             # torch.set_num_threads on CPU (null: torch's default)
    "tf32": False,               # CUDA: TF32 matmuls/convolutions (10-bit mantissas; they blur EP's phase differences)
    "cudnn_benchmark": True,     # CUDA: let cuDNN pick the fastest convolution algorithm for the static shapes
    "sync_batchnorm": False,     # DDP: batch-norm statistics over the global batch (all ranks), as one process
    "dist_timeout_s": 1800,      # DDP: seconds a rank waits for the others in a collective, then fails
    "dtype": "float32",          # float32 | float64: parameters and inputs
    "precision": "fp32",         # fp32 | bf16 | fp16: autocast of the feedforward parts
    "relax_dtype": None,         # null | bfloat16 | float16: dtype of the relaxations (block.relax_dtype)
    "channels_last": False,      # NHWC layout for image models
    "compile": False,            # torch.compile every energy-based block's sweep (block.compile_sweep)
    "out_dir": None,             # null: runs/<name>
    "resume": False,             # continue from <out_dir>/checkpoint.pt
    "progress": True,            # tqdm progress bars
    "tensorboard": True,         # also log to <out_dir>/tb when tensorboard is installed
    "eval_every": 1,             # evaluate on the test set every N epochs (and after the last)
    "log_every": 50,             # every N steps: free-phase health per block to TensorBoard and the trace (0: off)
    "monitor_fidelity": 0,       # every N steps: the estimator against ID (cosines) on a fixed training batch (0: off)
}

# model keys that are relaxation settings of the blocks (relax_dtype and compile_sweep are
# the top-level keys relax_dtype and compile)
RELAX_KEYS = tuple(k for k in RELAX_SETTINGS if k not in ("relax_dtype", "compile_sweep"))

# settings a resumed run cannot change, and why
FIXED_ON_RESUME = {
    "model": "the checkpoint holds the parameters of that architecture (only the relaxation settings "
             + ", ".join(f"model.{k}" for k in RELAX_KEYS) + " can change)",
    "dataset": "the model was trained on that data",
    "dataset_options": "the model was trained on that data",
    "std_factor": "the model was trained on inputs normalised with it",
    "optim.name": "the optimizer's saved state (moments, momentum buffers) belongs to it",
    "batch_size": "the position in the epoch is counted in batches of that size",
    "limit_train": "the position in the epoch is counted in batches of that training set",
    "seed": "the data order of the resumed epochs is drawn from it",
    "dtype": "the parameters and the optimizer's state are stored in it",
}

EXCLUDED_PREFIXES = ("study_",)  # configs of other commands that share the directory


class ConfigError(ValueError):
    """A bad config name, key or value."""


def config_dir() -> Path:
    return Path(str(resources.files("eqprop") / "configs"))


def list_configs() -> list[str]:
    """Names of the shipped training configs."""
    d = config_dir()
    if not d.is_dir():
        return []
    return sorted(p.stem for p in d.glob("*.yaml") if not p.stem.startswith(EXCLUDED_PREFIXES))


def config_comment(name: str) -> list[str]:
    """The leading comment lines of a shipped config, without their '#' (its description)."""
    lines = []
    for line in (config_dir() / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    return lines


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys to values, got {type(data).__name__}")
    return data


def merge(base: dict, update: dict, where: str = "", allow_new: bool = False) -> dict:
    """Deep-merge `update` into a copy of `base`; keys missing from `base` are errors unless
    `allow_new` or `base` is an open section (model, estimator, dataset_options)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in out:
            if not (allow_new or _is_open(where)):
                raise ConfigError(_unknown_key_message(path, out, where))
            out[key] = copy.deepcopy(value)
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = merge(out[key], value, path, allow_new)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _is_open(where: str) -> bool:
    """Sections whose keys are checked by the code that consumes them (model builders,
    estimators, dataset readers) rather than here."""
    top = where.split(".")[0]
    return top in ("model", "estimator", "dataset_options")


def _unknown_key_message(path: str, section: dict, where: str) -> str:
    valid = sorted(section)
    close = difflib.get_close_matches(path.rsplit(".", 1)[-1], valid, n=1)
    hint = f" (did you mean {(where + '.' if where else '') + close[0]!r}?)" if close else ""
    scope = f"under {where!r}" if where else "at the top level"
    return (f"unknown config key {path!r}{hint}; valid keys {scope}: {', '.join(valid)}; "
            f"use +{path}=VALUE to add a new key")


def load_config_file(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict:
    """Read a config by name (shipped) or path (*.yaml), following `base:` chains; not yet
    merged onto DEFAULTS."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
    else:
        path = config_dir() / f"{name_or_path}.yaml"
        if not path.is_file() or name_or_path.startswith(EXCLUDED_PREFIXES):
            names = list_configs()
            close = difflib.get_close_matches(name_or_path, names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config {name_or_path!r}{hint}; available configs: {', '.join(names)}")
    if str(path) in _seen:
        raise ConfigError(f"config {path}: circular 'base' chain {' -> '.join(_seen + (str(path),))}")
    data = _read_yaml(path)
    data.setdefault("name", path.stem)
    base = data.pop("base", None)
    if base is not None:
        parent = load_config_file(str(base), _seen + (str(path),))
        data = merge(parent, data, allow_new=True)
    return data


def parse_value(text: str) -> Any:
    """YAML typing of an override value: 1e-4 -> float, [1,2] -> list, null -> None."""
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse override value {text!r}: {e}") from None
    if isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(value) if value.lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            return value
    return value


def apply_override(cfg: dict, item: str) -> dict:
    """Apply one `key=value` (or `+key=value`) override to a copy of `cfg`."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, text = item.split("=", 1)
    add = key.startswith("+")
    key = key.lstrip("+").strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    value = parse_value(text)
    parts = key.split(".")
    out = copy.deepcopy(cfg)
    node = out
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth])
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {where!r} holds {node!r}, not a section of keys")
        if part not in node and not (add or _is_open(where)):
            raise ConfigError(_unknown_key_message(key, node, where))
        if depth == len(parts) - 1:
            node[part] = value
        else:
            node = node.setdefault(part, {})
    return out


def load_config(name_or_path: str, overrides: Iterable[str] = ()) -> dict:
    """DEFAULTS <- config file (and its bases) <- overrides, then validated."""
    cfg = merge(DEFAULTS, load_config_file(name_or_path))
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    for item in overrides:
        cfg = apply_override(cfg, item)
    validate(cfg)
    return cfg


CHOICES = {
    ("optim", "name"): ("adam", "sgd", "metaplastic"),
    ("optim", "schedule"): ("cosine", "constant"),
    ("optim", "schedule_unit"): ("epoch", "step"),
    ("precision",): ("fp32", "bf16", "fp16"),
    ("relax_dtype",): (None, "bfloat16", "float16", "float32", "float64"),
    ("dtype",): ("float32", "float64"),
    ("augment_padding",): ("edge", "zero"),
}


def validate(cfg: dict) -> None:
    """Check types and ranges of the trainer's own settings (model/estimator settings are
    checked by their builders)."""
    for keys, allowed in CHOICES.items():
        node: Any = cfg
        for k in keys:
            node = node[k]
        if node not in allowed:
            raise ConfigError(f"config key {'.'.join(keys)!r} must be one of {list(allowed)}, got {node!r}")
    for key in ("epochs", "batch_size", "eval_batch_size", "eval_every"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"config key {key!r} must be a positive integer, got {v!r}")
    for key in ("limit_train", "limit_test", "threads"):
        v = cfg[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"config key {key!r} must be a positive integer or null, got {v!r}")
    for key in ("log_every", "monitor_fidelity"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"config key {key!r} must be an integer >= 0 (0: off), got {v!r}")
    v = cfg["dist_timeout_s"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
        raise ConfigError(f"config key 'dist_timeout_s' must be a positive number of seconds, got {v!r}")
    if isinstance(cfg["seed"], bool) or not isinstance(cfg["seed"], int):
        raise ConfigError(f"config key 'seed' must be an integer, got {cfg['seed']!r}")
    o = cfg["optim"]
    for key in ("lr", "lr_min", "weight_decay", "momentum"):
        v = o[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise ConfigError(f"config key 'optim.{key}' must be a number >= 0, got {v!r}")
    if o["lr_min"] > o["lr"]:
        raise ConfigError(f"optim.lr_min ({o['lr_min']}) is larger than optim.lr ({o['lr']})")
    _check_meta_strength(o)
    if not isinstance(cfg["model"], dict) or "kind" not in cfg["model"]:
        raise ConfigError("config key 'model' must be a mapping with a 'kind' (conv, dense, hssm, spiking_dense, "
                          "vf_dense, mlp or dtp_dense)")
    if not isinstance(cfg["algorithm"], str):
        raise ConfigError(f"config key 'algorithm' must be an estimator name, got {cfg['algorithm']!r}")
    est = cfg["estimator"].get(cfg["algorithm"], {})
    if not isinstance(est, dict):
        raise ConfigError(f"config key 'estimator.{cfg['algorithm']}' must be a mapping of settings, got {est!r}")
    for key in ("resume", "progress", "tensorboard", "channels_last", "compile", "sync_batchnorm", "tf32",
                "cudnn_benchmark", "augment_flip"):
        if not isinstance(cfg[key], bool):
            raise ConfigError(f"config key {key!r} must be true or false, got {cfg[key]!r}")
    _check_augment(cfg)


AUGMENT_KEYS = ("augment_pad", "augment_padding", "augment_flip")


def augment_settings_set(cfg: dict) -> list[str]:
    """The crop/flip keys (AUGMENT_KEYS) that `cfg` sets away from their defaults."""
    return [k for k in AUGMENT_KEYS if cfg[k] != DEFAULTS[k]]


def _check_augment(cfg: dict) -> None:
    """augment: true, false or null (the dataset's default); its crop/flip settings are refused
    where augment=false would ignore them."""
    if cfg["augment"] is not None and not isinstance(cfg["augment"], bool):
        raise ConfigError(f"config key 'augment' must be true, false or null (the dataset's default), "
                          f"got {cfg['augment']!r}")
    v = cfg["augment_pad"]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"config key 'augment_pad' must be an integer >= 0 (pixels), got {v!r}")
    if cfg["augment"] is False:
        set_here = augment_settings_set(cfg)
        if set_here:
            raise ConfigError(f"config key(s) {set_here} set, but augment is false, so they would do nothing; "
                              f"set augment=true (or null for the dataset's default) or drop them")


def _check_meta_strength(o: dict) -> None:
    """optim.m: required (a finite number >= 0) with optim.name=metaplastic, null otherwise."""
    m = o.get("m")
    if o["name"] != "metaplastic":
        if m is not None:
            raise ConfigError(f"config key 'optim.m' applies to optim.name=metaplastic only (optim.name is "
                              f"{o['name']!r}), got {m!r}; remove it or set it to null")
        return
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m) or m < 0:
        raise ConfigError(f"config key 'optim.m' (the metaplasticity strength of optim.name=metaplastic) must be a "
                          f"finite number >= 0, got {m!r}")


class _NotSet:
    """The value of a key one of two configs lacks."""

    def __repr__(self) -> str:
        return "(not set)"


NOT_SET = _NotSet()


def _flatten(cfg: dict, where: str = "") -> dict[str, Any]:
    """{dotted key: value} of the leaves (an empty section has none)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        path = f"{where}.{key}" if where else str(key)
        if isinstance(value, dict):
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out


def config_changes(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every setting that differs; a key that one
    side lacks has the value NOT_SET there."""
    a, b = _flatten(old), _flatten(new)
    return [(k, a.get(k, NOT_SET), b.get(k, NOT_SET)) for k in sorted(set(a) | set(b))
            if a.get(k, NOT_SET) != b.get(k, NOT_SET)]


def _fixed_key(dotted: str) -> str | None:
    """The FIXED_ON_RESUME entry a changed dotted key falls under (None: it may change)."""
    parts = dotted.split(".")
    if parts[0] == "model":
        # relaxation settings may change, the device model's own keys too (model.device.read_noise)
        return None if (len(parts) == 2 or parts[1] == "device") and parts[1] in RELAX_KEYS else "model"
    for n in (2, 1):
        key = ".".join(parts[:n])
        if key in FIXED_ON_RESUME:
            return key
    return None


def check_resume(saved: dict, cfg: dict, path: str | Path = "the checkpoint") -> list[tuple[str, Any, Any]]:
    """Refuse (ConfigError naming the setting) a resume whose config changes a setting of
    FIXED_ON_RESUME; else the changes (see config_changes), which take effect from the
    resumed step. `saved` is the checkpoint's config."""
    saved = merge(DEFAULTS, saved, allow_new=True)
    changes = [c for c in config_changes(saved, cfg) if c[0] != "resume"]
    for key, old, new in changes:
        fixed = _fixed_key(key)
        if fixed is not None:
            raise ConfigError(f"{key} cannot change on resume: the run in {path} has {old!r}, the command asks for "
                              f"{new!r}; {FIXED_ON_RESUME[fixed]}. Start a new run to change it (another "
                              f"out_dir, or --overwrite to replace this one)")
    return changes


def to_yaml(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
