"""The one place where a tick decays and adds, and where decayed states are kept away from underflow.

A tick is ``state = state * decay + increment``: :func:`decay_add_`, one fused ``addcmul`` (``decay`` holds ``beta`` on
decayed entries and 1 on plain counts). :class:`~ema_metrics.EMAMetric`'s hot path and :class:`~ema_metrics.EMAWrapper`
both call it; a tick without update is :func:`decay_`.

**Scale.** A metric that sees no data keeps decaying: after about ``1075 / log2(1 / beta)`` empty ticks its sums would
underflow to 0 and its value become ``0 / 0``. So every metric holds a power-of-two exponent ``scale`` (a float64
state, at most 0): its decayed states are ``mantissa * 2 ** scale``. Every ``renorm_interval(beta)`` ticks (a number
that depends only on ``beta``, the same on every rank) :func:`renormalize_` looks at the largest decayed magnitude
``M``: below ``2 ** TINY_EXP`` the mantissas are multiplied back into ``[2 ** (TINY_EXP - 1), 2 ** TINY_EXP)`` and the
exponent records it. Values (ratios of states) are unchanged, and the mantissas stay tiny in absolute terms, so new
data, added at scale 0, outweighs them by more than ``2 ** 550`` (the old part is negligible, as it truly is). A
mantissa above ``2 ** TINY_EXP`` means data arrived since: the metric is back at scale 0. Pooling across ranks aligns
every rank to the largest exponent (see :mod:`ema_metrics._sync`), so it stays exact. Observations whose weighted
magnitude is below about ``1e-180`` are outside what this scheme represents.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "TINY_EXP",
    "canonical_",
    "decay_",
    "decay_add_",
    "effective_scale",
    "factor",
    "peak_magnitude",
    "renorm_interval",
    "renormalize_",
    "without_past",
]

TINY_EXP = -600
_RENORM_SPAN = 256.0  # at most this many binary orders of magnitude of decay between two renormalizations
_TINY = 2.0**TINY_EXP


def factor(beta: float) -> float:
    """The factor the stored states decay by each tick: ``beta``, or ``2 ** -300`` when ``beta`` is 0 (``alpha = 1``).

    With ``alpha = 1`` the past weighs 0. Stored as ``2 ** -300`` instead, it is invisible in float64 next to any new
    data (which outweighs it by ``2 ** 300``), yet an empty tick keeps the last value, as pandas does with a missing
    observation, and the renormalization keeps it from underflowing.
    """
    return beta if beta > 0.0 else 2.0**-300


def decay_add_(state: Tensor, increment: Tensor, decay: Tensor) -> Tensor:
    """``state = state * decay + increment`` in one fused operation (in place); returns ``state``."""
    return torch.addcmul(increment, state, decay, out=state)


def decay_(state: Tensor, decay: Tensor) -> Tensor:
    """A tick without update: ``state = state * decay`` (in place)."""
    return state.mul_(decay)


def renorm_interval(beta: float) -> int:
    """Ticks between two renormalizations: the decay over that many ticks is at least ``2 ** -256``."""
    orders = -math.log2(factor(beta))
    return max(1, min(2**40, int(_RENORM_SPAN // orders) if orders > 0 else 2**40))


Mask = Tensor | None  # the decayed entries of a state; None: all of them


def peak_magnitude(states: Sequence[Tensor], masks: Sequence[Mask]) -> Tensor:
    """The largest magnitude of the decayed entries of a metric (a 0-d device tensor; one pass per state).

    One ``aminmax`` pass (NaN propagates): several times faster on CPU than ``vector_norm(ord=inf)``.
    """
    peaks = [
        _peak(state if mask is None else torch.where(mask, state, 0.0))
        for state, mask in zip(states, masks, strict=True)
    ]
    return peaks[0] if len(peaks) == 1 else torch.stack(peaks).amax()


def _peak(values: Tensor) -> Tensor:
    if values.numel() == 0:
        return values.new_zeros(())
    low, high = torch.aminmax(values)
    return torch.maximum(high, -low)


def _scaled_(state: Tensor, mask: Mask, shift: Tensor) -> None:
    """``state`` times ``2 ** shift`` on its decayed entries, in place (exact: a power of two)."""
    if mask is None:
        torch.ldexp(state, shift, out=state)
    else:
        state.copy_(torch.where(mask, torch.ldexp(state, shift), state))


def effective_scale(states: Sequence[Tensor], masks: Sequence[Mask], scale: Tensor) -> Tensor:
    """The exponent the stored mantissas are at: ``scale`` while they are tiny, 0 once data arrived, -inf if empty."""
    largest = peak_magnitude(states, masks)
    at_zero = torch.zeros_like(scale)
    current = torch.where(largest >= _TINY, at_zero, scale)
    return torch.where(largest > 0, current, torch.full_like(scale, -math.inf))


def canonical_(states: Sequence[Tensor], masks: Sequence[Mask], scale: Tensor) -> None:
    """Rewrite ``(mantissas, scale)`` (whose ``scale`` is valid) in place so that the magnitude tells the frame.

    A true magnitude of at least ``2 ** TINY_EXP`` is held at scale 0; a smaller one has its largest mantissa in
    ``[2 ** (TINY_EXP - 1), 2 ** TINY_EXP)``. Only powers of two are applied: exact, no host sync.
    """
    largest = peak_magnitude(states, masks)
    exponent = torch.frexp(largest).exponent.to(scale.dtype)  # largest in [2 ** (e - 1), 2 ** e)
    true_exponent = exponent + scale
    tiny = torch.logical_and(largest > 0, true_exponent < TINY_EXP)
    shift = torch.where(tiny, TINY_EXP - exponent, scale)  # multiply mantissas by 2 ** shift
    shift = torch.where(largest > 0, shift, torch.zeros_like(shift))
    for state, mask in zip(states, masks, strict=True):
        _scaled_(state, mask, shift)
    scale.copy_(torch.where(tiny, scale - shift, torch.zeros_like(scale)))


def renormalize_(states: Sequence[Tensor], masks: Sequence[Mask], scale: Tensor) -> None:
    """Keep a metric's decayed states representable (see the module docstring); in place, no host sync."""
    scale.copy_(torch.where(peak_magnitude(states, masks) >= _TINY, torch.zeros_like(scale), scale))
    canonical_(states, masks, scale)


def without_past(states: dict[str, Tensor], masks: Sequence[Mask]) -> dict[str, Tensor]:
    """At ``alpha = 1``: the states with the past (stored at weight ``2 ** -300``, see :func:`factor`) set to 0.

    An entry ``2 ** 200`` times smaller than the largest decayed entry holds only the past once the last tick brought
    data, so it is exactly 0 at ``alpha = 1`` (a class absent from the last tick leaves a macro average, for example).
    After ticks without any data nothing is cleared, and the last value stays.
    """
    values = list(states.values())
    floor = peak_magnitude(values, masks) * 2.0**-200
    return {
        name: torch.where(
            state.abs() < floor if mask is None else torch.logical_and(mask, state.abs() < floor),
            torch.zeros_like(state),
            state,
        )
        for (name, state), mask in zip(states.items(), masks, strict=True)
    }
