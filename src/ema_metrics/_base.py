"""``DecayedSumMetric``: the base class of metrics whose states are exponentially decayed sums.

A tick is "multiply every decayed state by ``beta``, then add this tick's sums" (:mod:`ema_metrics._decay`, the one
place where that happens). Summing such states across ranks is exact once their scales are aligned, which every sync
does in one place (:mod:`ema_metrics._sync`). This class holds the tick API, the decayed states and their scale; the
rest of the torchmetrics contract comes from mixins: the compute-group guard, dtype moves and pickling
(:mod:`ema_metrics._contract`), persistence (:mod:`ema_metrics._state_dict`), the sync and ``merge_state``
(:mod:`ema_metrics._pooling`). The interface with the Lightning callback is :mod:`ema_metrics._rank_state`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ema_metrics import _decay
from ema_metrics._contract import _SCALE, _STATE_DTYPE, MetricContract
from ema_metrics._fast import FastCalls
from ema_metrics._params import resolve_alpha
from ema_metrics._pooling import Pooling
from ema_metrics._state_dict import Persistence

__all__ = ["DecayedSumMetric"]


def _distributed_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class DecayedSumMetric(Pooling, Persistence, MetricContract, FastCalls):
    """Base class: states that are exponentially decayed sums, advanced one *tick* at a time.

    Subclasses register their decayed states with :meth:`_add_decayed_state` and apply a tick's sums in
    ``update``, calling :meth:`_tick_decay` first to learn whether this update must decay the states. Grouping
    several updates into one tick (for gradient accumulation) is :meth:`tick`, or :meth:`begin_tick` /
    :meth:`end_tick`.

    ``adjust=False`` is implemented as "the first tick has been observed forever": when the first tick closes,
    its sums are multiplied by ``1 / alpha`` (the sum of ``beta ** k`` over all ``k >= 0``). With unit weights
    this is pandas ``ewm(adjust=False)``, and it stays a linear function of the states, so it is still exact
    across ranks.
    """

    full_state_update: bool = False
    is_differentiable: bool = False
    scale: Tensor

    def __init__(
        self,
        alpha: float | None = None,
        *,
        half_life: float | None = None,
        span: float | None = None,
        com: float | None = None,
        adjust: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._alpha = resolve_alpha(alpha, half_life=half_life, span=span, com=com)
        if not isinstance(adjust, bool):
            raise TypeError(f"Expected argument `adjust` to be a bool, but got {adjust!r}")
        self.adjust = adjust
        self.sync_on_forward: bool | None = None
        self._ticks = 0
        self._in_tick = False
        self._tick_decayed = False
        # True while the states hold the pooled state of every rank, identical on each (loaded from a checkpoint
        # written by the Lightning callback, or after a fit): a sync then counts it once, and the first tick keeps it
        # on rank 0 only (see `_dereplicate`).
        self._replica = False
        self._decay_masks: dict[str, Tensor] = {}
        self._never_decayed: set[str] = set()
        self._all_decayed: set[str] = set()  # states whose every entry decays: no mask needed
        self._factor_cache: dict[tuple[str, float], Tensor] = {}
        self._renorm_every = _decay.renorm_interval(self.beta)
        self._decay = _decay.factor(self.beta)  # what the stored states decay by (see _decay.factor)
        self._renorm_at = self._renorm_every
        self._add_group_tag()
        # the power-of-two exponent of the decayed states (see ema_metrics._decay); pooled by aligning, not summing
        self.add_state(_SCALE, torch.zeros((), dtype=_STATE_DTYPE), dist_reduce_fx=None, persistent=True)

    # ------------------------------------------------------------------ parametrisation
    @property
    def alpha(self) -> float:
        """The resolved smoothing factor ``alpha`` in ``(0, 1]`` (read-only)."""
        return self._alpha

    @property
    def beta(self) -> float:
        """The decay per tick, ``1 - alpha`` (read-only)."""
        return 1.0 - self._alpha

    @property
    def ticks(self) -> int:
        """Number of completed ticks since construction or the last :meth:`reset`."""
        return self._ticks

    # ------------------------------------------------------------------ decayed states
    def _add_decayed_state(self, name: str, default: Tensor, decay_mask: Tensor | None = None) -> None:
        """Register a float64 state that is decayed every tick (``decay_mask`` picks the decayed entries)."""
        self.add_state(name, default.to(_STATE_DTYPE), dist_reduce_fx="sum", persistent=True)
        mask = torch.ones_like(default, dtype=torch.bool) if decay_mask is None else decay_mask.to(torch.bool)
        self._decay_masks[name] = mask
        if not bool(mask.any()):  # a counter: synced, saved and packed with the states, but never scaled
            self._never_decayed.add(name)
        if bool(mask.all()):
            self._all_decayed.add(name)

    def _factor(self, name: str, factor: float) -> Tensor:
        """Per-entry multiplier: ``factor`` on decayed entries, 1 elsewhere (cached per device)."""
        state = getattr(self, name)
        key = (name, factor)
        cached = self._factor_cache.get(key)
        if cached is None or cached.device != state.device:
            mask = self._decay_masks[name].to(state.device)
            # masked_fill_ writes the Python float in the state's dtype; torch.where(mask, factor, 1.0) would
            # round `factor` to float32 (the default dtype) first.
            cached = torch.ones(mask.shape, dtype=state.dtype, device=state.device).masked_fill_(mask, factor)
            self._factor_cache[key] = cached
        return cached

    def _masks(self) -> list[Tensor | None]:
        """The decay mask of each state on its device (``None`` where every entry decays; cached)."""
        out: list[Tensor | None] = []
        for name in self._state_names():
            if name in self._all_decayed:
                out.append(None)
                continue
            key = (name, math.nan)  # the cache of factors, keyed apart from any factor
            device = getattr(self, name).device
            cached = self._factor_cache.get(key)
            if cached is None or cached.device != device:
                cached = self._decay_masks[name].to(device)
                self._factor_cache[key] = cached
            out.append(cached)
        return out

    def _scale_decayed_(self, factor: float) -> None:
        for name in self._decay_masks:
            if name not in self._never_decayed:  # a counter: never scaled
                _decay.decay_(getattr(self, name), self._factor(name, factor))

    def _decay_add_(self, name: str, increment: Tensor, decay: bool) -> None:
        """Decay state ``name`` (if ``decay``) and add ``increment`` to it, in one fused operation."""
        _decay.decay_add_(getattr(self, name), increment, self._factor(name, self._decay if decay else 1.0))

    def _renormalize(self) -> None:
        """Keep the decayed states of a metric without data from underflowing (see :mod:`ema_metrics._decay`)."""
        _decay.renormalize_([getattr(self, n) for n in self._state_names()], self._masks(), self.scale)
        self.__dict__["_renorm_at"] = self._ticks + self._renorm_every

    def _effective_scale(self) -> Tensor:
        """The exponent this rank's stored states are at (0 once data arrived, -inf when empty)."""
        return _decay.effective_scale([getattr(self, n) for n in self._state_names()], self._masks(), self.scale)

    def _canonical(self, states: dict[str, Tensor], scale: Tensor) -> None:
        """Put pooled ``(states, scale)`` in the form the stored states keep (in place)."""
        _decay.canonical_([states[n] for n in self._state_names()], self._masks(), scale)

    def _state_names(self) -> list[str]:
        """The states that are decayed, synced and restored."""
        return list(self._decay_masks)

    # ------------------------------------------------------------------ ticks
    def _tick_decay(self) -> bool:
        """Whether the update about to be applied must decay the states first (and mark it done)."""
        if not self._in_tick:
            return True
        if self._tick_decayed:
            return False
        self.__dict__["_tick_decayed"] = True
        return True

    def _tick_done(self) -> None:
        """Close the tick of an update made outside a group (call after applying it)."""
        if not self._in_tick:
            self._close_tick()

    def _close_tick(self) -> None:
        d = self.__dict__
        if d["_ticks"] == 0 and not self.adjust:
            self._scale_decayed_(1.0 / self._alpha)
        d["_ticks"] += 1
        if d["_ticks"] >= d["_renorm_at"]:
            self._renormalize()

    def begin_tick(self) -> None:
        """Open a tick: every update until :meth:`end_tick` pools into this one tick.

        Raises:
            RuntimeError: If a tick is already open.

        """
        if self._in_tick:
            raise RuntimeError(f"{type(self).__name__}.begin_tick() was called while a tick is already open")
        if self._replica:
            self._dereplicate()
        d = self.__dict__  # plain flags: skip nn.Module.__setattr__, as the hot path does (it runs every step)
        d["_in_tick"], d["_tick_decayed"] = True, False

    def end_tick(self) -> None:
        """Close the open tick. A tick that received no update still decays, so all ranks stay in step.

        Raises:
            RuntimeError: If no tick is open.

        """
        if not self._in_tick:
            raise RuntimeError(f"{type(self).__name__}.end_tick() was called without an open tick")
        if not self._tick_decayed and self._ticks > 0:
            self._scale_decayed_(self._decay)
        d = self.__dict__
        d["_in_tick"], d["_tick_decayed"] = False, False
        self._close_tick()
        d["_computed"] = None

    @property
    def in_tick(self) -> bool:
        """Whether a grouped tick is open."""
        return self._in_tick

    @contextmanager
    def tick(self) -> Iterator[DecayedSumMetric]:
        """Group every update made inside the ``with`` block into one tick.

        Use it for gradient accumulation: all micro-batches of one optimizer step become one observation time, so
        the smoothing is measured in optimizer steps. The tick closes even if the block raises.

        Example:
            >>> from ema_metrics import EMAMetric
            >>> ema = EMAMetric(alpha=0.5)
            >>> for step, micro_batches in enumerate([[1.0, 3.0], [6.0, 6.0]]):
            ...     with ema.tick():
            ...         for loss in micro_batches:
            ...             ema.update(loss)
            ...     print(f"{step=} value={ema.compute():.4f} ticks={ema.ticks}")
            step=0 value=2.0000 ticks=1
            step=1 value=4.6667 ticks=2

        """
        self.begin_tick()
        try:
            yield self
        finally:
            self.end_tick()

    # ------------------------------------------------------------------ plotting
    def plot(self, val: Any = None, ax: Any = None) -> Any:
        """Plot one value, or a sequence of values such as the smoothed trajectory that ``forward`` returned.

        Args:
            val: a result of ``forward`` or ``compute``, or a sequence of them; by default ``compute()``.
            ax: a matplotlib axis to draw on; by default a new figure.

        Returns:
            The figure and the axis.

        Raises:
            ModuleNotFoundError: If matplotlib is not installed.

        Example:
            >>> from ema_metrics import EMAMetric
            >>> ema = EMAMetric(alpha=0.3)
            >>> trajectory = [ema(loss) for loss in (4.0, 2.0, 3.0, 1.0, 1.5)]
            >>> fig, ax = ema.plot(trajectory)
            >>> [round(float(v), 4) for v in ax.lines[0].get_ydata()]
            [4.0, 2.8235, 2.9041, 2.1524, 1.9171]

        """
        return self._plot(val, ax)

    # ------------------------------------------------------------------ reset
    def reset(self) -> None:
        """Reset the states, the tick count and the deferred checks to their initial values."""
        super().reset()
        self._ticks = 0
        self._tick_decayed = False
        self._replica = False
        self._renorm_at = self._renorm_every
        self._reset_counters()

    def _dereplicate(self) -> None:
        """Before the first tick on a pooled replica, keep the pooled state on rank 0 only (the others start at 0).

        Every rank holds the same pooled state; summed across ranks it would count ``world_size`` times. The tick
        count is kept everywhere, so the ranks stay in step.
        """
        self.__dict__["_replica"] = False
        group = self.process_group
        rank = dist.get_rank(group) if _distributed_ready() else 0
        if rank != 0:
            for name in self._state_names():
                getattr(self, name).zero_()
            self.scale.zero_()
            self._set_extra_counters({name: 0 for name in self._extra_counters()})
        self._computed = None
