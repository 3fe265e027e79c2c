"""The sync protocol of EMA metrics: pack, check and pool their states across ranks, in one place.

``compute``, :func:`~ema_metrics.synced_values`, a synced ``forward``, ``merge_state``, the Lightning callback's step
sync and its checkpoint rows all pool through this module. It reads a metric only through the :class:`Poolable`
interface: one method, ``sync_state()``, that returns a :class:`SyncState` (the decayed states, their decay masks,
the scale exponent, the tick count, the replica flag, the counters and the configuration). Everything below takes
those tensors and numbers, never a metric's private attributes, so this module imports no metric class.

A sync is:

1. **One ``all_reduce`` of a fixed-size vector** (``INLINE`` float64 values, :func:`reduce_vector`): the checks, then
   every metric's counters and stored scale exponent, then, when they fit, the states themselves (for larger states,
   their probes: largest magnitude and counts). The checks are small integers (chunks below ``2 ** 16``) and their
   squares: the number of metrics, a fingerprint of their classes, configurations and state layouts, and each one's
   ``2 * ticks + replica``. Every rank sent the same chunk if and only if ``W * sum(d ** 2) == sum(d) ** 2``; both
   sums are exact in float64 and are compared as integers on the host, so every rank reaches the same verdict from the
   same reduced vector. The size never depends on the metrics or on the number of ranks: ranks whose metrics differ
   cannot wait in collectives of different sizes, and the bytes a rank sends and receives do not grow with ``W``.
   Where everything lies in the vector (a :class:`_Plan`) depends only on the metrics' classes, configurations and
   layouts: it is built once and cached, and a training step's sync only writes its ticks, counters and states.
2. **Only on a mismatch**, one ``all_gather`` of every rank's descriptors (:func:`local_vector`) names the difference
   (:func:`check`): every rank raises the same error from the same rows.
3. **Small states** (the common case: a handful of :class:`~ema_metrics.EMAMetric`) are pooled right there: one
   collective per sync. A pooled replica (the same state on every rank) is added by rank 0 only.
4. **Large states** (more than fit in ``INLINE``) travel by a second collective, an ``all_reduce`` of one fresh float64
   copy of the states (made while the first collective is in flight): a rank's extra memory and traffic are
   ``O(S)``, not ``O(world_size * S)``.

The vector carries each rank's *stored* exponent, so no sync takes a pass over the states: when their sum is 0 (no
rank went without data until its sums fell below ``2 ** -600``), the states add as they are. Only when a rank holds
renormalized states are the exact exponents needed: one more small ``all_reduce`` (``MAX``) gives the largest, every
rank aligns its states to it, and one ``all_reduce`` sums them.

**The gather protocol** (:func:`local_vector`, :func:`check`) remains for what needs every rank's own state: per-rank
values (``with_ranks``: ``synced_values_by_rank``, the callbacks' rank spread) and a torchmetrics ``dist_sync_fn``
(which gathers and cannot sum). One ``all_gather`` of ``INLINE`` values per rank carries a header, every metric's
descriptor (fingerprint, ticks, replica flag, counters, stored exponent) and the small states; every rank checks the
same rows.

A rank's decayed states are ``mantissa * 2 ** scale`` (see :mod:`ema_metrics.utilities.decay`): pooling aligns every
rank to the largest exponent (:func:`pool_rows_at`, also used for checkpoint rows and ``merge_state``), so it is exact
(float64 rounding) whatever each rank rescaled. The descriptors are read on the host once per sync.
"""

from __future__ import annotations

import array
import functools
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors

from ema_metrics.utilities import decay

__all__ = [
    "HEADER",
    "all_gather_flat",
    "comm_device",
    "INLINE",
    "MAGIC",
    "Poolable",
    "Pooled",
    "SyncState",
    "check",
    "check_alike",
    "common_scale",
    "fingerprint",
    "flat",
    "local_vector",
    "pool",
    "pool_rows",
    "pool_rows_at",
    "rank",
    "ready",
    "split",
    "world",
]

_F64 = torch.float64
#: Float64 values of the first collective of every sync (8 KiB): the checks, counters, exponents and, when they fit,
#: the states (an ``all_reduce``; per rank in the gather protocol). A larger ``INLINE`` would make every small sync pay
#: for it.
INLINE = 1024
MAGIC = 20251126.0
HEADER = 6  # magic, number of metrics, layout fingerprint, descriptor values, large-state values, states inline?


# ---------------------------------------------------------------------------------------------- the interface
@dataclass
class SyncState:
    """What a sync reads of one metric (its states are the metric's own tensors, not copies).

    Attributes:
        kind: the metric's class (qualified name); only metrics of one kind pool.
        config: what else must agree between ranks (alpha, adjust, nan_strategy, ...).
        states: the decayed states by name, in sync order.
        masks: for each state, which entries decay (``None``: all of them; the others are counters, never rescaled).
        scale: the power-of-two exponent the decayed entries are stored at (a 0-d float64 tensor, at most 0).
        ticks: completed ticks.
        replica: whether the states are the pooled state of all ranks, identical on each (counted once).
        counters: Python-side counters, summed across ranks.
        count_positions: where the never-decayed entries (counts kept in the states) are in the flattened states.
        count_index: the same positions as a tensor on the states' device.

    """

    kind: str
    config: tuple[Any, ...]
    states: dict[str, Tensor]
    masks: list[Tensor | None]
    scale: Tensor
    ticks: int
    replica: bool
    counters: dict[str, int]
    count_positions: tuple[int, ...] = ()
    count_index: Tensor | None = None

    @property
    def size(self) -> int:
        """How many values the decayed states hold together."""
        return sum(s.numel() for s in self.states.values())

    def flat_mask(self, device: torch.device) -> Tensor:
        """Which of the flattened values decay (the others are counters, never rescaled)."""
        parts = [
            torch.ones(s.numel(), dtype=torch.bool, device=device) if m is None else m.reshape(-1).to(device)
            for s, m in zip(self.states.values(), self.masks, strict=True)
        ]
        return torch.cat(parts)

    def effective_scale(self, states: Sequence[Tensor] | None = None, scale: Tensor | None = None) -> Tensor:
        """The exponent ``states`` (default: the metric's) are at: 0 once data arrived, -inf when empty."""
        values = list(self.states.values()) if states is None else list(states)
        return decay.effective_scale(values, self.masks, self.scale if scale is None else scale)


class Poolable(Protocol):
    """What the sync needs of a metric: its :class:`SyncState`."""

    def sync_state(self) -> SyncState:
        """The metric's states and bookkeeping, as the sync reads them."""
        ...


@dataclass
class Pooled:
    """The pooled state of one metric: decayed states (mantissas at ``scale``), tick count and summed counters."""

    states: dict[str, Tensor]
    scale: Tensor
    ticks: int
    counters: dict[str, int]
    ranks: list[dict[str, Tensor]] | None = None  # each rank's own states (at scale 0 or its own), when inline
    #: What the sync's one read-back tells the host about the pooled states, so that the checks of ``compute`` need
    #: no read of their own: the flattened states themselves (small states), or whether they are all finite
    #: (``None``: not known) and their never-decayed entries (``count_positions``) summed.
    values: list[float] | None = None
    finite: bool | None = None
    counts: list[float] | None = None


# ---------------------------------------------------------------------------------------------- torch.distributed
#: Issue the collectives even in a group of one rank (which otherwise pools locally): for checks of the collectives
#: themselves on one device, such as ``benchmarks/gpu_check.py`` with a one-process NCCL group.
FORCE_COLLECTIVES = False


def ready(group: Any = None) -> bool:
    """Whether ``torch.distributed`` is initialised with more than one rank in ``group`` (default: the world)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return FORCE_COLLECTIVES or dist.get_world_size(group) > 1


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (0 without a process group)."""
    return dist.get_rank(group) if ready(group) else 0


def world(group: Any = None) -> int:
    """The number of ranks in ``group`` (1 without a process group)."""
    return dist.get_world_size(group) if ready(group) else 1


def comm_device(group: Any, device: torch.device) -> torch.device:
    """Where a collective of ``group`` takes tensors of ``device``: NCCL takes CUDA tensors only.

    A metric left on the CPU while the group is NCCL (the plain quick start never moves it) is pooled through a buffer
    on the current CUDA device; every other case uses the states' own device.
    """
    if device.type == "cpu" and ready(group) and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def all_gather_flat(out: Tensor, local: Tensor, group: Any = None, async_op: bool = False) -> Any:
    """Every rank's ``local`` into ``out`` (``world_size * local.numel()`` values, rank after rank): one collective.

    ``all_gather_into_tensor`` (``all_gather_single`` in the torch releases that renamed it) writes into one buffer;
    the list form of ``all_gather`` stages a flat buffer under NCCL and copies it back into ``world_size`` tensors.
    """
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return fn(out, local, group=group, async_op=async_op)


# ---------------------------------------------------------------------------------------------- layout and checks
def fingerprint(metric: Poolable | SyncState) -> float:
    """A 48-bit hash (exact in float64) of what must agree between ranks: class, configuration, state layout."""
    s = metric if isinstance(metric, SyncState) else metric.sync_state()
    layout = tuple((n, tuple(t.shape)) for n, t in s.states.items())
    return _hash_of((s.kind, s.config, layout, tuple(s.counters)))


def _hash_of(obj: tuple[object, ...]) -> float:
    """A 48-bit hash of ``repr(obj)``, exact in float64 (so it travels in a float64 collective); memoized."""
    try:
        return _memo(obj)
    except TypeError:  # an unhashable part (a subclass's configuration, say): no memo
        return _digest(obj)


def _digest(obj: object) -> float:
    return float(int.from_bytes(hashlib.blake2b(repr(obj).encode(), digest_size=6).digest(), "big"))


_memo = functools.lru_cache(maxsize=1024)(_digest)


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


# ---------------------------------------------------------------------------------------------- flat vectors
def _flat_parts(states: Sequence[SyncState]) -> list[Tensor]:
    """The decayed states as flat float64 tensors (views where they are float64 already), in sync order."""
    return [t.reshape(-1).to(_F64) for s in states for t in s.states.values()]


def flat(*states: SyncState) -> Tensor:
    """The decayed states, flattened into one fresh float64 vector (one copy)."""
    return torch.cat(_flat_parts(states))


def split(state: SyncState, values: Tensor) -> dict[str, Tensor]:
    """A flat vector of a metric's states as named states of their own shapes (views, on the states' device)."""
    out: dict[str, Tensor] = {}
    offset = 0
    device = state.scale.device  # the metric's
    if values.device != device:
        values = values.to(device)
    for name, local in state.states.items():
        # a view of the fresh buffer (no copy); torch.save and pickling store a shared buffer once
        k = local.numel()
        out[name] = values[offset : offset + k].view(local.shape)
        offset += k
    return out


# ---------------------------------------------------------------------------------------------- pooling arithmetic
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
        factors = torch.stack([_scalar(2.0 ** (v - common) if not math.isinf(v) else 0.0, rows.device) for v in scales])
        mask = state.flat_mask(rows.device)
        summed = torch.where(mask, rows * factors.unsqueeze(1), rows).sum(dim=0)
    pooled = Pooled(states=split(state, summed), scale=_scalar(common, rows.device), ticks=0, counters={})
    if common < 0:  # only a pooled state of metrics without data needs its frame restored
        decay.canonical_(list(pooled.states.values()), state.masks, pooled.scale)
    if with_ranks:
        pooled.ranks = [split(state, row) for row in rows]
    return pooled


# ---------------------------------------------------------------------------------------------- the sync
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
    states = _states_of(metrics)
    device = states[0].scale.device
    n = len(states)
    counters = [[float(v) for v in s.counters.values()] for s in states]
    sizes = [s.size for s in states]
    n_desc = 4 * n + sum(len(c) for c in counters)
    inline = HEADER + n_desc + sum(sizes) <= INLINE
    n_probe = 0 if inline else sum(1 + len(s.count_positions) for s in states)
    if HEADER + n_desc + n_probe > INLINE:  # no room for the probes: compute's checks then read the pooled states
        n_probe = 0
    prints = tuple(fingerprint(s) for s in states)
    host = [MAGIC, float(n), _hash_of(prints), float(n_desc), 0.0 if inline else float(sum(sizes)), float(inline)]
    fits = HEADER + n_desc <= INLINE  # else too many metrics for one sync: every rank learns it from the header
    parts: list[Tensor] = []
    if fits:
        host += [*prints, *(float(s.ticks) for s in states), *(float(s.replica) for s in states)]
        host += [c for cs in counters for c in cs]
        parts = [s.scale.reshape(1) for s in states]  # the stored exponents: no pass over the states (see pool)
        if inline:
            parts += _flat_parts(states)
        elif n_probe:
            parts += [_probe(s) for s in states]
    tail = torch.zeros(INLINE - len(host) - sum(p.numel() for p in parts), dtype=_F64, device=device)
    vector = torch.cat([torch.tensor(host, dtype=_F64, device=device), *parts, tail])  # the one copy of host data
    return _Local(vector, n_desc, sizes, [len(c) for c in counters] if fits else [], inline, n_probe)


def _probe(s: SyncState) -> Tensor:
    """What the host must learn of a large state in the first collective: its largest magnitude and its counts.

    With every rank's largest magnitude (NaN or inf if it holds one) the host knows without another read-back that the
    pooled states are finite when the magnitudes add up to less than ``2 ** 1023``; the never-decayed entries (counts
    such as dropped updates) add up exactly.
    """
    values = [t.reshape(-1).to(_F64) for t in s.states.values()]
    peak = decay.peak_magnitude(values, [None] * len(values)).reshape(1)  # every entry, counts included
    if not s.count_positions or s.count_index is None:
        return peak
    return torch.cat([peak, torch.cat(values)[s.count_index]])


def _states_of(metrics: Sequence[Poolable] | Sequence[SyncState]) -> list[SyncState]:
    return [m if isinstance(m, SyncState) else m.sync_state() for m in metrics]


def pool(metrics: Sequence[Poolable], group: Any = None, with_ranks: bool = False, gather: Any = None) -> list[Pooled]:
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
    states = _states_of(metrics)
    gather = None if gather is gather_all_tensors else gather  # torchmetrics' default: a plain all_gather
    if with_ranks or gather is not None:
        return _pool_gathered(states, group, with_ranks, gather)
    return _pool_reduced(states, group)


def _pool_gathered(states: list[SyncState], group: Any, with_ranks: bool, gather: Any) -> list[Pooled]:
    """The sync by an all-gather of every rank's descriptors and small states: every rank's own state is known."""
    n = len(states)
    local = local_vector(states)
    summands: Tensor | None = None
    if local.inline or gather is not None:
        gathered = _gather(local.vector, group, gather)
    else:  # the states to sum are copied while the descriptors travel
        gathered, summands = _gather_while(local.vector, group, lambda: flat(*states))
    n_head = min(HEADER + local.n_desc, INLINE)
    # The one read-back of the sync: every rank's descriptors (and, for large states, its probe) and, for small
    # states, their plain sum: the pooled states in the usual case, where no rank renormalized and none holds a replica.
    width = n_head + local.n_probe
    guess = gathered[:, n_head : n_head + sum(local.sizes)].sum(dim=0) if local.inline else None
    host = torch.cat([gathered[:, :width].reshape(-1), *([] if guess is None else [guess])]).tolist()
    host_rows = [host[r * width : (r + 1) * width] for r in range(gathered.shape[0])]
    desc = [row[:n_head] for row in host_rows]
    check(desc, [s.kind for s in states], INLINE)
    rows_all: Tensor | None = None
    if local.inline:
        rows_all = gathered[:, n_head : n_head + sum(local.sizes)]
    elif gather is not None:
        rows_all = _gather(flat(*states), group, gather)
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
    summed = None if summands is None else _reduce(states, summands, scale_rows[me], commons, me, group)
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
            pooled = Pooled(states=split(s, summed[part]), scale=_scalar(scale, summed.device), ticks=0, counters={})
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


# ---------------------------------------------------------------------------------------------- the all-reduce sync
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
    fits = needed <= INLINE
    inline = fits and needed + sum(sizes) <= INLINE
    n_probe = 0 if inline or not fits else sum(1 + len(s.count_positions) for s in states)
    if needed + n_probe > INLINE:  # no room for the probes: compute's checks then read the pooled states
        n_probe = 0
    layout = int(_hash_of(tuple(fingerprint(s) for s in states)))
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
        tail=_zeros(INLINE - sent, device),
    )


#: The plans of the syncs seen lately, by :func:`_plan_key`: a training loop syncs the same metrics at every step.
_PLANS: dict[tuple[Any, ...], _Plan] = {}
_MAX_PLANS = 64


def _plan_of(states: Sequence[SyncState], me: int) -> _Plan:
    """The layout of the all-reduce of a sync of ``states`` on rank ``me`` (cached: built once per layout)."""
    key = (
        INLINE,
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
    data); the states are not read (their stored exponents travel, see :func:`_pool_reduced`).
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
                torch.stack([s.scale if own else _scalar(0.0, device) for s, own in zip(states, plan.own, strict=True)])
            )
        if payload and (plan.inline or plan.n_probe):
            for s, own in zip(states, plan.own, strict=True):
                if not own:
                    parts.append(_zeros(s.size if plan.inline else 1 + len(s.count_positions), device))
                elif plan.inline:
                    parts += [t if t.dim() == 1 else t.reshape(-1) for t in s.states.values()]
                else:
                    parts.append(_probe(s))
        elif not payload:
            parts.append(_zeros(sum(plan.sizes) if plan.inline else plan.n_probe, device))
    # the host values through a buffer: several times cheaper than torch.tensor of a list
    values = torch.frombuffer(array.array("d", host), dtype=_F64)
    # one copy of host data; torch.cat takes the states to float64 (they are already, but for a subclass's)
    vector = torch.cat([values if device.type == "cpu" else values.to(device), *parts, plan.tail])
    return _Reduced(vector, plan)


def _zeros(n: int, device: torch.device) -> Tensor:
    return torch.zeros(n, dtype=_F64, device=device)


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
            f" exponents, more than one sync carries ({INLINE}); sync them in several calls (for example several"
            " synced_values calls)"
        )


def _name_mismatch(states: Sequence[SyncState], group: Any) -> None:
    """Gather every rank's descriptors (rare: the ranks differ) and raise the error that names the difference."""
    local = local_vector(states)
    rows = _gather(local.vector, group, None).tolist()
    check(rows, [s.kind for s in states], INLINE)
    raise RuntimeError(  # the descriptors hold everything the chunks do: not reached unless a rank is not syncing
        "EMA metrics sync: the ranks sent different checks (was another collective in flight?)"
    )


def _pool_reduced(states: list[SyncState], group: Any) -> list[Pooled]:
    """The sync by one all-reduce of a fixed-size vector (checks, counters, states) and, for large states, one more."""
    distributed = ready(group)
    me = dist.get_rank(group) if distributed else 0
    ranks = dist.get_world_size(group) if distributed else 1
    local = reduce_vector(states, me)
    plan = local.plan
    summands: Tensor | None = None
    if plan.inline or not plan.fits:
        reduced = _all_reduce_while(local.vector, group, None, distributed)[0]
    else:  # the states to sum are copied while the checks travel
        reduced, summands = _all_reduce_while(local.vector, group, lambda: flat(*states), distributed)
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
        mine, commons = _exponents(states, me, group)
        summed = _reduce(states, flat(*states) if summands is None else summands, mine, commons, me, group)
    elif summands is not None:
        summed = _reduce(states, summands, commons, commons, me, group)
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
            scale=_scalar(commons[i], device) if scales is None else scales[i],
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


def _exponents(states: Sequence[SyncState], me: int, group: Any) -> tuple[list[float], list[float]]:
    """This rank's effective exponent of each metric and the largest over the ranks (0 where no rank holds anything).

    A pass over the states and one small ``all_reduce`` (``MAX``), only after a renormalization.
    """
    mine = torch.stack(
        [s.effective_scale() if me == 0 or not s.replica else _scalar(-math.inf, s.scale.device) for s in states]
    )
    largest = mine.clone()
    if ready(group):
        largest = largest.to(comm_device(group, largest.device))
        dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=group)
    both = torch.cat([mine.to(largest.device), largest]).tolist()
    n = len(states)
    return both[:n], [0.0 if math.isinf(v) else v for v in both[n:]]


def _reduce(
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
    return _all_reduce_while(summands, group, None)[0]


def _all_reduce_while(
    local: Tensor, group: Any, meanwhile: Callable[[], Tensor] | None, distributed: bool | None = None
) -> tuple[Tensor, Tensor | None]:
    """The sum of every rank's ``local`` (on the group's device), and what ``meanwhile`` returns, run in flight.

    ``distributed``: whether :func:`ready` (when the caller knows it already).
    """
    if not (ready(group) if distributed is None else distributed):
        return local, None if meanwhile is None else meanwhile()
    buffer = local.to(comm_device(group, local.device))  # NCCL takes CUDA tensors only
    work = dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group, async_op=meanwhile is not None)
    done = None if meanwhile is None else meanwhile()
    if work is not None:
        work.wait()
    return buffer, done


def _scalar(value: float, device: torch.device) -> Tensor:
    """A 0-d float64 tensor holding ``value``, made by a fill kernel (no copy of host data)."""
    return torch.full((), value, dtype=_F64, device=device)


def _exact_scales(
    states: Sequence[SyncState], rows_all: Tensor | None, stored: list[list[float]], group: Any, gather: Any
) -> list[list[float]]:
    """Each rank's effective exponent of each metric (``-inf`` if it holds nothing), from the rows or gathered."""
    if rows_all is None:
        scales = torch.stack([s.effective_scale() for s in states])
        gathered: list[list[float]] = _gather(scales, group, gather).tolist()
        return gathered
    out, start = [list(row) for row in stored], 0
    for i, s in enumerate(states):
        for r, row in enumerate(rows_all[:, start : start + s.size]):
            scale = _scalar(stored[r][i], row.device)
            out[r][i] = float(s.effective_scale(list(split(s, row).values()), scale))
        start += s.size
    return out


def check_alike(metrics: Sequence[Poolable], group: Any = None) -> None:
    """Only the checks of a sync (its fixed-size all-reduce, without the states): the same error on every rank."""
    if metrics:
        states = _states_of(metrics)
        local = reduce_vector(states, rank(group), payload=False)
        reduced = _all_reduce_while(local.vector, group, None)[0]
        _verdict(reduced[: 2 * local.checks].tolist(), local, states, group, world(group))  # its one read-back


def _gather(local: Tensor, group: Any, gather: Any) -> Tensor:
    if gather is not None:
        return torch.stack(list(gather(local, group=group)))
    return _gather_while(local, group, None)[0]


def _gather_while(local: Tensor, group: Any, meanwhile: Callable[[], Tensor] | None) -> tuple[Tensor, Tensor | None]:
    """Every rank's ``local``, stacked, and what ``meanwhile`` returns, run while the ``all_gather`` is in flight."""
    if not ready(group):
        return local.unsqueeze(0), None if meanwhile is None else meanwhile()
    device = comm_device(group, local.device)
    out = torch.empty(dist.get_world_size(group) * local.numel(), dtype=local.dtype, device=device)
    work = all_gather_flat(out, local.to(device), group=group, async_op=meanwhile is not None)
    done = None if meanwhile is None else meanwhile()
    if work is not None:
        work.wait()
    return out.view(-1, local.numel()), done
