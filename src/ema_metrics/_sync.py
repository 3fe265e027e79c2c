"""Pack, validate and pool the states of EMA metrics across ranks: the one place every sync goes through.

``compute``, :func:`~ema_metrics.synced_values`, a synced ``forward``, ``merge_state`` and the Lightning callback all
pool through :func:`pool`. A sync is:

1. **One fixed-size ``all_gather``** of ``INLINE`` float64 values per rank: a header, then for each metric a
   descriptor (a fingerprint of its class, configuration and state layout; its tick count; whether it holds a pooled
   replica; its stored scale exponent; its summed counters), then, when they fit, the states themselves. The size never
   depends on the metrics, so ranks whose metrics differ (another ``alpha``, ``num_classes`` or number of metrics)
   cannot wait in collectives of different sizes: every rank sees every descriptor, runs the same checks on the same
   data and raises the same error.
2. **Small states** (the common case: a handful of :class:`~ema_metrics.EMAMetric`, 7 values each with their
   descriptor) travel inside that one collective: one collective per sync, and every rank's own state is known.
3. **Large states** (more than fit in ``INLINE``) travel by a second collective, an ``all_reduce`` of one fresh float64
   copy of the states (made while the first collective is in flight): a rank's extra memory and traffic are
   ``O(S)``, not ``O(world_size * S)``.

The descriptors carry each rank's *stored* exponent, so no sync takes a pass over the states: when every rank's is 0
(the usual case: no rank went without data until its sums fell below ``2 ** -600``), the states add as they are.
Only when a rank holds renormalized states are the exact exponents needed: from the gathered rows when the states
travelled inline, else by one more small ``all_gather``.

A rank's decayed states are ``mantissa * 2 ** scale`` (see :mod:`ema_metrics._decay`): pooling aligns every rank to the
largest exponent, so it is exact (float64 rounding) whatever each rank rescaled. The descriptors are read on the host
once per sync; the arithmetic on the gathered rows is :mod:`ema_metrics._sync_rows`, the checks
:mod:`ema_metrics._sync_check`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors

from ema_metrics import _decay
from ema_metrics._sync_check import HEADER, MAGIC, check, fingerprint, hash_of
from ema_metrics._sync_rows import Pooled, common_scale, flat, flat_parts, mask, pool_rows_at, size, split

if TYPE_CHECKING:
    from ema_metrics._base import DecayedSumMetric

__all__ = ["INLINE", "check_alike", "local_vector", "pool"]

_F64 = torch.float64
#: Float64 values each rank sends in the first collective of every sync (8 KiB): the header, the descriptors and, when
#: they fit, the states. Sized for scale: every sync, however small, gathers ``world_size * INLINE`` values (8 MiB at
#: 1024 ranks). ``benchmarks/bench_sync.py`` finds one gather cheaper than the two-collective path up to about 1e4
#: values at 2 and 4 processes, but a larger ``INLINE`` would make every small sync pay for it at every world size.
INLINE = 1024


@dataclass
class _Local:
    """What this rank sends in the first collective, and how to read the gathered rows."""

    vector: Tensor
    n_desc: int
    sizes: list[int]
    counters: list[int]
    inline: bool


def local_vector(metrics: Sequence[DecayedSumMetric]) -> _Local:
    """This rank's part of the first collective of a sync of ``metrics`` (``INLINE`` float64 values).

    The layout: the header; then for each metric its fingerprint, tick count and replica flag; every metric's counters;
    each metric's stored exponent; then, when they fit, the states. Everything known on the host goes into one tensor.
    """
    device = _device(metrics)
    n = len(metrics)
    counters = [[float(v) for v in m._extra_counters().values()] for m in metrics]
    sizes = [size(m) for m in metrics]
    n_desc = 4 * n + sum(len(c) for c in counters)
    inline = HEADER + n_desc + sum(sizes) <= INLINE
    prints = tuple(fingerprint(m) for m in metrics)
    host = [MAGIC, float(n), hash_of(prints), float(n_desc), 0.0 if inline else float(sum(sizes)), float(inline)]
    fits = HEADER + n_desc <= INLINE  # else too many metrics for one sync: every rank learns it from the header
    parts: list[Tensor] = []
    if fits:
        host += [*prints, *(float(m._ticks) for m in metrics), *(float(m._replica) for m in metrics)]
        host += [c for cs in counters for c in cs]
        parts = [m.scale.reshape(1) for m in metrics]  # the stored exponents: no pass over the states (see pool)
        if inline:
            parts += flat_parts(metrics)
    tail = torch.zeros(INLINE - len(host) - sum(p.numel() for p in parts), dtype=_F64, device=device)
    vector = torch.cat([torch.tensor(host, dtype=_F64, device=device), *parts, tail])
    return _Local(vector, n_desc, sizes, [len(c) for c in counters] if fits else [], inline)  # inline implies fits


def pool(
    metrics: Sequence[DecayedSumMetric], group: Any = None, with_ranks: bool = False, gather: Any = None
) -> list[Pooled]:
    """Pool every metric's state over the ranks of ``group``: one collective when the states are small.

    Every rank must call this with the same metrics in the same order; the metrics are not changed. Without an
    initialised process group the "pool" is this process's own state.

    Args:
        metrics: the EMA metrics.
        group: the process group (default: the whole world).
        with_ranks: also return each rank's own states (available when they travelled inline).
        gather: a torchmetrics ``dist_sync_fn`` to gather with instead of ``torch.distributed.all_gather``; it
            cannot sum, so large states are then gathered too.

    Raises:
        RuntimeError: (the same on every rank) if the ranks hold different metrics, configurations or state layouts,
            ticked different numbers of times, or mix pooled replicas with rank-local states.

    """
    if not metrics:
        return []
    n = len(metrics)
    gather = None if gather is gather_all_tensors else gather  # torchmetrics' default: a plain all_gather
    local = local_vector(metrics)
    summands: Tensor | None = None
    if local.inline or gather is not None:
        gathered = _gather(local.vector, group, gather)
    else:  # the states to sum are copied while the descriptors travel
        gathered, summands = _gather_while(local.vector, group, lambda: flat(*metrics))
    desc = gathered[:, : min(HEADER + local.n_desc, INLINE)].tolist()  # every rank's descriptors, on the host once
    check(desc, metrics, INLINE)
    rows_all: Tensor | None = None
    if local.inline:
        rows_all = gathered[:, HEADER + local.n_desc : HEADER + local.n_desc + sum(local.sizes)]
    elif gather is not None:
        rows_all = _gather(flat(*metrics), group, gather)
    at = HEADER + local.n_desc - n
    scale_rows = [row[at : at + n] for row in desc]  # (world, n): each rank's exponent of each metric
    if any(v != 0 for row in scale_rows for v in row):
        # a rank holds renormalized states (no data for thousands of ticks): whether each rank holds anything, and at
        # which exponent, takes a pass over the states, and one more small collective when they did not travel here
        scale_rows = _exact_scales(metrics, rows_all, scale_rows, group, gather)
    replicas = [desc[0][HEADER + 2 * n + i] == 1 for i in range(n)]
    per_metric = [[row[i] for row in scale_rows] for i in range(n)]
    commons = [common_scale(scales) for scales in per_metric]
    summed = None if summands is None else _reduce(metrics, summands, scale_rows, commons, replicas, group)
    plain = not any(replicas) and all(v == c for vs, c in zip(per_metric, commons, strict=True) for v in vs)
    plain_sum = rows_all.sum(dim=0) if rows_all is not None and plain else None  # the usual case: one sum for all
    out, start, at = [], 0, HEADER + 3 * n
    for i, m in enumerate(metrics):
        counted = [row[at : at + local.counters[i]] for row in (desc[:1] if replicas[i] else desc)]
        at += local.counters[i]
        replica, common, part = replicas[i], commons[i], slice(start, start + local.sizes[i])
        if rows_all is not None:
            total = None if plain_sum is None else plain_sum[part]
            pooled = pool_rows_at(m, rows_all[:, part], per_metric[i], common, replica, with_ranks, total)
        else:
            assert summed is not None
            scale = scale_rows[_rank(group)][i] if replica else common
            scale = 0.0 if math.isinf(scale) else scale
            states = split(m, summed[part])
            pooled = Pooled(
                states=states, scale=torch.tensor(scale, dtype=_F64, device=summed.device), ticks=0, counters={}
            )
            if scale < 0:  # only a pooled state of metrics without data needs its frame restored
                m._canonical(pooled.states, pooled.scale)
        start += local.sizes[i]
        pooled.ticks = int(desc[0][HEADER + n + i])
        columns = zip(*counted, strict=True)
        pooled.counters = {k: int(sum(col)) for k, col in zip(m._extra_counters(), columns, strict=True)}
        out.append(pooled)
    return out


def _exact_scales(
    metrics: Sequence[DecayedSumMetric], rows_all: Tensor | None, stored: list[list[float]], group: Any, gather: Any
) -> list[list[float]]:
    """Each rank's effective exponent of each metric (``-inf`` if it holds nothing), from the rows or gathered."""
    if rows_all is None:
        scales = torch.stack([m._effective_scale() for m in metrics])
        gathered: list[list[float]] = _gather(scales, group, gather).tolist()
        return gathered
    out, start = [list(row) for row in stored], 0
    for i, m in enumerate(metrics):
        for rank, row in enumerate(rows_all[:, start : start + size(m)]):
            states = list(split(m, row).values())
            scale = torch.tensor(stored[rank][i], dtype=_F64, device=row.device)
            out[rank][i] = float(_decay.effective_scale(states, m._masks(), scale))
        start += size(m)
    return out


def check_alike(metrics: Sequence[DecayedSumMetric], group: Any = None) -> None:
    """Only the checks of a sync (its first, fixed-size collective): the same error on every rank if they differ."""
    if metrics:
        local = local_vector(metrics)
        gathered = _gather(local.vector, group, None)
        check(gathered[:, : min(HEADER + local.n_desc, INLINE)].tolist(), metrics, INLINE)


def _reduce(
    metrics: Sequence[DecayedSumMetric],
    summands: Tensor,
    scales: list[list[float]],
    commons: list[float],
    replicas: list[bool],
    group: Any,
) -> Tensor:
    """Every metric's states (``summands``, this rank's fresh copy) summed over the ranks by **one** ``all_reduce``.

    A rank's states are rescaled to the common exponent first, only where it differs (usually every rank is at 0). A
    pooled replica (every rank holds the same pooled state) keeps this rank's copy.
    """
    rank, at, kept = _rank(group), 0, []
    for i, m in enumerate(metrics):
        part = summands[at : at + size(m)]
        mine = scales[rank][i]
        if replicas[i]:
            kept.append((part, part.clone()))
        elif mine != commons[i]:
            factor = 0.0 if math.isinf(mine) else 2.0 ** (mine - commons[i])
            part.copy_(torch.where(mask(m, part.device), part * factor, part))
        at += part.numel()
    if _ready(group) and len(kept) < len(metrics):
        dist.all_reduce(summands, op=dist.ReduceOp.SUM, group=group)
        for part, copy in kept:
            part.copy_(copy)
    return summands


def _ready(group: Any) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _rank(group: Any) -> int:
    return dist.get_rank(group) if _ready(group) else 0


def _gather(local: Tensor, group: Any, gather: Any) -> Tensor:
    if gather is not None:
        return torch.stack(list(gather(local, group=group)))
    return _gather_while(local, group, None)[0]


def _gather_while(local: Tensor, group: Any, meanwhile: Callable[[], Tensor] | None) -> tuple[Tensor, Tensor | None]:
    """Every rank's ``local``, stacked, and what ``meanwhile`` returns, run while the ``all_gather`` is in flight."""
    if not _ready(group):
        return local.unsqueeze(0), None if meanwhile is None else meanwhile()
    out = local.new_empty((dist.get_world_size(group), local.numel()))
    work = dist.all_gather(list(out.unbind(0)), local, group=group, async_op=meanwhile is not None)
    done = None if meanwhile is None else meanwhile()
    if work is not None:
        work.wait()
    return out, done


def _device(metrics: Sequence[DecayedSumMetric]) -> torch.device:
    state: Tensor = getattr(metrics[0], metrics[0]._state_names()[0])
    return state.device
