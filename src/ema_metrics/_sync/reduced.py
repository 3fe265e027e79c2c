"""The all-reduce protocol: one ``all_reduce`` of a fixed-size vector carries the checks, counters and states.

The checks are small integers (chunks below ``2 ** 16``) and their squares: the number of metrics, a fingerprint of
their classes, configurations and state layouts, and each one's ``2 * ticks + replica``. Every rank sent the same chunk
if and only if ``W * sum(d ** 2) == sum(d) ** 2``; both sums are exact in float64, so every rank reaches the same
verdict from the same reduced vector (:func:`_agree`). The size never depends on the metrics or on the number of ranks:
ranks whose metrics differ cannot wait in collectives of different sizes, and the bytes a rank sends and receives do
not grow with ``W``. Where everything lies in the vector (a :class:`_Plan`) depends only on the metrics' classes,
configurations and layouts: it is built once and cached, and a training step's sync only writes its ticks, counters
and states. Only on a mismatch does one gather (:mod:`ema_metrics._sync.gathered`) name the difference.
"""

from __future__ import annotations

import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ema_metrics._sync import collectives
from ema_metrics._sync.collectives import all_reduce_while, gather_rows, rank, ready, world
from ema_metrics._sync.gathered import check, local_vector
from ema_metrics._sync.pooling import exponents, reduce_summands, scalar, zeros
from ema_metrics._sync.state import Poolable, Pooled, SyncState, fingerprint, flat, hash_of, probe, states_of
from ema_metrics.utilities import decay

__all__ = ["CHUNK_BITS", "HEAD_CHUNKS", "MAGIC_CHUNK", "TICK_CHUNKS", "check_alike", "pool_reduced", "reduce_vector"]

_F64 = torch.float64
#: Bits per check chunk: a chunk and its square summed over up to ``2 ** 20`` ranks stay exact in float64.
CHUNK_BITS = 16
#: The first check chunk of every sync (a rank in another collective sends something else).
MAGIC_CHUNK = 0xE3A5
HEAD_CHUNKS = 6  # the magic chunk, the number of metrics (2 chunks), the fingerprint of every metric together (3)
TICK_CHUNKS = 4  # per metric: ``2 * ticks + replica`` (64 bits; reduce_vector writes the 4 chunks out)
_MAX_RANKS = 2**20
#: Up to this many ranks, a chunk's sum squared and ``W`` times its squares' sum stay below ``2 ** 52``
#: (``W * (2 ** 16 - 1) < 2 ** 26``): the check is exact in float64.
_FLOAT_EXACT_RANKS = 1024
_CHUNK_MASK = (1 << CHUNK_BITS) - 1


def _chunks(value: int, count: int) -> list[int]:
    """``value`` (a non-negative integer below ``2 ** (16 * count)``) as ``count`` chunks below ``2 ** 16``."""
    return [(value >> (CHUNK_BITS * k)) & _CHUNK_MASK for k in range(count)]


@dataclass
class _Plan:
    """Where everything lies in the all-reduce of a sync of some metrics: the same at every step, so built once.

    The layout: the head's check chunks (the magic chunk, the number of metrics, the fingerprint of all of them) and
    their squares; each metric's ``2 * ticks + replica`` chunks and their squares; every metric's counters; each
    metric's stored exponent; then the states themselves (``inline``), or the probes of large states (``n_probe``
    values), or nothing. When the checks, counters and exponents of every metric do not fit (``fits``), only the
    head's checks travel: every rank learns it from the same verdict.
    """

    head: list[float]  # the head's chunks then their squares (the same host values at every step)
    checks: int  # check chunks: the head's then, when they fit, ``TICK_CHUNKS`` per metric
    sizes: list[int]
    counters: list[int]
    fits: bool
    inline: bool
    n_probe: int
    needed: int  # values the checks, counters and exponents of every metric take
    own: list[bool]  # whether this rank adds each metric in (a pooled replica: rank 0 only)
    all_own: bool
    scales_at: int  # where the exponents start
    payload_at: int  # where the states (or the probes) start
    used: int  # how many leading values of the reduced vector the host reads
    #: each metric's states: name, start and end in the flattened states, and the shape to view them at (``None``:
    #: the slice has it already)
    pieces: list[list[tuple[str, int, int, torch.Size | None]]]
    tail: Tensor  # the zeros after the parts (read only)


def _build_plan(states: Sequence[SyncState], me: int) -> _Plan:
    device = states[0].scale.device
    n = len(states)
    sizes = [s.size for s in states]
    counters = [len(s.counters) for s in states]
    needed = 2 * (HEAD_CHUNKS + TICK_CHUNKS * n) + sum(counters) + n
    fits = needed <= collectives.INLINE
    inline = fits and needed + sum(sizes) <= collectives.INLINE
    n_probe = 0 if inline or not fits else sum(1 + len(s.count_positions) for s in states)
    if needed + n_probe > collectives.INLINE:  # no room for the probes: compute's checks then read the pooled states
        n_probe = 0
    layout = int(hash_of(tuple(fingerprint(s) for s in states)))
    head = [MAGIC_CHUNK, *_chunks(n, 2), *_chunks(layout, 3)]
    checks = HEAD_CHUNKS + (TICK_CHUNKS * n if fits else 0)
    scales_at = 2 * checks + sum(counters)
    payload_at = scales_at + n
    extra = sum(sizes) if inline else n_probe
    used = payload_at + extra if fits else 2 * checks
    pieces, start = [], 0
    for s in states:
        mine = []
        for name, t in s.states.items():
            k = t.numel()
            mine.append((name, start, start + k, None if t.dim() == 1 else t.shape))
            start += k
        pieces.append(mine)
    sent = (scales_at + n + extra) if fits else 2 * checks
    own = [me == 0 or not s.replica for s in states]
    return _Plan(
        head=[float(c) for c in head] + [float(c * c) for c in head],
        checks=checks,
        sizes=sizes,
        counters=counters,
        fits=fits,
        inline=inline,
        n_probe=n_probe,
        needed=needed,
        own=own,
        all_own=all(own),
        scales_at=scales_at,
        payload_at=payload_at,
        used=used,
        pieces=pieces,
        tail=zeros(collectives.INLINE - sent, device),
    )


#: The plans of the syncs seen lately, by :func:`_plan_key`: a training loop syncs the same metrics at every step.
_PLANS: dict[tuple[Any, ...], _Plan] = {}
_MAX_PLANS = 64


def _plan_of(states: Sequence[SyncState], me: int) -> _Plan:
    """The layout of the all-reduce of a sync of ``states`` on rank ``me`` (cached: built once per layout)."""
    key = (
        collectives.INLINE,
        me == 0,
        states[0].scale.device,
        *(
            (s.kind, s.config, *[(n, t.shape) for n, t in s.states.items()], *s.counters, s.replica, s.count_positions)
            for s in states
        ),
    )
    try:
        plan = _PLANS.get(key)
    except TypeError:  # an unhashable part (a subclass's configuration, say): no cache
        return _build_plan(states, me)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _build_plan(states, me)
    return plan


@dataclass
class _Reduced:
    """What this rank adds into the all-reduce of a sync, and its :class:`_Plan`."""

    vector: Tensor
    plan: _Plan

    @property
    def checks(self) -> int:
        """How many check chunks the vector carries."""
        return self.plan.checks


def reduce_vector(states: Sequence[SyncState], me: int, payload: bool = True) -> _Reduced:
    """This rank's summand of the all-reduce of a sync of ``states`` (``INLINE`` float64 values, on their device).

    See :class:`_Plan` for the layout. A pooled replica (the same state on every rank) is added by rank ``me == 0``
    only, so that the sum holds it once. Everything known on the host goes into one tensor (the one copy of host
    data); the states are not read (their stored exponents travel, see :func:`pool_reduced`).
    """
    plan = _plan_of(states, me)
    device = states[0].scale.device
    host = plan.head.copy()
    parts: list[Tensor] = []
    if plan.fits:
        ticks: list[int] = []
        for s in states:  # ``2 * ticks + replica`` as TICK_CHUNKS chunks (ticks stay far below 2 ** 63)
            v = 2 * s.ticks + s.replica
            ticks += (v & _CHUNK_MASK, (v >> 16) & _CHUNK_MASK, (v >> 32) & _CHUNK_MASK, v >> 48)
        host += ticks
        host += [c * c for c in ticks]
        if plan.all_own:
            for s in states:
                host += s.counters.values()
            parts.append(torch.stack([s.scale for s in states]))
        else:
            for s, own, k in zip(states, plan.own, plan.counters, strict=True):
                host += s.counters.values() if own else [0] * k
            parts.append(
                torch.stack([s.scale if own else scalar(0.0, device) for s, own in zip(states, plan.own, strict=True)])
            )
        if payload and (plan.inline or plan.n_probe):
            for s, own in zip(states, plan.own, strict=True):
                if not own:
                    parts.append(zeros(s.size if plan.inline else 1 + len(s.count_positions), device))
                elif plan.inline:
                    parts += [t if t.dim() == 1 else t.reshape(-1) for t in s.states.values()]
                else:
                    parts.append(probe(s))
        elif not payload:
            parts.append(zeros(sum(plan.sizes) if plan.inline else plan.n_probe, device))
    # the host values through a buffer: several times cheaper than torch.tensor of a list
    values = torch.frombuffer(array.array("d", host), dtype=_F64)
    # one copy of host data; torch.cat takes the states to float64 (they are already, but for a subclass's)
    vector = torch.cat([values if device.type == "cpu" else values.to(device), *parts, plan.tail])
    return _Reduced(vector, plan)


def _agree(sums: Sequence[float], checks: int, ranks: int) -> bool:
    """Whether every rank sent the same check chunks: ``W * sum(d ** 2) == sum(d) ** 2`` for each, as integers.

    By Cauchy-Schwarz the two sides are equal if and only if every rank's chunk is the same. Each sum is an integer
    below ``2 ** 52`` (chunks below ``2 ** 16``, fewer than ``2 ** 20`` ranks), exact in float64. The head comes first,
    at the same place on every rank: where it differs every rank stops there; where it agrees, so do the layouts.
    """
    h, m = HEAD_CHUNKS, checks - HEAD_CHUNKS
    chunks = [*sums[:h], *sums[2 * h : 2 * h + m]]
    squares = [*sums[h : 2 * h], *sums[2 * h + m : 2 * h + 2 * m]]
    if ranks <= _FLOAT_EXACT_RANKS:  # both sides below 2 ** 52: exact in float64 (and cheaper than integers)
        return all(ranks * q == d * d for d, q in zip(chunks, squares, strict=True))
    return all(ranks * int(q) == int(d) ** 2 for d, q in zip(chunks, squares, strict=True))


def _verdict(sums: Sequence[float], local: _Reduced, states: Sequence[SyncState], group: Any, ranks: int) -> None:
    """The same verdict on every rank from the same reduced checks; on a mismatch, one gather names the culprit."""
    if ranks >= _MAX_RANKS:
        raise RuntimeError(f"EMA metrics sync: {ranks} ranks; the checks of a sync are exact up to {_MAX_RANKS - 1}")
    plan = local.plan
    if not _agree(sums, plan.checks, ranks):
        _name_mismatch(states, group)
    if not plan.fits:
        raise RuntimeError(
            f"EMA metrics sync: {len(states)} metrics need {plan.needed} values for their checks, counters and"
            f" exponents, more than one sync carries ({collectives.INLINE}); sync them in several calls (for example"
            " several synced_values calls)"
        )


def _name_mismatch(states: Sequence[SyncState], group: Any) -> None:
    """Gather every rank's descriptors (rare: the ranks differ) and raise the error that names the difference."""
    local = local_vector(states)
    rows = gather_rows(local.vector, group, None).tolist()
    check(rows, [s.kind for s in states], collectives.INLINE)
    raise RuntimeError(  # the descriptors hold everything the chunks do: not reached unless a rank is not syncing
        "EMA metrics sync: the ranks sent different checks (was another collective in flight?)"
    )


def pool_reduced(states: list[SyncState], group: Any) -> list[Pooled]:
    """The sync by one all-reduce of a fixed-size vector (checks, counters, states) and, for large states, one more."""
    distributed = ready(group)
    me = dist.get_rank(group) if distributed else 0
    ranks = dist.get_world_size(group) if distributed else 1
    local = reduce_vector(states, me)
    plan = local.plan
    summands: Tensor | None = None
    if plan.inline or not plan.fits:
        reduced = all_reduce_while(local.vector, group, None, distributed)[0]
    else:  # the states to sum are copied while the checks travel
        reduced, summands = all_reduce_while(local.vector, group, lambda: flat(*states), distributed)
    device = states[0].scale.device  # the metrics' (a CPU metric under NCCL is pooled through a CUDA buffer)
    if reduced.device != device:
        reduced = reduced[: plan.used].to(device)
    host = reduced[: plan.used].tolist()  # the one read-back of the sync
    _verdict(host, local, states, group, ranks)
    n = len(states)
    renormalized = any(host[plan.scales_at : plan.scales_at + n])
    commons = [0.0] * n
    offset = 0
    if renormalized:  # a rank holds renormalized states (no data for thousands of ticks): align to the largest
        mine, commons = exponents(states, me, group)
        summed = reduce_summands(states, flat(*states) if summands is None else summands, mine, commons, me, group)
    elif summands is not None:
        summed = reduce_summands(states, summands, commons, commons, me, group)
    else:  # the states came with the checks
        summed, offset = reduced, plan.payload_at
    if summed.device != device:
        summed = summed.to(device)
    # the pooled exponents: the summed stored ones (all 0) unless a rank renormalized
    scales = None if renormalized else reduced[plan.scales_at : plan.scales_at + n].unbind()
    out, at, start, probe_at = [], 2 * plan.checks, plan.payload_at, plan.payload_at
    for i, s in enumerate(states):
        pooled = Pooled(
            states={
                name: summed[offset + a : offset + b] if shape is None else summed[offset + a : offset + b].view(shape)
                for name, a, b, shape in plan.pieces[i]
            },
            scale=scalar(commons[i], device) if scales is None else scales[i],
            ticks=s.ticks,
            counters=dict(zip(s.counters, map(int, host[at : at + plan.counters[i]]), strict=True)),
        )
        at += plan.counters[i]
        start += plan.sizes[i]
        if commons[i] < 0:  # only a pooled state of metrics without data needs its frame restored
            decay.canonical_(list(pooled.states.values()), s.masks, pooled.scale)
        if plan.inline and not renormalized:
            pooled.values = host[start - plan.sizes[i] : start]
        elif plan.n_probe:
            width = 1 + len(s.count_positions)
            peak, *counts = host[probe_at : probe_at + width]
            probe_at += width
            # the pooled sum is finite when the ranks' largest magnitudes add up to less than the float64 range (with
            # room for the rounding of both sums); else compute's checks read the pooled states themselves
            pooled.finite = True if peak < 2.0**1022 else None
            pooled.counts = counts
        out.append(pooled)
    return out


def check_alike(metrics: Sequence[Poolable], group: Any = None) -> None:
    """Only the checks of a sync (its fixed-size all-reduce, without the states): the same error on every rank."""
    if metrics:
        states = states_of(metrics)
        local = reduce_vector(states, rank(group), payload=False)
        reduced = all_reduce_while(local.vector, group, None)[0]
        _verdict(reduced[: 2 * local.checks].tolist(), local, states, group, world(group))  # its one read-back
