"""The arithmetic of pooling: align every rank's decayed states to the largest exponent, then add them.

A rank's decayed states are ``mantissa * 2 ** scale`` (see :mod:`ema_metrics.utilities.decay`): pooling aligns every
rank to the largest exponent, so it is exact (float64 rounding) whatever each rank rescaled. :func:`pool_rows_at` pools
rows held here (the gathered states, checkpoint rows, ``merge_state``); :func:`exponents` and
:func:`reduce_summands` do the same across ranks by ``all_reduce`` without gathering the states.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ema_metrics._sync.collectives import all_reduce_while, comm_device, ready
from ema_metrics._sync.state import Pooled, SyncState, split
from ema_metrics.utilities import decay

__all__ = ["common_scale", "exponents", "pool_rows", "pool_rows_at", "reduce_summands", "scalar", "zeros"]

_F64 = torch.float64


def common_scale(scales: Sequence[float]) -> float:
    """The largest exponent of the ranks that hold something (0 if none does)."""
    finite = [v for v in scales if not math.isinf(v)]
    return max(finite) if finite else 0.0


def pool_rows(state: SyncState, rows: Tensor, scales: Sequence[float], replica: bool) -> Pooled:
    """Pool per-rank states held here (checkpoint rows, ``merge_state``): the arithmetic of a sync, no collective.

    Args:
        state: the metric's sync state (its layout and masks).
        rows: ``(ranks, state.size)`` flat states.
        scales: each row's effective exponent (``-inf`` where it holds nothing).
        replica: whether every row is the same pooled replica (then it counts once).

    """
    return pool_rows_at(state, rows, list(scales), common_scale(scales), replica, with_ranks=False)


def pool_rows_at(
    state: SyncState,
    rows: Tensor,
    scales: list[float],
    common: float,
    replica: bool,
    with_ranks: bool,
    plain_sum: Tensor | None = None,
) -> Pooled:
    """Pool one metric's per-rank ``rows`` at exponents ``scales``; ``plain_sum`` is their sum, when already taken."""
    if replica:
        common = 0.0 if math.isinf(scales[0]) else scales[0]
        summed = rows[0].clone()
    elif all(v == common for v in scales):  # every rank at the same exponent: a plain sum
        summed = rows.sum(dim=0) if plain_sum is None else plain_sum
    else:
        factors = torch.stack([scalar(2.0 ** (v - common) if not math.isinf(v) else 0.0, rows.device) for v in scales])
        mask = state.flat_mask(rows.device)
        summed = torch.where(mask, rows * factors.unsqueeze(1), rows).sum(dim=0)
    pooled = Pooled(states=split(state, summed), scale=scalar(common, rows.device), ticks=0, counters={})
    if common < 0:  # only a pooled state of metrics without data needs its frame restored
        decay.canonical_(list(pooled.states.values()), state.masks, pooled.scale)
    if with_ranks:
        pooled.ranks = [split(state, row) for row in rows]
    return pooled


def exponents(states: Sequence[SyncState], me: int, group: Any) -> tuple[list[float], list[float]]:
    """This rank's effective exponent of each metric and the largest over the ranks (0 where no rank holds anything).

    A pass over the states and one small ``all_reduce`` (``MAX``), only after a renormalization.
    """
    mine = torch.stack(
        [s.effective_scale() if me == 0 or not s.replica else scalar(-math.inf, s.scale.device) for s in states]
    )
    largest = mine.clone()
    if ready(group):
        largest = largest.to(comm_device(group, largest.device))
        dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
    both = torch.cat([mine.to(largest.device), largest]).tolist()
    n = len(states)
    return both[:n], [0.0 if math.isinf(v) else v for v in both[n:]]


def reduce_summands(
    states: Sequence[SyncState],
    summands: Tensor,
    mine: list[float],
    commons: list[float],
    me: int,
    group: Any,
) -> Tensor:
    """Every metric's states (``summands``, this rank's fresh copy) summed over the ranks by **one** ``all_reduce``.

    A rank's states are rescaled to the common exponent first, only where it differs (usually every rank is at 0). A
    pooled replica (every rank holds the same pooled state) is added by rank 0 only.
    """
    at = 0
    for i, s in enumerate(states):
        part = summands[at : at + s.size]
        if s.replica and me != 0:
            part.zero_()
        elif mine[i] != commons[i]:
            factor = 0.0 if math.isinf(mine[i]) else 2.0 ** (mine[i] - commons[i])
            part.copy_(torch.where(s.flat_mask(part.device), part * factor, part))
        at += part.numel()
    return all_reduce_while(summands, group, None)[0]


def scalar(value: float, device: torch.device) -> Tensor:
    """A 0-d float64 tensor holding ``value``, made by a fill kernel (no copy of host data)."""
    return torch.full((), value, dtype=_F64, device=device)


def zeros(n: int, device: torch.device) -> Tensor:
    return torch.zeros(n, dtype=_F64, device=device)
