"""The checks of every sync, run on every rank from the same gathered descriptors (see :mod:`ema_metrics._sync`).

Every rank sees every rank's descriptor, so every rank raises the same error and none waits in a collective that the
others skip.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ema_metrics._base import DecayedSumMetric

__all__ = ["HEADER", "MAGIC", "check", "fingerprint", "hash_of"]

MAGIC = 20251126.0
HEADER = 6  # magic, number of metrics, layout fingerprint, descriptor values, large-state values, states inline?


def fingerprint(metric: DecayedSumMetric) -> float:
    """A 48-bit hash (exact in float64) of what must agree between ranks: class, configuration, state layout."""
    layout = tuple((n, tuple(getattr(metric, n).shape)) for n in metric._state_names())
    return hash_of((type(metric).__qualname__, metric._sync_config(), layout, tuple(metric._extra_counters())))


def hash_of(obj: tuple[object, ...]) -> float:
    """A 48-bit hash of ``repr(obj)``, exact in float64 (so it travels in a float64 collective); memoized."""
    try:
        return _memo(obj)
    except TypeError:  # an unhashable part (a subclass's configuration, say): no memo
        return _digest(obj)


def _digest(obj: object) -> float:
    return float(int.from_bytes(hashlib.blake2b(repr(obj).encode(), digest_size=6).digest(), "big"))


_memo = functools.lru_cache(maxsize=1024)(_digest)


def check(rows: list[list[float]], metrics: Sequence[DecayedSumMetric], inline: int) -> None:
    """The same checks on every rank, from the same gathered descriptors (one row per rank): the same error.

    ``rows`` hold at least the header and the descriptors of every rank's first collective (``inline`` values each).
    """
    n = len(metrics)
    head = [row[:HEADER] for row in rows]
    if any(h[0] != MAGIC for h in head):
        raise RuntimeError("EMA metrics sync: a rank sent no EMA metric state (was another collective in flight?)")
    if any(h[1:] != head[0][1:] for h in head):
        counts = [int(h[1]) for h in head]
        raise RuntimeError(
            f"EMA metrics sync: the ranks sync different metrics (metrics per rank: {counts}), or"
            " metrics of another class, configuration (alpha, adjust, nan_strategy) or state layout (such as"
            " num_classes). Every rank must sync the same metrics, configured alike, in the same order."
        )
    if any(HEADER + h[3] > inline for h in head):
        raise RuntimeError(
            f"EMA metrics sync: {int(head[0][1])} metrics need {int(head[0][3])} descriptor values, more than one sync"
            f" carries ({inline - HEADER}); sync them in several calls (for example several synced_values calls)"
        )
    ticks = [row[HEADER + n : HEADER + 2 * n] for row in rows]
    replica = [row[HEADER + 2 * n : HEADER + 3 * n] for row in rows]
    for i, m in enumerate(metrics):
        per_rank = [int(row[i]) for row in ticks]
        if len(set(per_rank)) > 1:
            raise RuntimeError(
                f"{type(m).__name__}: ranks ticked different numbers of times ({per_rank}); the decayed sums of the"
                " ranks cannot be added. Every rank must call update/forward (or begin_tick/end_tick) the same number"
                " of times; pass weight=0 on a rank without data."
            )
        flags = [bool(row[i]) for row in replica]
        if len(set(flags)) > 1:
            raise RuntimeError(
                f"{type(m).__name__}: some ranks hold a pooled replica of the state and others a rank-local state"
                f" ({flags}); the states cannot be pooled. Load the same checkpoint on every rank, or reset the metric."
            )
