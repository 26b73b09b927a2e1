"""Estimators by name: one table, explicit registration, one way to set them on a model.

    est = make_estimator("ep", beta=0.1)           # an immutable EP object
    set_estimator(model, "id", tol=1e-7)           # every block (or HRU) of the model
    set_estimator(model, est, blocks=[1])          # only the second energy-based block
    register_estimator("my-rule", MyRule)          # a rule of your own, by name

Built-in names (docs/theory.md): ep, id, bptt, rhel, cl, cpl, tbp, and the aliases
pep/nep/cep (EP with variant positive/negative/centered), pcpl/ncpl/ccpl (CpL likewise)
and rbp (recurrent backprop, i.e. ID); continual (continual EP, eqprop.continual).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

from torch import nn

from .continual import ContinualEP
from .estimators import BPTT, EP, ID, RHEL, Estimator
from .rules import CL, TBP, CpL
from .spiking import EqSpike

__all__ = ["register_estimator", "unregister_estimator", "make_estimator", "estimator_names", "set_estimator",
           "estimator_modules"]

Factory = Callable[..., Estimator]

def _alias(cls: type[Estimator], **fixed: Any) -> Factory:
    return partial(cls, **fixed)


_REGISTRY: dict[str, Factory] = {
    "ep": EP, "id": ID, "bptt": BPTT, "rhel": RHEL, "cl": CL, "cpl": CpL, "tbp": TBP,
    "pep": _alias(EP, variant="positive"), "nep": _alias(EP, variant="negative"),
    "cep": _alias(EP, variant="centered"),
    "pcpl": _alias(CpL, variant="positive"), "ncpl": _alias(CpL, variant="negative"),
    "ccpl": _alias(CpL, variant="centered"),
    "rbp": ID,
    "eqspike": EqSpike,
    "continual": ContinualEP,
}


def register_estimator(name: str, factory: Factory, *, replace: bool = False) -> None:
    """Make `make_estimator(name, **settings)` call `factory(**settings)`; `factory` must
    return an `Estimator`. Refuses to replace an existing name unless `replace=True`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_estimator: name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"register_estimator: factory for {name!r} must be callable, got {type(factory).__name__}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"register_estimator: {name!r} is already registered; pass replace=True to replace it")
    _REGISTRY[name] = factory


def unregister_estimator(name: str) -> None:
    """Forget a name given to `register_estimator` (built-in names may be removed too)."""
    if name not in _REGISTRY:
        raise ValueError(f"unregister_estimator: {name!r} is not registered; registered: {estimator_names()}")
    del _REGISTRY[name]


def estimator_names() -> list[str]:
    """Every registered name, sorted."""
    return sorted(_REGISTRY)


def _settings_of(factory: Factory) -> tuple[set[str] | None, dict[str, Any]]:
    """(settings the factory accepts or None if unknown, settings an alias fixes)."""
    fixed: dict[str, Any] = {}
    if isinstance(factory, partial):
        fixed = dict(factory.keywords)
        factory = factory.func
    if not dataclasses.is_dataclass(factory):
        return None, fixed
    return {f.name for f in dataclasses.fields(factory) if f.init} - set(fixed), fixed


def make_estimator(name: str | Estimator, /, **settings: Any) -> Estimator:
    """Build a registered estimator from its name and settings (or pass an instance
    through, without settings)."""
    if isinstance(name, Estimator):
        if settings:
            raise ValueError(f"make_estimator: settings {sorted(settings)} given with an estimator instance; use "
                             f"estimator.replace(...)")
        return name
    if name not in _REGISTRY:
        raise ValueError(f"unknown estimator {name!r}, expected one of {estimator_names()}")
    factory = _REGISTRY[name]
    allowed, fixed = _settings_of(factory)
    if allowed is not None:
        unknown = set(settings) - allowed
        if unknown:
            extra = f" ({name} fixes {fixed})" if set(fixed) & unknown else ""
            raise ValueError(f"estimator {name!r} has no setting(s) {sorted(unknown)}{extra}; it takes "
                             f"{sorted(allowed)}")
    est = factory(**settings)
    if not isinstance(est, Estimator):
        raise TypeError(f"estimator {name!r}: the registered factory returned {type(est).__name__}, not an "
                        f"eqprop Estimator")
    return est


def estimator_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of `model` that carry an estimator, in order (the model itself when it is
    one): those whose class names its `estimator_kind` ('block' for energy-based blocks,
    'sequence' for Hamiltonian units)."""
    return [m for m in model.modules() if isinstance(getattr(type(m), "estimator_kind", None), str)]


def set_estimator(model: nn.Module, estimator: str | Estimator, /, blocks: Iterable[int] | None = None,
                  **settings: Any) -> nn.Module:
    """Use `estimator` (a name with settings, or an instance) for every estimator-carrying
    module of `model` (energy-based blocks, Hamiltonian units), or for those of the given
    indices; parameters untouched. Raises, changing nothing, if one does not fit."""
    est = make_estimator(estimator, **settings)
    targets = estimator_modules(model)
    if not targets:
        raise ValueError(f"set_estimator: {type(model).__name__} holds no energy-based block or Hamiltonian unit")
    if blocks is not None and not isinstance(blocks, Iterable):
        raise ValueError(f"set_estimator: blocks must be a list of indices, got {blocks!r}")
    chosen = range(len(targets)) if blocks is None else list(blocks)
    for i in chosen:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(targets):
            raise ValueError(f"set_estimator: block index {i!r} out of range (model has {len(targets)} "
                             f"estimator-carrying modules)")
    for i in chosen:
        m = targets[i]
        est.check_applicable(m.estimator_kind, getattr(m, "block_name", type(m).__name__))
    for i in chosen:
        targets[i].estimator = est
    return model
