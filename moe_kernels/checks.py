"""Argument checks shared by the layers and the routers: each returns the value (as a plain Python number) or
raises an error that names the argument and the value. Validation happens once, at construction."""
from __future__ import annotations

import math
import operator

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def integer(name: str, value, minimum: int = 1) -> int:
    """An int ≥ minimum; numpy and other integer types (``operator.index``) are accepted, bool and floats are not."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int >= {minimum}, got the bool {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})") from None
    if number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {number!r}")
    return number


def number(name: str, value, minimum: float = 0.0, strict: bool = False) -> float:
    """A finite real number ≥ minimum (> minimum when ``strict``); bool, str, complex, NaN and inf are refused."""
    bound = f"> {minimum}" if strict else f">= {minimum}"
    if isinstance(value, (bool, str, bytes, complex)) or value is None:
        raise TypeError(f"{name} must be a finite number {bound}, got {value!r} ({type(value).__name__})")
    try:
        real = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a finite number {bound}, got {value!r} ({type(value).__name__})") from None
    if not math.isfinite(real) or real < minimum or (strict and real == minimum):
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return real


def boolean(name: str, value) -> bool:
    """A bool (numpy bools included); strings such as "no" and numbers are refused."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")


def choice(name: str, value, choices: tuple) -> object:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def float_dtype(name: str, dtype) -> None:
    """dtype None or one of the floating-point dtypes the layers compute in (no complex, no float8)."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be None or one of {FLOAT_DTYPES}, got {dtype!r}")
