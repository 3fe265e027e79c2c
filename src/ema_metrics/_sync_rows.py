"""The arithmetic of pooling per-rank states, with no collective: exponents aligned, summed, split into named states.

:mod:`ema_metrics._sync` pools the rows it gathered with it; a checkpoint's per-rank rows
(:mod:`ema_metrics._rank_state`) and ``merge_state`` pool with the same functions, so every pooled state is the same
arithmetic. A rank's decayed states are ``mantissa * 2 ** scale``: pooling aligns every rank to the largest exponent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ema_metrics._base import DecayedSumMetric

__all__ = ["Pooled", "common_scale", "flat", "flat_parts", "mask", "pool_rows", "pool_rows_at", "size", "split"]

_F64 = torch.float64


@dataclass
class Pooled:
    """The pooled state of one metric: decayed states (mantissas at ``scale``), tick count and summed counters."""

    states: dict[str, Tensor]
    scale: Tensor
    ticks: int
    counters: dict[str, int]
    ranks: list[dict[str, Tensor]] | None = None  # each rank's own states (at scale 0 or its own), when inline


def pool_rows(metric: DecayedSumMetric, rows: Tensor, scales: Tensor, replica: bool) -> Pooled:
    """Pool per-rank states held here (checkpoint rows, ``merge_state``): the arithmetic of a sync, no collective."""
    host = scales.tolist()
    return pool_rows_at(metric, rows, host, common_scale(host), replica, with_ranks=False)


def common_scale(scales: list[float]) -> float:
    """The largest exponent of the ranks that hold something (0 if none does)."""
    finite = [v for v in scales if not math.isinf(v)]
    return max(finite) if finite else 0.0


def pool_rows_at(
    metric: DecayedSumMetric,
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
        exponents = torch.tensor([v - common for v in scales], dtype=_F64, device=rows.device)  # -inf: holds nothing
        summed = torch.where(mask(metric, rows.device), rows * torch.exp2(exponents).unsqueeze(1), rows).sum(dim=0)
    pooled = Pooled(
        states=split(metric, summed), scale=torch.tensor(common, dtype=_F64, device=rows.device), ticks=0, counters={}
    )
    if common < 0:  # only a pooled state of metrics without data needs its frame restored
        metric._canonical(pooled.states, pooled.scale)
    if with_ranks:
        pooled.ranks = [split(metric, row) for row in rows]
    return pooled


def size(metric: DecayedSumMetric) -> int:
    """How many values the metric's decayed states hold together."""
    return sum(getattr(metric, n).numel() for n in metric._state_names())


def flat(*metrics: DecayedSumMetric) -> Tensor:
    """The metrics' decayed states, flattened into one fresh float64 vector (one copy)."""
    return torch.cat(flat_parts(metrics))


def flat_parts(metrics: Sequence[DecayedSumMetric]) -> list[Tensor]:
    """The metrics' decayed states as flat float64 tensors (views where they are float64 already), in sync order."""
    return [getattr(m, n).reshape(-1).to(_F64) for m in metrics for n in m._state_names()]


def mask(metric: DecayedSumMetric, device: torch.device) -> Tensor:
    """Which of the flat values decay (the others are counters, never rescaled)."""
    return torch.cat([metric._decay_masks[n].reshape(-1) for n in metric._state_names()]).to(device)


def split(metric: DecayedSumMetric, flat: Tensor) -> dict[str, Tensor]:
    """A flat vector of the metric's states as named states of their own shapes (views, on the states' device)."""
    out: dict[str, Tensor] = {}
    offset = 0
    for name in metric._state_names():
        local = getattr(metric, name)
        # a view of the fresh buffer (no copy); torch.save and pickling store a shared buffer once
        out[name] = flat[offset : offset + local.numel()].reshape(local.shape).to(device=local.device)
        offset += local.numel()
    return out
