"""Non-finite sums in ``EMAWrapper``: dropped on the device in ``update``, reported by ``compute``."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

__all__ = ["any_nonfinite", "check_states_finite", "report_dropped"]


def any_nonfinite(tensors: Iterable[Tensor]) -> Tensor:
    """A 0-d bool tensor, True if any entry of ``tensors`` is NaN or infinite (computed on the device, no host sync).

    Args:
        tensors: the sums of one update.

    Returns:
        ``~isfinite(all entries).all()``.

    """
    return torch.logical_not(torch.isfinite(torch.cat([t.reshape(-1) for t in tensors])).all())


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
