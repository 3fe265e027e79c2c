"""Validation shared by the metrics: arguments, inputs and the float64 range of the decayed sums."""

from __future__ import annotations

import math
import sys

__all__ = ["check_overflow"]


def check_overflow(cls: str, *sums: float) -> None:
    """Raise unless every decayed sum is finite.

    Non-finite *inputs* are dropped before they reach a sum (or, with ``nan_strategy="disable"``, meant to poison
    it), so a non-finite sum is an overflow: a product ``weight * value``, a tick's sums, their decayed sum, or the
    ``1 / alpha`` seeding of ``adjust=False`` went past the largest float64. It is reported, never turned into a
    number.

    Args:
        cls: the metric's class name, for the message.
        sums: the decayed sums read back from the state.

    Raises:
        OverflowError: If a sum is infinite or NaN.

    """
    if all(math.isfinite(v) for v in sums):
        return
    raise OverflowError(
        f"{cls}: the decayed sums overflowed float64 ({', '.join(repr(v) for v in sums)}): a value times its weight,"
        f" the sums of a tick or their decayed total went past {sys.float_info.max:.4g}, so the average cannot be"
        " represented. Rescale the values or weights (for example, log a loss in other units), then reset the metric."
    )
