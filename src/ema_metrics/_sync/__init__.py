"""The sync protocol of EMA metrics: pack, check and pool their states across ranks, in one place.

``compute``, :func:`~ema_metrics.synced_values`, a synced ``forward``, ``merge_state``, the Lightning callback's step
sync and its checkpoint rows all pool through this package (:func:`pool`). It reads a metric only through the
:class:`Poolable` interface: one method, ``sync_state()``, that returns a :class:`SyncState` (the decayed states,
their decay masks, the scale exponent, the tick count, the replica flag, the counters and the configuration).
Everything below takes those tensors and numbers, never a metric's private attributes, so this package imports no
metric class.

Its modules, from the bottom: :mod:`~ema_metrics._sync.collectives` (the size of a sync's first collective, the
``torch.distributed`` calls), :mod:`~ema_metrics._sync.state` (what a sync reads of a metric and returns),
:mod:`~ema_metrics._sync.pooling` (aligning exponents and adding), then the two protocols:
:mod:`~ema_metrics._sync.reduced` (the all-reduce of every step) and :mod:`~ema_metrics._sync.gathered` (per-rank
values, and naming a mismatch). Settings are read where they live: ``collectives.INLINE``,
``collectives.FORCE_COLLECTIVES``.

A sync is:

1. **One ``all_reduce`` of a fixed-size vector** (``INLINE`` float64 values, see :mod:`~ema_metrics._sync.reduced`):
   the checks, then every metric's counters and stored scale exponent, then, when they fit, the states themselves
   (for larger states, their probes: largest magnitude and counts). The checks are small integers (chunks below ``2
   ** 16``) and their squares: the number of metrics, a fingerprint of their classes, configurations and state
   layouts, and each one's ``2 * ticks + replica``. Every rank sent the same chunk if and only if ``W * sum(d ** 2)
   == sum(d) ** 2``; both sums are exact in float64 and are compared as integers on the host, so every rank reaches
   the same verdict from the same reduced vector. The size never depends on the metrics or on the number of ranks:
   ranks whose metrics differ cannot wait in collectives of different sizes, and the bytes a rank sends and receives
   do not grow with ``W``. Where everything lies in the vector (a plan) depends only on the metrics' classes,
   configurations and layouts: it is built once and cached, and a training step's sync only writes its ticks,
   counters and states. 2. **Only on a mismatch**, one ``all_gather`` of every rank's descriptors
   (:func:`local_vector`) names the difference (:func:`check`): every rank raises the same error from the same rows.
   3. **Small states** (the common case: a handful of :class:`~ema_metrics.EMAMetric`) are pooled right there: one
   collective per sync. A pooled replica (the same state on every rank) is added by rank 0 only. 4. **Large states**
   (more than fit in ``INLINE``) travel by a second collective, an ``all_reduce`` of one fresh float64 copy of the
   states (made while the first collective is in flight): a rank's extra memory and traffic are ``O(S)``, not
   ``O(world_size * S)``.

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
rank to the largest exponent (:func:`~ema_metrics._sync.pooling.pool_rows_at`, also used for checkpoint rows and
``merge_state``), so it is exact (float64 rounding) whatever each rank rescaled. The descriptors are read on the host
once per sync.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torchmetrics.utilities.distributed import gather_all_tensors

from ema_metrics._sync import collectives, gathered, pooling, reduced, state
from ema_metrics._sync.collectives import all_gather_flat, comm_device, rank, ready, world
from ema_metrics._sync.gathered import check, local_vector, pool_gathered
from ema_metrics._sync.pooling import common_scale, pool_rows, pool_rows_at
from ema_metrics._sync.reduced import check_alike, pool_reduced, reduce_vector
from ema_metrics._sync.state import Poolable, Pooled, SyncState, fingerprint, flat, split, states_of

__all__ = [
    "Poolable",
    "Pooled",
    "SyncState",
    "all_gather_flat",
    "check",
    "check_alike",
    "collectives",
    "comm_device",
    "common_scale",
    "fingerprint",
    "flat",
    "gathered",
    "local_vector",
    "pool",
    "pool_rows",
    "pool_rows_at",
    "pooling",
    "rank",
    "ready",
    "reduce_vector",
    "reduced",
    "split",
    "state",
    "world",
]


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
    states = states_of(metrics)
    gather = None if gather is gather_all_tensors else gather  # torchmetrics' default: a plain all_gather
    if with_ranks or gather is not None:
        return pool_gathered(states, group, with_ranks, gather)
    return pool_reduced(states, group)
