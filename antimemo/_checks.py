"""Argument checks shared by every layer of ``antimemo`` (the bottom layer: stdlib only).

Every check raises with a message that names the argument, the value it got and how to fix it,
in one style: ``"k must be an integer >= 2, got 1; <hint>"``. Integers are Python ``int`` or any
:class:`numbers.Integral` (``numpy.int64`` included), never ``bool``; checked integers come back as
plain ``int``.

Example:
    >>> check_int("k", 4, 2, "e.g. k=4")
    4
    >>> check_int("k", 1, 2, "e.g. k=4")
    Traceback (most recent call last):
    ...
    ValueError: k must be an integer >= 2, got 1; e.g. k=4
    >>> is_int(True), is_int(3), is_number(0.5), is_number(float("nan"))
    (False, True, True, False)
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_int", "check_positive_int", "check_seed", "is_int", "is_number"]


def is_int(value: Any) -> bool:
    """``True`` for an integer (``int``, ``numpy.int64``, any :class:`numbers.Integral`), not ``bool``.

    Example:
        >>> is_int(3), is_int(False), is_int(3.0)
        (True, False, False)
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """``True`` for a finite real number (``int``, ``float``, numpy scalars), not ``bool``.

    Example:
        >>> is_number(2), is_number(0.5), is_number(True), is_number(float("inf")), is_number("1")
        (True, True, False, False, False)
    """
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def check_int(name: str, value: Any, minimum: int, hint: str) -> int:
    """Return ``value`` as an ``int`` if it is an integer ``>= minimum``, else raise ``ValueError``.

    Args:
        name: the argument's name, as the caller spells it.
        value: the value passed.
        minimum: the smallest value allowed.
        hint: how to fix it, e.g. ``"e.g. batch_size=8"``.

    Raises:
        ValueError: ``"<name> must be an integer >= <minimum>, got <value!r>; <hint>"`` for a
            ``bool``, a non-integer or a value below ``minimum``.

    Example:
        >>> check_int("batch_size", 8, 1, "e.g. batch_size=8")
        8
        >>> check_int("batch_size", 2.0, 1, "e.g. batch_size=8")
        Traceback (most recent call last):
        ...
        ValueError: batch_size must be an integer >= 1, got 2.0; e.g. batch_size=8
    """
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}; {hint}")
    return int(value)


def check_positive_int(name: str, value: Any, hint: str) -> int:
    """Return ``value`` as an ``int`` if it is an integer ``>= 1``, else raise ``ValueError``.

    Raises:
        ValueError: ``"<name> must be a positive integer, got <value!r>; <hint>"``.

    Example:
        >>> check_positive_int("suffix_length", 0, "e.g. 32")
        Traceback (most recent call last):
        ...
        ValueError: suffix_length must be a positive integer, got 0; e.g. 32
    """
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}; {hint}")
    return int(value)


def check_seed(seed: Any, name: str = "seed") -> int:
    """Return ``seed`` as an ``int`` (any integer, negative included), else raise ``TypeError``.

    Raises:
        TypeError: ``"seed must be an integer, got 0.5 (float); e.g. seed=0"``.

    Example:
        >>> check_seed(7)
        7
        >>> check_seed("0")
        Traceback (most recent call last):
        ...
        TypeError: seed must be an integer, got '0' (str); e.g. seed=0
    """
    if not is_int(seed):
        raise TypeError(f"{name} must be an integer, got {seed!r} ({type(seed).__name__}); e.g. {name}=0")
    return int(seed)
