"""Non-finite sums in ``EMAWrapper``: dropped on the device in ``update``, reported by ``compute``."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

__all__ = ["all_finite", "any_nonfinite", "check_states_finite", "keep_or_zero_", "report_dropped"]


def all_finite(t: Tensor) -> Tensor:
    """A 0-d bool tensor, True if every entry of ``t`` is finite, in one pass over ``t`` and no host sync.

    ``torch.aminmax`` reads ``t`` once and propagates a NaN to both results, so the smallest and the largest entry are
    finite exactly when every entry is; ``isfinite(t).all()`` makes four passes and a bool tensor the size of ``t``
    (for an 8 MB state, 1.7 ms against 0.11 ms on one CPU core).

    Args:
        t: a tensor (integer and empty ones are finite).

    Returns:
        Whether every entry is finite, on ``t``'s device.

    Example:
        >>> import torch
        >>> for x in (torch.tensor([1.0, -2.0]), torch.tensor([1.0, float("nan")]), torch.tensor([float("-inf")])):
        ...     print(bool(all_finite(x)))
        True
        False
        False

    """
    if t.is_complex():
        return torch.isfinite(t).all()
    if t.numel() == 0 or not t.is_floating_point():
        return torch.ones((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t)
    return torch.logical_and(torch.isfinite(lo), torch.isfinite(hi))


def any_nonfinite(tensors: Iterable[Tensor]) -> Tensor:
    """A 0-d bool tensor, True if any entry of ``tensors`` is NaN or infinite (computed on the device, no host sync).

    Args:
        tensors: the sums of one update.

    Returns:
        Whether any of them holds a non-finite entry (one pass over each, see :func:`all_finite`).

    """
    return torch.logical_not(torch.stack([all_finite(t) for t in tensors]).all())


def keep_or_zero_(t: Tensor, keep: Tensor) -> Tensor:
    """``t`` as it is if ``keep`` is 1, all zeros if it is 0, NaN and inf entries included: in place, no host sync.

    This drops an update with a non-finite sum without a branch on the host. ``t * 0`` is NaN where ``t`` is NaN or
    infinite, so ``nan_to_num_`` zeroes what the product leaves; where ``keep`` is 1, ``t`` is finite (it was checked)
    and both passes leave it as it is. Two vectorized passes are faster than ``masked_fill_`` with a 0-d mask (for an
    8 MB tensor, 0.35 ms against 0.74 ms on one CPU core).

    Args:
        t: a float64 tensor, finite if ``keep`` is 1.
        keep: a 0-d float64 tensor holding 1 or 0, on ``t``'s device.

    Returns:
        ``t``.

    Example:
        >>> import torch
        >>> sums = torch.tensor([1.0, float("nan"), float("-inf")])
        >>> keep_or_zero_(sums, torch.tensor(0.0, dtype=torch.float64)).tolist()
        [0.0, 0.0, 0.0]
        >>> keep_or_zero_(torch.tensor([1.0, -2.0]), torch.tensor(1.0, dtype=torch.float64)).tolist()
        [1.0, -2.0]

    """
    return t.mul_(keep).nan_to_num_(0.0, 0.0, 0.0)


def report_dropped(cls: str, dropped: int, nan_strategy: str, warned: int) -> int:
    """Warn or raise about the updates dropped for a non-finite sum, as ``nan_strategy`` asks.

    Args:
        cls: the metric's class name, for the message.
        dropped: how many updates were dropped so far.
        nan_strategy: ``"error"``, ``"warn"``, ``"ignore"`` or ``"disable"``.
        warned: the count already warned about (a warning is issued only when there are new drops).

    Returns:
        The count warned about after this call.

    Raises:
        RuntimeError: If ``nan_strategy="error"`` and an update was dropped.

    """
    if dropped <= 0 or nan_strategy not in ("error", "warn"):
        return warned
    what = (
        f"{dropped} update(s) gave non-finite sums (NaN or inf in the inputs, or an overflow) and were left out of the"
        " average (each still counted as a tick)"
    )
    if nan_strategy == "error":
        raise RuntimeError(f"{cls}: {what}; nan_strategy='error'.")
    if dropped > warned:
        warnings.warn(f"{cls}: {what} (nan_strategy='warn').", UserWarning, stacklevel=3)
    return max(dropped, warned)


def check_states_finite(cls: str, states: Mapping[str, Tensor]) -> None:
    """Raise if a decayed state is not finite: updates with non-finite sums are dropped, so it overflowed.

    Args:
        cls: the metric's class name, for the message.
        states: the decayed states by name.

    Raises:
        OverflowError: If a state holds an infinite or NaN entry.

    """
    for name, state in states.items():
        if not bool(torch.isfinite(state).all()):
            worst = float(state.abs().nan_to_num(math.inf).max())
            raise OverflowError(
                f"{cls}: the decayed state `{name}` overflowed float64 (largest magnitude {worst!r}): its sums went"
                " past the float64 range, so the metric cannot be computed. Rescale the inputs, then reset the metric."
            )
