"""The gather protocol: every rank's descriptors and small states, gathered; every rank checks the same rows.

It serves what needs every rank's own state: per-rank values (``with_ranks``: ``synced_values_by_rank``, the
callbacks' rank spread), a torchmetrics ``dist_sync_fn`` (which gathers and cannot sum), and the naming of a mismatch
that the all-reduce protocol found. One ``all_gather`` of ``INLINE`` values per rank carries a header, every metric's
descriptor (fingerprint, ticks, replica flag, counters, stored exponent) and the small states (for larger states, their
probes); larger states are then summed by an ``all_reduce``, or gathered through a ``dist_sync_fn``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ema_metrics._sync import collectives
from ema_metrics._sync.collectives import gather_rows, gather_while, rank
from ema_metrics._sync.pooling import common_scale, pool_rows_at, reduce_summands, scalar
from ema_metrics._sync.state import (
    Poolable,
    Pooled,
    SyncState,
    fingerprint,
    flat,
    flat_parts,
    hash_of,
    probe,
    split,
    states_of,
)
from ema_metrics.utilities import decay

__all__ = ["HEADER", "MAGIC", "check", "local_vector", "pool_gathered"]

_F64 = torch.float64
MAGIC = 20251126.0
HEADER = 6  # magic, number of metrics, layout fingerprint, descriptor values, large-state values, states inline?


def check(rows: list[list[float]], kinds: Sequence[str], inline: int) -> None:
    """The same checks on every rank, from the same gathered descriptors (one row per rank): the same error.

    Args:
        rows: at least the header and the descriptors of every rank's first collective (``inline`` values each).
        kinds: the class (qualified name) of each metric, for the messages.
        inline: the size of the first collective.

    Raises:
        RuntimeError: If the ranks differ in anything the descriptors hold.

    """
    n = len(kinds)
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
    for i, kind in enumerate(kinds):
        name = kind.rsplit(".", 1)[-1]
        per_rank = [int(row[i]) for row in ticks]
        if len(set(per_rank)) > 1:
            raise RuntimeError(
                f"{name}: ranks ticked different numbers of times ({per_rank}); the decayed sums of the"
                " ranks cannot be added. Every rank must call update/forward (or begin_tick/end_tick) the same number"
                " of times; pass weight=0 on a rank without data."
            )
        flags = [bool(row[i]) for row in replica]
        if len(set(flags)) > 1:
            raise RuntimeError(
                f"{name}: some ranks hold a pooled replica of the state and others a rank-local state"
                f" ({flags}); the states cannot be pooled. Load the same checkpoint on every rank, or reset the metric."
            )


@dataclass
class _Local:
    """What this rank sends in the first collective, and how to read the gathered rows."""

    vector: Tensor
    n_desc: int
    sizes: list[int]
    counters: list[int]
    inline: bool  # the states travel in the first collective (implies that the descriptors fit)
    n_probe: int  # values of the large states' probes that travel after the descriptors (0: none)


def local_vector(metrics: Sequence[Poolable] | Sequence[SyncState]) -> _Local:
    """This rank's part of the first collective of a sync of ``metrics`` (``INLINE`` float64 values).

    The layout: the header; then for each metric its fingerprint, tick count and replica flag; every metric's counters;
    each metric's stored exponent; then, when they fit, the states. Everything known on the host goes into one tensor.
    """
    states = states_of(metrics)
    device = states[0].scale.device
    n = len(states)
    counters = [[float(v) for v in s.counters.values()] for s in states]
    sizes = [s.size for s in states]
    n_desc = 4 * n + sum(len(c) for c in counters)
    inline = HEADER + n_desc + sum(sizes) <= collectives.INLINE
    n_probe = 0 if inline else sum(1 + len(s.count_positions) for s in states)
    if (
        HEADER + n_desc + n_probe > collectives.INLINE
    ):  # no room for the probes: compute's checks then read the pooled states
        n_probe = 0
    prints = tuple(fingerprint(s) for s in states)
    host = [MAGIC, float(n), hash_of(prints), float(n_desc), 0.0 if inline else float(sum(sizes)), float(inline)]
    fits = (
        HEADER + n_desc <= collectives.INLINE
    )  # else too many metrics for one sync: every rank learns it from the header
    parts: list[Tensor] = []
    if fits:
        host += [*prints, *(float(s.ticks) for s in states), *(float(s.replica) for s in states)]
        host += [c for cs in counters for c in cs]
        parts = [s.scale.reshape(1) for s in states]  # the stored exponents: no pass over the states (see pool)
        if inline:
            parts += flat_parts(states)
        elif n_probe:
            parts += [probe(s) for s in states]
    tail = torch.zeros(collectives.INLINE - len(host) - sum(p.numel() for p in parts), dtype=_F64, device=device)
    vector = torch.cat([torch.tensor(host, dtype=_F64, device=device), *parts, tail])  # the one copy of host data
    return _Local(vector, n_desc, sizes, [len(c) for c in counters] if fits else [], inline, n_probe)


def pool_gathered(states: list[SyncState], group: Any, with_ranks: bool, gather: Any) -> list[Pooled]:
    """The sync by an all-gather of every rank's descriptors and small states: every rank's own state is known."""
    n = len(states)
    local = local_vector(states)
    summands: Tensor | None = None
    if local.inline or gather is not None:
        gathered = gather_rows(local.vector, group, gather)
    else:  # the states to sum are copied while the descriptors travel
        gathered, summands = gather_while(local.vector, group, lambda: flat(*states))
    n_head = min(HEADER + local.n_desc, collectives.INLINE)
    # The one read-back of the sync: every rank's descriptors (and, for large states, its probe) and, for small
    # states, their plain sum: the pooled states in the usual case, where no rank renormalized and none holds a replica.
    width = n_head + local.n_probe
    guess = gathered[:, n_head : n_head + sum(local.sizes)].sum(dim=0) if local.inline else None
    host = torch.cat([gathered[:, :width].reshape(-1), *([] if guess is None else [guess])]).tolist()
    host_rows = [host[r * width : (r + 1) * width] for r in range(gathered.shape[0])]
    desc = [row[:n_head] for row in host_rows]
    check(desc, [s.kind for s in states], collectives.INLINE)
    rows_all: Tensor | None = None
    if local.inline:
        rows_all = gathered[:, n_head : n_head + sum(local.sizes)]
    elif gather is not None:
        rows_all = gather_rows(flat(*states), group, gather)
    at = HEADER + local.n_desc - n
    scale_rows = [row[at : at + n] for row in desc]  # (world, n): each rank's exponent of each metric
    if any(v != 0 for row in scale_rows for v in row):
        # a rank holds renormalized states (no data for thousands of ticks): whether each rank holds anything, and at
        # which exponent, takes a pass over the states, and one more small collective when they did not travel here
        scale_rows = _exact_scales(states, rows_all, scale_rows, group, gather)
    replicas = [desc[0][HEADER + 2 * n + i] == 1 for i in range(n)]
    per_metric = [[row[i] for row in scale_rows] for i in range(n)]
    commons = [common_scale(scales) for scales in per_metric]
    me = rank(group)
    summed = None if summands is None else reduce_summands(states, summands, scale_rows[me], commons, me, group)
    plain = not any(replicas) and all(v == c for vs, c in zip(per_metric, commons, strict=True) for v in vs)
    plain_sum = None
    if rows_all is not None and plain:  # the usual case: one sum for all (the one already read, when inline)
        plain_sum = guess if guess is not None else rows_all.sum(dim=0)
    guessed = host[len(host_rows) * width :] if guess is not None and plain else None
    out, start, at, probe_at = [], 0, HEADER + 3 * n, n_head
    for i, s in enumerate(states):
        counted = [row[at : at + local.counters[i]] for row in (desc[:1] if replicas[i] else desc)]
        at += local.counters[i]
        replica, common, part = replicas[i], commons[i], slice(start, start + local.sizes[i])
        if rows_all is not None:
            total = None if plain_sum is None else plain_sum[part]
            pooled = pool_rows_at(s, rows_all[:, part], per_metric[i], common, replica, with_ranks, total)
            if guessed is not None:
                pooled.values = guessed[part]
        else:
            assert summed is not None
            scale = scale_rows[0][i] if replica else common  # a replica is added by rank 0 only
            scale = 0.0 if math.isinf(scale) else scale
            pooled = Pooled(states=split(s, summed[part]), scale=scalar(scale, summed.device), ticks=0, counters={})
            if scale < 0:  # only a pooled state of metrics without data needs its frame restored
                decay.canonical_(list(pooled.states.values()), s.masks, pooled.scale)
        if local.n_probe:
            width_i = 1 + len(s.count_positions)
            probes = [row[probe_at : probe_at + width_i] for row in (host_rows[:1] if replica else host_rows)]
            probe_at += width_i
            peaks = [p[0] for p in probes]
            if not all(math.isfinite(p) for p in peaks):
                pooled.finite = False
            elif math.fsum(peaks) < 2.0**1023:  # no sum of these can overflow
                pooled.finite = True
            pooled.counts = [math.fsum(col) for col in zip(*(p[1:] for p in probes), strict=True)]
        start += local.sizes[i]
        pooled.ticks = int(desc[0][HEADER + n + i])
        columns = zip(*counted, strict=True)
        pooled.counters = {k: int(sum(col)) for k, col in zip(s.counters, columns, strict=True)}
        out.append(pooled)
    return out


def _exact_scales(
    states: Sequence[SyncState], rows_all: Tensor | None, stored: list[list[float]], group: Any, gather: Any
) -> list[list[float]]:
    """Each rank's effective exponent of each metric (``-inf`` if it holds nothing), from the rows or gathered."""
    if rows_all is None:
        scales = torch.stack([s.effective_scale() for s in states])
        gathered: list[list[float]] = gather_rows(scales, group, gather).tolist()
        return gathered
    out, start = [list(row) for row in stored], 0
    for i, s in enumerate(states):
        for r, row in enumerate(rows_all[:, start : start + s.size]):
            scale = scalar(stored[r][i], row.device)
            out[r][i] = float(s.effective_scale(list(split(s, row).values()), scale))
        start += s.size
    return out
