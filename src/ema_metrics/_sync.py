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
largest exponent, so it is exact (float64 rounding) whatever each rank rescaled.
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

if TYPE_CHECKING:
    from ema_metrics._base import DecayedSumMetric

__all__ = ["INLINE", "Pooled", "check_alike", "flat", "local_vector", "pool", "pool_rows", "size"]

_F64 = torch.float64
#: Float64 values each rank sends in the first collective of every sync (8 KiB): the header, the descriptors and, when
#: they fit, the states. Sized for scale: every sync, however small, gathers ``world_size * INLINE`` values (8 MiB at
#: 1024 ranks). ``benchmarks/bench_sync.py`` finds one gather cheaper than the two-collective path up to about 1e4
#: values at 2 and 4 processes, but a larger ``INLINE`` would make every small sync pay for it at every world size.
INLINE = 1024


@dataclass
class Pooled:
    """The pooled state of one metric: decayed states (mantissas at ``scale``), tick count and summed counters."""

    states: dict[str, Tensor]
    scale: Tensor
    ticks: int
    counters: dict[str, int]
    ranks: list[dict[str, Tensor]] | None = None  # each rank's own states (at scale 0 or its own), when inline


@dataclass
class _Local:
    """What this rank sends in the first collective, and how to read the gathered rows."""

    vector: Tensor
    n_desc: int
    sizes: list[int]
    counters: list[int]
    inline: bool


def local_vector(metrics: Sequence[DecayedSumMetric]) -> _Local:
    """This rank's part of the first collective of a sync of ``metrics`` (``INLINE`` float64 values)."""
    device = _device(metrics)
    n = len(metrics)
    counters = [list(map(float, m._extra_counters().values())) for m in metrics]
    sizes = [size(m) for m in metrics]
    n_desc = 4 * n + sum(len(c) for c in counters)
    inline = HEADER + n_desc + sum(sizes) <= INLINE
    prints = [fingerprint(m) for m in metrics]
    host = [MAGIC, float(n), hash_of(prints), float(n_desc), 0.0 if inline else float(sum(sizes)), float(inline)]
    if HEADER + n_desc > INLINE:  # too many metrics for one sync: every rank learns it from the header, and raises
        vector = torch.tensor(host, dtype=_F64, device=device)
        return _Local(torch.nn.functional.pad(vector, (0, INLINE - HEADER)), n_desc, sizes, [], False)
    host += prints + [float(m._ticks) for m in metrics] + [float(m._replica) for m in metrics]
    scales = torch.stack([m.scale for m in metrics])  # the stored exponents: no pass over the states (see pool)
    counted = torch.tensor([c for cs in counters for c in cs], dtype=_F64, device=device)
    parts = [torch.tensor(host, dtype=_F64, device=device), scales, counted]
    if inline:
        parts += [flat(m) for m in metrics]
    local = torch.cat(parts)
    local = torch.nn.functional.pad(local, (0, INLINE - local.numel()))
    return _Local(local, n_desc, sizes, [len(c) for c in counters], inline)


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
    check(gathered, metrics, INLINE)
    rows_all: Tensor | None = None
    if local.inline:
        rows_all = gathered[:, HEADER + local.n_desc : HEADER + local.n_desc + sum(local.sizes)]
    elif gather is not None:
        rows_all = _gather(flat(*metrics), group, gather)
    at = HEADER + 3 * n
    scale_rows = gathered[:, at : at + n]  # (world, n): each rank's exponent of each metric
    if bool((scale_rows != 0).any()):
        # a rank holds renormalized states (no data for thousands of ticks): whether each rank holds anything, and at
        # which exponent, takes a pass over the states, and one more small collective when they did not travel here
        scale_rows = _exact_scales(metrics, rows_all, scale_rows, group, gather)
    at += n
    replicas = [bool(gathered[0, HEADER + 2 * n + i] == 1) for i in range(n)]
    commons = [_common_scale(scale_rows[:, i]) for i in range(n)]
    host_scales = scale_rows.tolist()
    summed = None if summands is None else _reduce(metrics, summands, host_scales, commons, replicas, group)
    out, start = [], 0
    for i, m in enumerate(metrics):
        rank_counters = gathered[:, at : at + local.counters[i]]
        at += local.counters[i]
        replica, common = replicas[i], commons[i]
        if rows_all is not None:
            rows = rows_all[:, start : start + local.sizes[i]]
            pooled = _pool_rows(m, rows, scale_rows[:, i], common, replica, with_ranks)
        else:
            assert summed is not None
            scale = host_scales[_rank(group)][i] if replica else common
            scale = 0.0 if math.isinf(scale) else scale
            states = _split(m, summed[start : start + local.sizes[i]])
            pooled = Pooled(
                states=states, scale=torch.tensor(scale, dtype=_F64, device=summed.device), ticks=0, counters={}
            )
            if scale < 0:  # only a pooled state of metrics without data needs its frame restored
                m._canonical(pooled.states, pooled.scale)
        start += local.sizes[i]
        totals = rank_counters[:1] if replica else rank_counters
        pooled.ticks = int(gathered[0, HEADER + n + i])
        pooled.counters = dict(zip(m._extra_counters(), (int(v) for v in totals.sum(0).tolist()), strict=True))
        out.append(pooled)
    return out


def _exact_scales(
    metrics: Sequence[DecayedSumMetric], rows_all: Tensor | None, stored: Tensor, group: Any, gather: Any
) -> Tensor:
    """Each rank's effective exponent of each metric (``-inf`` if it holds nothing), from the rows or gathered."""
    if rows_all is None:
        return _gather(torch.stack([m._effective_scale() for m in metrics]), group, gather)
    out, start = torch.empty_like(stored), 0
    for i, m in enumerate(metrics):
        for rank, row in enumerate(rows_all[:, start : start + size(m)]):
            states = list(_split(m, row).values())
            out[rank, i] = _decay.effective_scale(states, m._masks(), stored[rank, i])
        start += size(m)
    return out


def check_alike(metrics: Sequence[DecayedSumMetric], group: Any = None) -> None:
    """Only the checks of a sync (its first, fixed-size collective): the same error on every rank if they differ."""
    if metrics:
        check(_gather(local_vector(metrics).vector, group, None), metrics, INLINE)


def pool_rows(metric: DecayedSumMetric, rows: Tensor, scales: Tensor, replica: bool) -> Pooled:
    """Pool per-rank states held here (checkpoint rows, ``merge_state``): the arithmetic of a sync, no collective."""
    return _pool_rows(metric, rows, scales, _common_scale(scales), replica, with_ranks=False)


def _common_scale(scales: Tensor) -> float:
    """The largest exponent of the ranks that hold something (0 if none does)."""
    finite = [v for v in scales.tolist() if not math.isinf(v)]
    return max(finite) if finite else 0.0


def _pool_rows(
    metric: DecayedSumMetric, rows: Tensor, scales: Tensor, common: float, replica: bool, with_ranks: bool
) -> Pooled:
    if replica:
        first = float(scales[0])
        common = 0.0 if math.isinf(first) else first
        summed = rows[0].clone()
    elif all(v == common for v in scales.tolist()):  # every rank at the same exponent: a plain sum
        summed = rows.sum(dim=0)
    else:
        exponents = torch.where(torch.isinf(scales), torch.full_like(scales, -math.inf), scales - common)
        summed = torch.where(_mask(metric, rows.device), rows * torch.exp2(exponents).unsqueeze(1), rows).sum(dim=0)
    pooled = Pooled(
        states=_split(metric, summed), scale=torch.tensor(common, dtype=_F64, device=rows.device), ticks=0, counters={}
    )
    if common < 0:  # only a pooled state of metrics without data needs its frame restored
        metric._canonical(pooled.states, pooled.scale)
    if with_ranks:
        pooled.ranks = [_split(metric, row) for row in rows]
    return pooled


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
            part.copy_(torch.where(_mask(m, part.device), part * factor, part))
        at += part.numel()
    if _ready(group) and len(kept) < len(metrics):
        dist.all_reduce(summands, op=dist.ReduceOp.SUM, group=group)
        for part, copy in kept:
            part.copy_(copy)
    return summands


def size(metric: DecayedSumMetric) -> int:
    """How many values the metric's decayed states hold together."""
    return sum(getattr(metric, n).numel() for n in metric._state_names())


def flat(*metrics: DecayedSumMetric) -> Tensor:
    """The metrics' decayed states, flattened into one fresh float64 vector (one copy)."""
    return torch.cat([getattr(m, n).reshape(-1).to(_F64) for m in metrics for n in m._state_names()])


def _mask(metric: DecayedSumMetric, device: torch.device) -> Tensor:
    return torch.cat([metric._decay_masks[n].reshape(-1) for n in metric._state_names()]).to(device)


def _split(metric: DecayedSumMetric, flat: Tensor) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    offset = 0
    for name in metric._state_names():
        local = getattr(metric, name)
        # a view of the fresh buffer (no copy); torch.save and pickling store a shared buffer once
        out[name] = flat[offset : offset + local.numel()].reshape(local.shape).to(device=local.device)
        offset += local.numel()
    return out


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
