"""Functions over several EMA metrics: one sync for all of them, one tick for all of them, finding them in modules."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from ema_metrics import _sync
from ema_metrics._base import DecayedSumMetric
from ema_metrics.utilities.inputs import shown

__all__ = ["RankValues", "find_ema_metrics", "sum_ranks", "synced_values", "synced_values_by_rank", "tick"]


def sum_ranks(stacked: Tensor) -> Tensor:
    """Reduce a state gathered from all ranks, of shape ``(world_size, ...)``, by an exact float64 sum.

    The ``dist_reduce_fx`` declared for every decayed sum (the sync itself aligns the ranks' scales first, see
    :mod:`ema_metrics._sync`). The sum runs in float64 whatever the state's dtype.

    Example:
        >>> import torch
        >>> from ema_metrics import sum_ranks
        >>> sum_ranks(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        tensor([4., 6.])

    """
    return stacked.sum(dim=0, dtype=torch.float64).to(stacked.dtype)


def synced_values(metrics: Sequence[DecayedSumMetric], process_group: Any | None = None) -> list[Tensor]:
    """Values of several metrics pooled across ranks, with **one** collective for all of them when they are small.

    Every rank must call this with the same metrics in the same order; the local states are left untouched. Metrics
    are pooled over their own ``process_group`` (or over ``process_group`` when given), one sync per group. The
    checks of ``compute`` apply: ranks that ticked different numbers of times, or hold differently configured
    metrics, raise the same error on every rank; so do rejected updates and (with ``nan_strategy="error"``)
    non-finite values. Without an initialised process group the local values come back, with the same checks.

    Args:
        metrics: the EMA metrics to pool.
        process_group: the group to pool over (default: each metric's own, the whole world unless set).

    Returns:
        The pooled value of each metric, in order.

    Raises:
        TypeError: If ``metrics`` is not a list or tuple of EMA metrics.

    Example:
        >>> import torch
        >>> from ema_metrics import EMAMetric, synced_values
        >>> a, b = EMAMetric(alpha=0.5), EMAMetric(alpha=0.1)
        >>> for x in (1.0, 2.0, 4.0):
        ...     _ = a(x), b(x)
        >>> print([f"{v:.4f}" for v in synced_values([a, b])])
        ['3.0000', '2.4391']

    """
    return _pool_values(metrics, process_group, with_ranks=False)  # type: ignore[return-value]


@dataclass(frozen=True)
class RankValues:
    """A metric's pooled value and each rank's own value, from the same sync.

    Attributes:
        pooled: the value over all ranks (what :func:`synced_values` returns).
        ranks: each rank's own value, stacked: shape ``(world_size, *pooled.shape)``.

    """

    pooled: Tensor
    ranks: Tensor

    @property
    def min(self) -> Tensor:
        """The smallest per-rank value (elementwise)."""
        return self.ranks.amin(dim=0)

    @property
    def max(self) -> Tensor:
        """The largest per-rank value (elementwise)."""
        return self.ranks.amax(dim=0)


def synced_values_by_rank(metrics: Sequence[DecayedSumMetric], process_group: Any | None = None) -> list[RankValues]:
    """Pooled values and every rank's own value of several metrics, with **one** collective for both.

    Instead of the ``all_reduce`` of :func:`synced_values`, one ``all_gather`` brings every rank's decayed sums (its
    bytes grow with the number of ranks), so each rank's own EMA comes with the pooled one: a rank whose data or
    replica has gone wrong shows up as an outlier. Available for metrics whose states travel in the first collective
    of a sync (up to ``ema_metrics._sync.collectives.INLINE`` values for all of them together; every
    :class:`EMAMetric`); a larger state is summed by an ``all_reduce``, which keeps no rank's own value.

    Args:
        metrics: the EMA metrics (every rank passes the same ones in the same order).
        process_group: the group to pool over (default: each metric's own).

    Returns:
        For each metric, its pooled value and its per-rank values.

    Raises:
        ValueError: If the states are too large to travel in the first collective.

    Example:
        >>> from ema_metrics import EMAMetric, synced_values_by_rank
        >>> loss = EMAMetric(alpha=0.5)
        >>> for x in (4.0, 2.0):
        ...     _ = loss(x)
        >>> (spread,) = synced_values_by_rank([loss])
        >>> print(f"pooled={spread.pooled:.4f} min={spread.min:.4f} max={spread.max:.4f} ranks={len(spread.ranks)}")
        pooled=2.6667 min=2.6667 max=2.6667 ranks=1

    """
    return _pool_values(metrics, process_group, with_ranks=True)  # type: ignore[return-value]


def _pool_values(metrics: Sequence[DecayedSumMetric], process_group: Any, with_ranks: bool) -> list[Any]:
    _check_metric_sequence(metrics)
    groups: dict[int, tuple[Any, list[int]]] = {}
    for i, m in enumerate(metrics):
        group = process_group if process_group is not None else m.process_group
        groups.setdefault(id(group), (group, []))[1].append(i)
    values: list[Any] = [None] * len(metrics)
    for group, members in groups.values():
        chosen = [metrics[i] for i in members]
        pooled = _sync.pool(chosen, group, with_ranks=with_ranks, gather=chosen[0].dist_sync_fn)
        for i, p in zip(members, pooled, strict=True):
            value = metrics[i]._value_of(p)
            if not with_ranks:
                values[i] = value
                continue
            if p.ranks is None:
                raise ValueError(
                    f"{type(metrics[i]).__name__}: per-rank values need every rank's state, which travels in the first"
                    f" collective of a sync only up to {_sync.collectives.INLINE} values for all the metrics"
                    " together; these states are larger and are summed by an all_reduce. Ask for fewer or smaller"
                    " metrics at once."
                )
            ranks = [metrics[i]._value_from_states(states) for states in p.ranks]
            values[i] = RankValues(pooled=value, ranks=torch.stack([torch.as_tensor(r) for r in ranks]))
    return values


@contextmanager
def tick(*metrics: DecayedSumMetric | torch.nn.Module) -> Iterator[list[DecayedSumMetric]]:
    """Group the updates of several metrics (or of every EMA metric inside modules) into one tick each.

    All or nothing: if one of the metrics already has an open tick, none is opened.

    Args:
        metrics: metrics, or modules whose EMA metrics (nested submodules included) should tick together.

    Raises:
        TypeError: If an argument is neither an EMA metric nor a module.
        RuntimeError: If one of the metrics already has an open tick.

    Example:
        >>> from ema_metrics import EMAMetric, tick
        >>> loss, acc = EMAMetric(alpha=0.5), EMAMetric(alpha=0.5)
        >>> for step, micro in enumerate([[(1.0, 0.0), (3.0, 1.0)], [(2.0, 1.0), (2.0, 1.0)]]):
        ...     with tick(loss, acc):
        ...         for l, a in micro:
        ...             loss.update(l)
        ...             acc.update(a)
        ...     print(f"{step=} loss={loss.compute():.4f} acc={acc.compute():.4f}")
        step=0 loss=2.0000 acc=0.5000
        step=1 loss=2.0000 acc=0.8333

    """
    found = find_ema_metrics(*metrics)
    already = [m for m in found if m.in_tick]
    if already:  # all or nothing: no metric is opened (or later closed) when one cannot be
        raise RuntimeError(
            f"tick() was given {len(already)} metric(s) whose tick is already open"
            f" ({', '.join(type(m).__name__ for m in already)}); no tick was opened. Close it with end_tick() first."
        )
    for m in found:
        m.begin_tick()
    try:
        yield found
    finally:
        for m in found:
            m.end_tick()


def find_ema_metrics(*objs: DecayedSumMetric | torch.nn.Module) -> list[DecayedSumMetric]:
    """Every EMA metric in ``objs``: metrics themselves, or found inside modules (nested included), deduplicated.

    Raises:
        TypeError: If an object is neither an EMA metric nor a module, or is a torchmetrics metric that is not an EMA
            (it would not tick; wrap it in :class:`~ema_metrics.EMAWrapper`).

    Example:
        >>> import torch
        >>> from ema_metrics import EMAMetric, find_ema_metrics
        >>> model = torch.nn.Module()
        >>> model.loss = EMAMetric(alpha=0.1)
        >>> model.head = torch.nn.Module()
        >>> model.head.acc = EMAMetric(alpha=0.1)
        >>> len(find_ema_metrics(model))
        2

    """
    out: list[DecayedSumMetric] = []
    seen: set[int] = set()
    for obj in objs:
        if isinstance(obj, DecayedSumMetric):
            candidates: list[Any] = [obj]
        elif isinstance(obj, Metric):
            raise TypeError(
                f"Expected EMA metrics or torch.nn.Module objects, but got {type(obj).__name__}, a torchmetrics"
                " metric that is not an exponential moving average (it would not tick); smooth it with"
                f" EMAWrapper({type(obj).__name__}(...))"
            )
        elif isinstance(obj, torch.nn.Module):
            candidates = list(obj.modules())
        else:
            raise TypeError(f"Expected EMA metrics or torch.nn.Module objects, but got {shown(obj)}")
        for m in candidates:
            if isinstance(m, DecayedSumMetric) and id(m) not in seen:
                seen.add(id(m))
                out.append(m)
    return out


def _check_metric_sequence(metrics: Any) -> None:
    if not isinstance(metrics, (list, tuple)):
        raise TypeError(
            f"Expected argument `metrics` to be a list or tuple of EMA metrics, but got {shown(metrics)} of type"
            f" {type(metrics).__name__}"
        )
    for i, m in enumerate(metrics):
        if not isinstance(m, DecayedSumMetric):
            raise TypeError(
                f"Expected argument `metrics` to hold EMA metrics, but item {i} is {shown(m)} of type"
                f" {type(m).__name__}"
            )
