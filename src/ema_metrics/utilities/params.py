"""Resolution of the smoothing parameter, with pandas names and formulas."""

from __future__ import annotations

import math
from numbers import Real
from typing import Callable

from ema_metrics.utilities.inputs import shown

__all__ = ["resolve_alpha"]

#: The smallest usable smoothing factor: below ``2**-53`` the decay ``1 - alpha`` rounds to 1 (or to ``1 - 2**-53``,
#: a different alpha) in float64, so the average would never move, or would move at another rate than asked.
MIN_ALPHA = 2.0**-53
_FORMULAS: dict[str, Callable[[float], float]] = {
    "half_life": lambda v: -math.expm1(math.log(0.5) / v),
    "span": lambda v: 2.0 / (v + 1.0),
    "com": lambda v: 1.0 / (1.0 + v),
}


def _largest_accepted(name: str, guess: float) -> float:
    """The largest float whose ``alpha`` is still at least ``MIN_ALPHA`` (the formula near ``guess``, then exact)."""
    formula = _FORMULAS[name]
    value = guess
    while formula(value) < MIN_ALPHA:
        value = math.nextafter(value, 0.0)
    while formula(math.nextafter(value, math.inf)) >= MIN_ALPHA:
        value = math.nextafter(value, math.inf)
    return value


#: The largest accepted value of each derived parametrisation, exactly (printed with ``repr`` when refused).
MAX_DERIVED = {
    "half_life": _largest_accepted("half_life", math.log(0.5) / math.log1p(-MIN_ALPHA)),
    "span": _largest_accepted("span", 2.0 / MIN_ALPHA - 1.0),
    "com": _largest_accepted("com", 1.0 / MIN_ALPHA - 1.0),
}


def _check_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"Expected argument `{name}` to be a real number, but got {value!r} of type {type(value).__name__}"
        )
    try:
        out = float(value)
    except OverflowError:  # an int beyond the float64 range
        out = math.inf
    if not math.isfinite(out):
        raise ValueError(f"Expected argument `{name}` to be a finite number, but got {shown(value)}")
    return out


def resolve_alpha(
    alpha: float | None = None,
    half_life: float | None = None,
    span: float | None = None,
    com: float | None = None,
) -> float:
    """Turn exactly one of ``alpha``, ``half_life``, ``span`` or ``com`` into the smoothing factor ``alpha``.

    The formulas are those of :meth:`pandas.Series.ewm`: ``com`` gives ``1 / (1 + com)``, ``span`` gives
    ``2 / (span + 1)`` and ``half_life`` gives ``1 - 0.5 ** (1 / half_life)`` (computed as
    ``-expm1(log(0.5) / half_life)``, which does not cancel for long half-lives). A smoothing factor below
    ``2**-53`` (about ``1.1e-16``, for example ``half_life`` above about ``6.2e15``) is refused: its decay
    ``1 - alpha`` rounds to 1 in float64.

    Args:
        alpha: smoothing factor, in ``(0, 1]``.
        half_life: number of ticks after which a value's weight has halved, ``> 0``.
        span: pandas span, ``>= 1``.
        com: centre of mass, ``>= 0``.

    Returns:
        The smoothing factor ``alpha`` in ``(0, 1]``.

    Raises:
        TypeError: If the chosen argument is not a real number.
        ValueError: If not exactly one argument is given, or the given one is out of range (including values that
            give an ``alpha`` too small for float64).

    Example:
        >>> from ema_metrics import resolve_alpha
        >>> for kw in ({"alpha": 0.5}, {"com": 1}, {"span": 3}, {"half_life": 1}):
        ...     print(f"{kw} -> alpha={resolve_alpha(**kw):.4f}")
        {'alpha': 0.5} -> alpha=0.5000
        {'com': 1} -> alpha=0.5000
        {'span': 3} -> alpha=0.5000
        {'half_life': 1} -> alpha=0.5000

    """
    given = {
        k: v for k, v in (("alpha", alpha), ("half_life", half_life), ("span", span), ("com", com)) if v is not None
    }
    if len(given) != 1:
        names = ", ".join(f"`{k}`={v!r}" for k, v in given.items()) or "none"
        raise ValueError(f"Expected exactly one of `alpha`, `half_life`, `span` or `com`, but got {names}")
    ((name, raw),) = given.items()
    value = _check_number(name, raw)
    if name == "alpha":
        if not 0.0 < value <= 1.0:
            raise ValueError(f"Expected argument `alpha` to be in (0, 1], but got {raw!r}")
        if value < MIN_ALPHA:
            raise ValueError(
                f"Expected argument `alpha` to be at least 2**-53 (about {MIN_ALPHA:.4g}), the smallest smoothing"
                f" factor whose decay `1 - alpha` differs from 1 in float64, but got {raw!r}"
            )
        return value
    if name == "half_life" and value <= 0.0:
        raise ValueError(f"Expected argument `half_life` to be a positive number, but got {raw!r}")
    if name == "span" and value < 1.0:
        raise ValueError(f"Expected argument `span` to be a number >= 1, but got {raw!r}")
    if name == "com" and value < 0.0:
        raise ValueError(f"Expected argument `com` to be a number >= 0, but got {raw!r}")
    alpha = float(_FORMULAS[name](value))
    if alpha < MIN_ALPHA:
        raise ValueError(
            f"Expected argument `{name}` to be at most {MAX_DERIVED[name]!r}, which gives the smallest smoothing"
            f" factor alpha = 2**-53 whose decay `1 - alpha` differs from 1 in float64, but got {shown(raw)}"
            f" (alpha = {alpha:.3g})"
        )
    return alpha
