"""Checks of user-given settings (whole numbers, non-negative numbers) with errors that name them.

Settings arrive from notebook parameters and ``python -m sae_nb run -p name=value``, so a count
may come as ``1e3`` (an integral float: accepted as 1000) or as a quoted string (refused).
"""

from __future__ import annotations

import math
import numbers


def whole_number(name: str, value, minimum: int, error: type[Exception] = ValueError,
                 example: str | None = None) -> int:
    """``value`` as an int: ints and integral floats are whole numbers; strings, bools,
    fractions and NaN are not. Raises ``error`` naming ``name`` and the fix (``example``, a
    value that works, when given)."""
    whole = isinstance(value, numbers.Integral) or (isinstance(value, numbers.Real)
                                                    and float(value).is_integer())
    if isinstance(value, bool) or not whole:
        raise error(f"{name}={value!r} is not a whole number; give a number without quotes, "
                    f"e.g. {example or f'{name}={max(minimum, 1) * 128}'}.")
    if int(value) < minimum:
        raise error(f"{name}={value!r} must be at least {minimum}{_e_g(example)}.")
    return int(value)


def real_number(name: str, value, minimum: float = 0.0, strict: bool = False,
                error: type[Exception] = ValueError, example: str | None = None) -> float:
    """``value`` as a finite float ``>= minimum`` (``> minimum`` when ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise error(f"{name}={value!r} is not a number; give one without quotes, e.g. "
                    f"{example or f'{name}=0.1'}.")
    if value < minimum or (strict and value == minimum):
        raise error(f"{name}={value!r} must be {'above' if strict else 'at least'} "
                    f"{minimum:g}{_e_g(example)}.")
    return float(value)


def _e_g(example: str | None) -> str:
    return f"; e.g. {example}" if example else ""
