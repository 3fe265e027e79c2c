"""Pack, validate and pool the states of EMA metrics across ranks: the one place every sync goes through.

``compute``, :func:`~ema_metrics.synced_values`, a synced ``forward``, ``merge_state`` and the Lightning callback all
pool through :func:`pool`. A sync is:

1. **One fixed-size ``all_gather``** of ``INLINE`` float64 values per rank: a header, then for each metric a
   descriptor (a fingerprint of its class, configuration and state layout; its tick count; whether it holds a pooled
   replica; its scale exponent; its summed counters), then, when they fit, the states themselves. The size never
   depends on the metrics, so ranks whose metrics differ (another ``alpha``, ``num_classes`` or number of metrics)
   cannot wait in collectives of different sizes: every rank sees every descriptor, runs the same checks on the same
   data and raises the same error.
2. **Small states** (the common case: a handful of :class:`~ema_metrics.EMAMetric`, 7 values each with their
   descriptor) travel inside that one collective: one collective per sync, and every rank's own state is known.
3. **Large states** (more than fit in ``INLINE``) travel by a second collective, an ``all_reduce`` of their float64
   sums, each rank's scaled to the common exponent first: a rank's extra memory and traffic are ``O(S)``, not
   ``O(world_size * S)``.

A rank's decayed states are ``mantissa * 2 ** scale`` (see :mod:`ema_metrics._decay`): pooling aligns every rank to the
largest exponent, so it is exact (float64 rounding) whatever each rank rescaled.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors

if TYPE_CHECKING:
    from ema_metrics._base import DecayedSumMetric

__all__ = ["INLINE", "Pooled", "check_alike", "fingerprint", "flat", "local_vector", "pool", "pool_rows"]

_F64 = torch.float64
#: Float64 values each rank sends in the first collective of every sync (8 KiB): the header, the descriptors and, when
#: they fit, the states. Chosen from ``benchmarks/bench_sync.py`` (see the README): up to this size one ``all_gather``
#: costs about what a header plus an ``all_reduce`` costs at 2 and 4 processes, and 1024 ranks gather 8 MiB.
INLINE = 1024
_MAGIC = 20251126.0
_HEADER = 6  # magic, number of metrics, layout fingerprint, descriptor values, large-state values, states inline?


@dataclass
class Pooled:
    """The pooled state of one metric: decayed states (mantissas at ``scale``), tick count and summed counters."""

    states: dict[str, Tensor]
    scale: Tensor
    ticks: int
    counters: dict[str, int]
    ranks: list[dict[str, Tensor]] | None = None  # each rank's own states (at scale 0 or its own), when inline


def fingerprint(metric: DecayedSumMetric) -> float:
    """A 48-bit hash (exact in float64) of what must agree between ranks: class, configuration, state layout."""
    layout = [(n, tuple(getattr(metric, n).shape)) for n in metric._state_names()]
    return _hash((type(metric).__qualname__, metric._sync_config(), layout, list(metric._extra_counters())))


def _hash(obj: object) -> float:
    return float(int.from_bytes(hashlib.blake2b(repr(obj).encode(), digest_size=6).digest(), "big"))


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
    sizes = [sum(getattr(m, name).numel() for name in m._state_names()) for m in metrics]
    n_desc = 4 * n + sum(len(c) for c in counters)
    inline = _HEADER + n_desc + sum(sizes) <= INLINE
    prints = [fingerprint(m) for m in metrics]
    host = [_MAGIC, float(n), _hash(prints), float(n_desc), 0.0 if inline else float(sum(sizes)), float(inline)]
    if _HEADER + n_desc > INLINE:  # too many metrics for one sync: every rank learns it from the header, and raises
        vector = torch.tensor(host, dtype=_F64, device=device)
        return _Local(torch.nn.functional.pad(vector, (0, INLINE - _HEADER)), n_desc, sizes, [], False)
    host += prints + [float(m._ticks) for m in metrics] + [float(m._replica) for m in metrics]
    scales = torch.stack([m._effective_scale() for m in metrics])
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
    local = local_vector(metrics)
    gathered = _gather(local.vector, group, gather)
    _check(gathered, metrics)
    rows_all: Tensor | None = None
    if local.inline:
        rows_all = gathered[:, _HEADER + local.n_desc : _HEADER + local.n_desc + sum(local.sizes)]
    elif gather is not None:
        rows_all = _gather(torch.cat([flat(m) for m in metrics]), group, gather)
    at = _HEADER + 3 * n
    scale_rows = gathered[:, at : at + n]  # (world, n): each rank's exponent of each metric
    at += n
    replicas = [bool(gathered[0, _HEADER + 2 * n + i] == 1) for i in range(n)]
    commons = [_common_scale(scale_rows[:, i]) for i in range(n)]
    host_scales = scale_rows.tolist()
    summed = None if rows_all is not None else _reduce(metrics, host_scales, commons, replicas, group)
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
        pooled.ticks = int(gathered[0, _HEADER + n + i])
        pooled.counters = dict(zip(m._extra_counters(), (int(v) for v in totals.sum(0).tolist()), strict=True))
        out.append(pooled)
    return out


def check_alike(metrics: Sequence[DecayedSumMetric], group: Any = None) -> None:
    """Only the checks of a sync (its first, fixed-size collective): the same error on every rank if they differ."""
    if metrics:
        _check(_gather(local_vector(metrics).vector, group, None), metrics)


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
    scales: list[list[float]],
    commons: list[float],
    replicas: list[bool],
    group: Any,
) -> Tensor:
    """Every metric's states summed over the ranks with **one** in-place ``all_reduce`` of one fresh buffer.

    A rank's states are rescaled to the common exponent first, only where it differs (usually every rank is at 0). A
    pooled replica (every rank holds the same pooled state) keeps this rank's copy.
    """
    rank = _rank(group)
    parts = []
    for i, m in enumerate(metrics):
        values = flat(m)  # a fresh float64 buffer
        mine = scales[rank][i]
        if not replicas[i] and mine != commons[i]:
            factor = 0.0 if math.isinf(mine) else 2.0 ** (mine - commons[i])
            mask = _mask(m, values.device)
            values = torch.where(mask, values * factor, values)
        parts.append(values)
    summed = parts[0] if len(parts) == 1 else torch.cat(parts)
    if _ready(group) and not all(replicas):
        kept = [(p.clone(), sum(q.numel() for q in parts[:i])) for i, p in enumerate(parts) if replicas[i]]
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
        for copy, at in kept:
            summed[at : at + copy.numel()] = copy
    return summed


def flat(metric: DecayedSumMetric) -> Tensor:
    """The metric's decayed states, flattened into one float64 vector (a copy)."""
    return torch.cat([getattr(metric, n).reshape(-1).to(_F64) for n in metric._state_names()])


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


def _check(gathered: Tensor, metrics: Sequence[DecayedSumMetric]) -> None:
    """The same checks on every rank, from the same gathered data: the same error everywhere, and no hang."""
    n = len(metrics)
    head = gathered[:, :_HEADER].tolist()
    if any(h[0] != _MAGIC for h in head):
        raise RuntimeError("EMA metrics sync: a rank sent no EMA metric state (was another collective in flight?)")
    if any(h[1:] != head[0][1:] for h in head):
        counts = [int(h[1]) for h in head]
        raise RuntimeError(
            f"EMA metrics sync: the ranks sync different metrics (metrics per rank: {counts}), or"
            " metrics of another class, configuration (alpha, adjust, nan_strategy) or state layout (such as"
            " num_classes). Every rank must sync the same metrics, configured alike, in the same order."
        )
    if any(_HEADER + h[3] > INLINE for h in head):
        raise RuntimeError(
            f"EMA metrics sync: {int(head[0][1])} metrics need {int(head[0][3])} descriptor values, more than one sync"
            f" carries ({INLINE - _HEADER}); sync them in several calls (for example several synced_values calls)"
        )
    ticks = gathered[:, _HEADER + n : _HEADER + 2 * n].tolist()
    replica = gathered[:, _HEADER + 2 * n : _HEADER + 3 * n].tolist()
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


def _ready(group: Any) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _rank(group: Any) -> int:
    return dist.get_rank(group) if _ready(group) else 0


def _gather(local: Tensor, group: Any, gather: Any) -> Tensor:
    if gather is not None and gather is not gather_all_tensors:
        return torch.stack(list(gather(local, group=group)))
    if not _ready(group):
        return local.unsqueeze(0)
    out = local.new_empty((dist.get_world_size(group), local.numel()))
    dist.all_gather(list(out.unbind(0)), local, group=group)
    return out


def _device(metrics: Sequence[DecayedSumMetric]) -> torch.device:
    state: Tensor = getattr(metrics[0], metrics[0]._state_names()[0])
    return state.device
