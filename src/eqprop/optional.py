"""Optional dependencies and the installed package version.

The core of eqprop needs only torch, numpy and pyyaml. Everything else is an extra, imported
where it is used through :func:`require`, which names the extra to install when it is missing::

    plt = require("matplotlib.pyplot", "plot", "learning-curve plots")
    tqdm = require("tqdm", "progress", "progress bars").tqdm

Extras (``pip install 'eqprop[NAME]'``): ``plot`` (matplotlib), ``progress`` (tqdm),
``tensorboard``, ``svhn`` (scipy), ``uea`` (sktime), ``analysis`` (scipy, matplotlib),
``all`` and ``dev`` (what the tests need).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from types import ModuleType

__all__ = ["available", "package_version", "require"]


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import and return ``module``; if it (or a package it needs) is missing, raise an
    ImportError whose one-line message says what it is for and which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise ImportError(f"{top} is needed for {purpose}: pip install 'eqprop[{extra}]'",
                          name=getattr(e, "name", None) or top) from e


def available(module: str) -> bool:
    """Whether ``module`` can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, or a module without a spec
        return False


def package_version(distribution: str = "eqprop") -> str:
    """The installed version of ``distribution`` (pyproject.toml's ``version`` for eqprop);
    ``"0+unknown"`` when it is not installed (e.g. run from a source tree on ``sys.path``)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"
