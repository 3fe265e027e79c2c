"""How a ``DecayedSumMetric`` pools: torchmetrics' sync, a synced ``forward`` and ``merge_state``.

:class:`Pooling` is mixed into :class:`~ema_metrics._base.DecayedSumMetric` only (``self`` is one, which ``cast``
tells mypy); the pooling itself is :mod:`ema_metrics._sync`, the one place every sync goes through.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, cast

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors

from ema_metrics import _sync, _sync_check, _sync_rows
from ema_metrics._contract import _GROUP_TAG, _SCALE
from ema_metrics._state_dict import EXTRA_STATE_KEY

if TYPE_CHECKING:
    from ema_metrics._base import DecayedSumMetric

__all__ = ["Pooling"]


class Pooling(Metric):
    """The sync hooks of torchmetrics, the synced ``forward`` and ``merge_state`` of a ``DecayedSumMetric``."""

    # set by DecayedSumMetric
    _alpha: float
    adjust: bool
    sync_on_forward: bool | None
    _extra_counters: Callable[[], dict[str, int]]
    _set_extra_counters: Callable[[dict[str, int]], None]
    _replica: bool

    def _sync_config(self) -> tuple[Any, ...]:
        """What must agree between ranks besides the class and the state layout (hook; extend in subclasses)."""
        return (repr(self._alpha), self.adjust)

    def _check_states(self, states: dict[str, Tensor]) -> str | None:
        """What is wrong with these (loaded) states, or ``None`` (hook: e.g. a negative summed weight)."""
        return None

    def _sync_dist(
        self, dist_sync_fn: Callable[..., Any] = gather_all_tensors, process_group: Any | None = None
    ) -> None:
        """Pool the states of all ranks (see :mod:`ema_metrics._sync`: one collective for small states).

        The checks run before any state is touched: a failed sync leaves the local states as they were (torchmetrics
        only restores them on ``unsync``, which does not run when the sync raises).
        """
        (pooled,) = _sync.pool(
            [cast("DecayedSumMetric", self)], process_group or self.process_group, gather=dist_sync_fn
        )
        self._adopt(pooled)
        self._synced_counters: dict[str, int] | None = pooled.counters

    def _adopt(self, pooled: _sync_rows.Pooled) -> None:
        for name, value in pooled.states.items():
            setattr(self, name, value)
        setattr(self, _SCALE, pooled.scale)

    def unsync(self, should_unsync: bool = True) -> None:
        """Restore the local states after a sync (see :meth:`torchmetrics.Metric.unsync`)."""
        super().unsync(should_unsync)
        if should_unsync:
            self._synced_counters = None

    def _counters_for_compute(self) -> dict[str, int]:
        synced = self.__dict__.get("_synced_counters")
        return synced if synced is not None and self._is_synced else self._extra_counters()

    def _should_sync_forward(self) -> bool:
        flag = self.sync_on_forward
        if flag is None:
            flag = self.dist_sync_on_step
        return bool(flag) and self.distributed_available_fn()

    def _value_from_states(
        self, states: dict[str, Tensor], counters: dict[str, int] | None = None, check: bool = False
    ) -> Any:
        """The value computed from (pooled) states, without touching the local states (hook).

        With ``check``, the deferred checks run on ``counters`` (rejected updates, non-finite values).
        """
        raise NotImplementedError

    def _value_of(self, pooled: _sync_rows.Pooled) -> Any:
        """The value of a pooled state, after the checks ``compute`` makes."""
        return self._value_from_states(pooled.states, counters=pooled.counters, check=True)

    def _synced_forward_value(self) -> Any:
        (pooled,) = _sync.pool([cast("DecayedSumMetric", self)], self.process_group)
        return self._value_of(pooled)

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Pool another metric's state into this one, as a sync across two ranks would (torchmetrics >= 1.6).

        Args:
            incoming_state: an EMA metric of the same class and configuration that ticked as many times, or a
                ``state_dict()`` of one (its tick count and counters come with it; a bare dict of its states is
                taken to have ticked as many times as this metric, with no counters).

        Raises:
            TypeError: If ``incoming_state`` is neither.
            ValueError: If the two differ in class, configuration, state layout or tick count.

        Example:
            >>> from ema_metrics import EMAMetric
            >>> a, b = EMAMetric(alpha=0.5), EMAMetric(alpha=0.5)
            >>> for step, (x, y) in enumerate([(1.0, 3.0), (2.0, 6.0)]):
            ...     _ = a(x), b(y)
            >>> a.merge_state(b)
            >>> print(f"pooled={a.compute():.4f} ticks={a.ticks}")
            pooled=3.3333 ticks=2

        """
        this = cast("DecayedSumMetric", self)
        other = _merge_source(this, incoming_state)
        rows = torch.stack([_sync_rows.flat(this), _sync_rows.flat(other)])
        scales = torch.stack([this._effective_scale(), other._effective_scale()])
        pooled = _sync_rows.pool_rows(this, rows, scales, replica=False)
        counters = {k: v + other._extra_counters()[k] for k, v in self._extra_counters().items()}
        self._adopt(pooled)
        self._replica = False
        self._set_extra_counters(counters)
        self._computed = None


def _merge_source(metric: DecayedSumMetric, incoming: Any) -> DecayedSumMetric:
    """The metric to merge from: ``incoming`` itself, or a copy of ``metric`` loaded with the incoming state dict."""
    from ema_metrics._base import DecayedSumMetric  # here: _base imports this module

    name = type(metric).__name__
    if isinstance(incoming, dict):
        other = metric.clone()
        other.reset()
        has_extra = EXTRA_STATE_KEY in incoming
        if not has_extra:
            incoming = {**incoming, EXTRA_STATE_KEY: {"ticks": metric.ticks}}
        missing = [n for n in metric._state_names() if n not in incoming]
        if missing:
            raise ValueError(f"{name}.merge_state: the incoming state has no {missing}")
        try:
            other.load_state_dict({k: v for k, v in incoming.items() if k != _GROUP_TAG}, strict=False)
        except RuntimeError as err:
            raise ValueError(f"{name}.merge_state: the incoming state does not fit this metric: {err}") from err
        incoming = other
    if not isinstance(incoming, DecayedSumMetric):
        raise TypeError(
            f"Expected argument `incoming_state` to be an EMA metric or a dict of its states, but got"
            f" {type(incoming).__name__}"
        )
    if _sync_check.fingerprint(incoming) != _sync_check.fingerprint(metric):
        raise ValueError(
            f"{name}.merge_state: the incoming {type(incoming).__name__} differs in class, configuration"
            f" ({incoming._sync_config()} vs {metric._sync_config()}) or state layout; only identical EMAs pool"
        )
    if incoming.ticks != metric.ticks or incoming.in_tick or metric.in_tick:
        raise ValueError(
            f"{name}.merge_state: the two metrics ticked {metric.ticks} and {incoming.ticks} times (or one has an open"
            " tick); only states of the same tick can be pooled"
        )
    return incoming
