"""Argument checks shared by the callbacks; each message names the argument and the fix."""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any

__all__ = ["check_choice", "check_count", "check_flag", "check_non_negative"]


def check_non_negative(owner: str, name: str, value: Any, example: str) -> float:
    """A finite real number ``>= 0`` (NumPy scalars included), returned as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{owner}: `{name}` must be a number, got {type(value).__name__} {value!r}. "
            f"Pass a value such as {example}."
        )
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or number < 0:
        raise ValueError(
            f"{owner}: `{name}` must be a finite number >= 0, got {value!r}. "
            f"Pass a value such as {example}."
        )
    return number


def check_count(owner: str, name: str, value: Any, minimum: int) -> int:
    """A whole number ``>= minimum`` (NumPy integers included), returned as an int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{owner}: `{name}` must be a whole number >= {minimum}, got "
            f"{type(value).__name__} {value!r}."
        )
    if value < minimum:
        raise ValueError(
            f"{owner}: `{name}` must be >= {minimum}, got {value}. Pass {minimum} or more."
        )
    return int(value)


def check_choice(owner: str, name: str, value: Any, choices: Collection[str]) -> str:
    """One of ``choices``."""
    if value not in choices:
        options = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{owner}: `{name}` must be one of {options}, got {value!r}.")
    return str(value)


def check_flag(owner: str, name: str, value: Any) -> bool:
    """``True`` or ``False``; nothing else is coerced (``bool("false")`` is ``True``)."""
    if not isinstance(value, bool):
        raise TypeError(
            f"{owner}: `{name}` must be True or False, got {type(value).__name__} {value!r}."
        )
    return value


def check_seed(owner: str, value: Any) -> int | None:
    """``None`` or a whole number a ``torch.Generator`` accepts."""
    if value is None:
        return None
    wanted = f"{owner}: `seed` must be None or a whole number from 0 to 2**63 - 1, got "
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{wanted}{type(value).__name__} {value!r}.")
    seed = int(value)
    if not 0 <= seed < 2**63:
        raise ValueError(f"{wanted}{value!r}.")
    return seed


def check_name(owner: str, name: str, value: Any) -> str:
    """A non-empty name for logged keys: letters, digits and ``_``, ``-``, ``.``, ``/``."""
    if not isinstance(value, str) or not value or not all(
            c.isalnum() or c in "_-./" for c in value):
        raise ValueError(
            f"{owner}: `{name}` must be a non-empty name of letters, digits, '_', '-', '.' "
            f"or '/' (it starts every logged key), got {value!r}."
        )
    return value
