"""Checks of user settings shared by the library: each raises a ValueError that names the
owner (a block, an estimator, a model) and the setting."""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["check_positive_int", "check_nonnegative_int", "check_tol", "check_positive", "check_choice"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_positive_int(owner: str, name: str, value: Any, allow_none: bool = False) -> None:
    """`value` is an int > 0 (or None when allowed)."""
    if value is None and allow_none:
        return
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")


def check_nonnegative_int(owner: str, name: str, value: Any) -> None:
    """`value` is an int >= 0."""
    if not _is_int(value) or value < 0:
        raise ValueError(f"{owner}: {name} must be a non-negative integer, got {value!r}")


def check_positive(owner: str, name: str, value: Any, below: float | None = None) -> None:
    """`value` is a finite real number > 0 (and < `below` when given)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if ok and below is not None:
        ok = value < below
    if not ok:
        bound = f" and < {below}" if below is not None else ""
        raise ValueError(f"{owner}: {name} must be a finite number > 0{bound}, got {value!r}")


def check_tol(owner: str, tol: Any, name: str = "tol") -> None:
    """A tolerance is a positive finite number, or None (no tolerance)."""
    if tol is not None:
        check_positive(owner, name, tol)


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> None:
    """`value` is one of `choices`."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {choices}, got {value!r}")
