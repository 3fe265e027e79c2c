"""``DecayedSumMetric``: the base class of metrics whose states are exponentially decayed sums, whole.

A tick is "multiply every decayed state by ``beta``, then add this tick's sums" (:mod:`ema_metrics.utilities.decay`,
the one place where that happens). Summing such states across ranks is exact once their scales are aligned, which
every sync does in one place (:mod:`ema_metrics._sync`), reading the metric through :meth:`~DecayedSumMetric.sync_state`
only. This class holds, in order: the tick API and the decayed states with their scale; the torchmetrics contract
(compute groups, dtype moves, pickling); persistence (the extra state, checked state-dict loading); pooling
(torchmetrics' sync hooks, the synced ``forward``, ``merge_state``, and the sync interface).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning_utilities import apply_to_collection
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import _squeeze_if_scalar
from torchmetrics.utilities.distributed import gather_all_tensors
from torchmetrics.utilities.prints import rank_zero_warn

from ema_metrics import _sync
from ema_metrics._fast import FastCalls, compiling, run_eagerly
from ema_metrics.utilities import decay
from ema_metrics.utilities.checks import EXTRA_STATE_KEY, extra_state_errors, state_errors
from ema_metrics.utilities.params import resolve_alpha

__all__ = ["DecayedSumMetric"]

_STATE_DTYPE = torch.float64
_GROUP_TAG = "instance_tag"
_SCALE = "scale"
_EXTRA_STATE_FORMAT = 2


def _follow_device(x: Tensor, device: torch.device) -> Tensor:
    return x.to(device=device)


def _storage(x: Tensor) -> int:
    """Where the memory of ``x`` starts (shared by its views)."""
    return int(x.untyped_storage().data_ptr())


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on the current stream of ``device`` (never for a CPU or meta device)."""
    return device.type == "cuda" and bool(torch.cuda.is_current_stream_capturing())


class DecayedSumMetric(FastCalls):
    """Base class: states that are exponentially decayed sums, advanced one *tick* at a time.

    Subclasses register their decayed states with :meth:`_add_decayed_state` and apply a tick's sums in
    ``update``, calling :meth:`_tick_decay` first to learn whether this update must decay the states. Grouping
    several updates into one tick (for gradient accumulation) is :meth:`tick`, or :meth:`begin_tick` /
    :meth:`end_tick`.

    ``adjust=False`` is implemented as "the first tick has been observed forever": when the first tick closes,
    its sums are multiplied by ``1 / alpha`` (the sum of ``beta ** k`` over all ``k >= 0``). With unit weights
    this is pandas ``ewm(adjust=False)``, and it stays a linear function of the states, so it is still exact
    across ranks.

    Subclasses implement ``_value_from_states`` (the value of given states) and may extend the hooks
    ``_sync_config``, ``_check_states``, ``_extra_counters`` / ``_set_extra_counters`` / ``_reset_counters`` and
    ``_optional_states``.
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
        self._synced_counters: dict[str, int] | None = None
        self._synced_known: _sync.Pooled | None = None  # what the last sync read on the host (see compute)
        self._decay_masks: dict[str, Tensor] = {}
        self._never_decayed: set[str] = set()
        self._all_decayed: set[str] = set()  # states whose every entry decays: no mask needed
        self._count_positions: tuple[int, ...] = ()  # flat positions of the never-decayed entries (counts)
        self._factor_cache: dict[tuple[str, float], Tensor] = {}
        self._renorm_every = decay.renorm_interval(self.beta)
        self._decay = decay.factor(self.beta)  # what the stored states decay by (see decay.factor)
        self._renorm_at = self._renorm_every
        self._add_group_tag()
        # the power-of-two exponent of the decayed states (see ema_metrics.utilities.decay); aligned, not summed
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
        offset = sum(getattr(self, n).numel() for n in self._decay_masks)
        self.add_state(name, default.to(_STATE_DTYPE), dist_reduce_fx="sum", persistent=True)
        mask = torch.ones_like(default, dtype=torch.bool) if decay_mask is None else decay_mask.to(torch.bool)
        self._decay_masks[name] = mask
        counts = [offset + i for i, decays in enumerate(mask.reshape(-1).tolist()) if not decays]
        self._count_positions = (*self._count_positions, *counts)
        if not bool(mask.any()):  # a counter: synced, saved and packed with the states, but never scaled
            self._never_decayed.add(name)
        if bool(mask.all()):
            self._all_decayed.add(name)

    def _factor(self, name: str, factor: float) -> Tensor:
        """The multiplier of a tick: ``factor`` on decayed entries, 1 elsewhere (cached per device).

        A 0-d tensor for a state whose every entry decays: the fused decay-add then reads the state and the increment,
        not a third tensor of the state's size as well (an 8 MB state: 0.27 ms against 0.51 ms on one CPU core, the
        same result to the bit).
        """
        state = getattr(self, name)
        key = (name, factor)
        cached = self._factor_cache.get(key)
        if cached is None or cached.device != state.device:
            if name in self._all_decayed:  # a fill kernel: no copy of host data
                cached = torch.full((), factor, dtype=state.dtype, device=state.device)
                self._factor_cache[key] = cached
                return cached
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
                decay.decay_(getattr(self, name), self._factor(name, factor))

    def _decay_add_(self, name: str, increment: Tensor, decays: bool) -> None:
        """Decay state ``name`` (if ``decays``) and add ``increment`` to it, in one fused operation."""
        decay.decay_add_(getattr(self, name), increment, self._factor(name, self._decay if decays else 1.0))

    def _renormalize(self) -> None:
        """Keep the decayed states of a metric without data from underflowing (see :mod:`~.utilities.decay`)."""
        decay.renormalize_([getattr(self, n) for n in self._state_names()], self._masks(), self.scale)
        self.__dict__["_renorm_at"] = self._ticks + self._renorm_every

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
        if compiling():
            return run_eagerly(self.begin_tick)  # type: ignore[no-any-return]
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
        if compiling():
            return run_eagerly(self.end_tick)  # type: ignore[no-any-return]
        if not self._in_tick:
            raise RuntimeError(f"{type(self).__name__}.end_tick() was called without an open tick")
        self._refuse_capture("end_tick")
        if not self._tick_decayed and self._ticks > 0:
            self._scale_decayed_(self._decay)
        d = self.__dict__
        d["_in_tick"], d["_tick_decayed"] = False, False
        self._close_tick()
        d["_computed"] = None

    def _refuse_capture(self, call: str) -> None:
        """Raise if a CUDA graph is being captured: the Python tick count and counters would not advance on replay."""
        if capturing(self.scale.device):
            raise RuntimeError(
                f"{type(self).__name__}.{call} cannot be captured in a CUDA graph: its tick count and counters are"
                " Python numbers, which a replay would not advance. Call it outside the captured region."
            )

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
        if _sync.rank(self.process_group) != 0:
            for name in self._state_names():
                getattr(self, name).zero_()
            self.scale.zero_()
            self._set_extra_counters({name: 0 for name in self._extra_counters()})
        self._computed = None

    # ------------------------------------------------------------------ hooks of subclasses
    def _value_from_states(
        self,
        states: dict[str, Tensor],
        counters: dict[str, int] | None = None,
        check: bool = False,
        known: _sync.Pooled | None = None,
    ) -> Any:
        """The value computed from (pooled) states, without touching the local states (hook).

        With ``check``, the deferred checks run on ``counters`` (rejected updates, non-finite values). ``known`` is
        what a sync already read of these states on the host (``values``, or ``finite`` and ``counts``): the checks
        use it instead of reading the states back again.
        """
        raise NotImplementedError

    def _sync_config(self) -> tuple[Any, ...]:
        """What must agree between ranks besides the class and the state layout (hook; extend in subclasses)."""
        return (repr(self._alpha), self.adjust)

    def _check_states(self, states: dict[str, Tensor]) -> str | None:
        """What is wrong with these (loaded) states, or ``None`` (hook: e.g. a negative summed weight)."""
        return None

    def _reset_counters(self) -> None:
        """Reset Python-side counters of subclasses (hook)."""

    def _extra_counters(self) -> dict[str, int]:
        """Python-side counters saved with the state and summed across ranks (hook)."""
        return {}

    def _set_extra_counters(self, counters: dict[str, int]) -> None:
        """Restore the counters of :meth:`_extra_counters` (hook)."""

    def _optional_states(self) -> tuple[str, ...]:
        """States that a state dict may lack (added in a later version); they keep their value (hook)."""
        return ()

    # ------------------------------------------------------------------ torchmetrics contract: compute groups
    def _add_group_tag(self) -> None:
        """Register the first state: a NaN, so that this metric is never merged into a compute group.

        torchmetrics' ``MetricCollection`` merges metrics whose states are all ``allclose`` after the first update into
        one compute group: they would share one state tensor but not the tick count, and a tick would decay it once per
        member (and two EMAs of different alpha hold equal sums after one tick). ``allclose`` is False for NaN in
        every floating dtype, so no clone, copy, dtype move, loaded state dict or number of instances can make two EMA
        metrics equal. Being registered first, it ends the comparison at once. It is never synced, decayed, saved,
        loaded or converted to another dtype (it only follows the device).
        """
        self.add_state(_GROUP_TAG, torch.tensor(math.nan, dtype=_STATE_DTYPE), persistent=False)

    def persistent(self, mode: bool = False) -> None:
        """Change whether the states are saved in ``state_dict`` (the compute-group tag never is)."""
        super().persistent(mode)
        self._persistent[_GROUP_TAG] = False

    # ------------------------------------------------------------------ torchmetrics contract: dtype and device moves
    def _apply(self, fn: Any, exclude_state: Any = "") -> torch.nn.Module:
        """Apply ``fn`` as torchmetrics does, except to what must stay float64 and only follows the device.

        The decayed states and the scale exponent accumulate in float64 whatever ``set_dtype`` or ``.to(dtype)`` asks
        for (a round trip through half precision would round them), the group tag keeps its NaN, and the cached
        ``compute``/``forward`` values are not rounded either (torchmetrics converts them with ``fn``).
        """
        excluded = (exclude_state,) if isinstance(exclude_state, str) else tuple(exclude_state)
        cached = {key: self.__dict__.get(key) for key in ("_computed", "_forward_cache")}
        own = (*self.__dict__.get("_decay_masks", {}), _SCALE, _GROUP_TAG)
        this = super()._apply(fn, (*excluded, *own))
        if isinstance(this, DecayedSumMetric):
            for key, value in cached.items():
                if value is not None:
                    setattr(this, key, apply_to_collection(value, Tensor, _follow_device, this.device))
            for name in own:
                if name in excluded or name not in this._defaults:
                    continue
                if name == _GROUP_TAG:
                    value = torch.full((), math.nan, dtype=_STATE_DTYPE, device=this.device)
                else:
                    value = getattr(this, name).to(device=this.device)
                setattr(this, name, value)
                default = this._defaults[name]
                if isinstance(default, Tensor):
                    this._defaults[name] = default.to(device=this.device)
            # the decay masks follow the states, so that no later tick copies them from the host
            this._decay_masks = {n: m.to(this.device) for n, m in this._decay_masks.items()}
            this._factor_cache.clear()
        return this

    # ------------------------------------------------------------------ torchmetrics contract: pickling
    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the per-device caches (they are rebuilt on first use)."""
        state = super().__getstate__()
        state["_factor_cache"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle with private copies of the states.

        ``torch.multiprocessing`` (``ddp_spawn``, ``mp.spawn``) unpickles tensors into memory *shared* with the
        parent and the sibling processes. The states are updated in place, so each process must own its copy.
        """
        super().__setstate__(state)
        for name, default in self._defaults.items():
            if isinstance(default, Tensor):
                self._defaults[name] = default.clone()
                setattr(self, name, getattr(self, name).clone())

    # ------------------------------------------------------------------ persistence
    def get_extra_state(self) -> dict[str, Any]:
        """Tick count, replica flag and counters, saved in ``state_dict`` next to the tensor states."""
        # While synced (inside `sync_context`) the states are the pooled ones: save the pooled counters with them.
        counters = self._counters_for_compute()
        return {
            "format": _EXTRA_STATE_FORMAT,
            "ticks": self._ticks,
            "alpha": self._alpha,
            "replica": self._replica or self._is_synced,
            **counters,
        }

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` saved."""
        if not isinstance(state, dict):
            raise TypeError(f"Expected the extra state of {type(self).__name__} to be a dict, but got {state!r}")
        saved_alpha = state.get("alpha")
        if saved_alpha is not None and not math.isclose(float(saved_alpha), self._alpha, rel_tol=1e-12):
            warnings.warn(
                f"{type(self).__name__}: loading a state saved with alpha={saved_alpha!r} into a metric with"
                f" alpha={self._alpha!r}; the past keeps its decay and the new alpha applies from now on.",
                UserWarning,
                stacklevel=2,
            )
        counters = {k: int(v) for k, v in state.items() if k not in ("format", "ticks", "alpha", "replica")}
        self._set_bookkeeping(int(state.get("ticks", 0)), bool(state.get("replica", False)), counters)

    def _set_bookkeeping(self, ticks: int, replica: bool, counters: dict[str, int]) -> None:
        """The tick count, the replica flag and the counters of a loaded state (the one place that sets them)."""
        d = self.__dict__
        d["_ticks"], d["_replica"] = ticks, replica
        # the renormalization ticks are multiples of the interval, as in a run that never stopped: resuming must not
        # postpone one (a state last renormalized just before the save would decay past the float64 range)
        d["_renorm_at"] = (ticks // self._renorm_every + 1) * self._renorm_every
        d["_update_count"] = max(d["_update_count"], ticks)
        self._set_extra_counters(counters)
        d["_computed"] = None

    def _saves_states(self) -> bool:
        """Whether ``state_dict`` holds the decayed states (see :meth:`torchmetrics.Metric.persistent`)."""
        return any(self._persistent[name] for name in self._state_names())

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        # The tick count and counters travel only with the states they describe: `persistent(False)` saves nothing.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not self._saves_states():
            destination.pop(prefix + EXTRA_STATE_KEY, None)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Check this metric's entries of ``state_dict``, then load them as torchmetrics and torch do.

        Refused entries are reported in ``error_msgs`` the way torch reports them (``load_state_dict`` then raises one
        ``RuntimeError`` listing them all) and nothing is loaded, so a refused state dict leaves the metric as it was.
        Missing states are reported in ``missing_keys`` (torchmetrics does not), except the optional ones; the tick
        count and counters are neither loaded nor reported missing without the states they count (a
        ``persistent(False)`` metric saves none). The compute-group tag is never loaded.
        """
        state_dict.pop(prefix + _GROUP_TAG, None)
        names = self._state_names()
        current = {name: getattr(self, name) for name in names}
        errors = state_errors(state_dict, prefix, current, names)
        errors += extra_state_errors(state_dict, prefix, type(self).__name__, self._extra_counters())
        if errors:
            error_msgs.extend(errors)
            return
        present = [name for name in names if prefix + name in state_dict]
        optional = self._optional_states()
        counted = [name for name in present if name not in optional]
        if not counted:  # counters without the states they count (an older `persistent(False)` state dict)
            state_dict.pop(prefix + EXTRA_STATE_KEY, None)
        # A checkpoint is usually loaded on the CPU: keep each state on the metric's device and dtype.
        for key in self._defaults:
            name = prefix + key
            if name in state_dict and isinstance(state_dict[name], Tensor):
                value = getattr(self, key)
                state_dict[name] = state_dict[name].to(device=value.device, dtype=value.dtype).clone()
        n_missing = len(missing_keys)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        # torchmetrics does not report missing states; torch does (load_state_dict raises under strict=True)
        missing = [prefix + n for n in names if self._persistent[n] and n not in present and n not in optional]
        if not counted:  # the states are reported missing, or are not saved at all: not their counters as well
            missing_keys[n_missing:] = [k for k in missing_keys[n_missing:] if k != prefix + EXTRA_STATE_KEY]
        missing_keys.extend(missing)
        self._computed = None

    # ------------------------------------------------------------------ the sync interface (ema_metrics._sync)
    def sync_state(self) -> _sync.SyncState:
        """What the sync reads of this metric: its decayed states (not copies), masks, scale, ticks and counters.

        This is the whole interface between a metric and :mod:`ema_metrics._sync` (its ``Poolable`` protocol); the
        Lightning callback's checkpoint rows read it too.
        """
        return _sync.SyncState(
            kind=type(self).__qualname__,
            config=self._sync_config(),
            states={n: getattr(self, n) for n in self._state_names()},
            masks=self._masks(),
            scale=self.scale,
            ticks=self._ticks,
            replica=self._replica,
            counters=self._extra_counters(),
            count_positions=self._count_positions,
        )

    def load_sync_state(self, pooled: _sync.Pooled, replica: bool) -> None:
        """Hold ``pooled`` (states, scale, tick count, counters), for example the pooled state of every rank.

        Args:
            pooled: a state of this metric's layout, such as :func:`ema_metrics._sync.pool` returns.
            replica: whether every rank holds this same pooled state (then a sync counts it once, and the first tick
                keeps it on rank 0 only).

        """
        for name, value in pooled.states.items():
            setattr(self, name, value)
        setattr(self, _SCALE, pooled.scale)
        self._set_bookkeeping(pooled.ticks, replica, pooled.counters)

    # ------------------------------------------------------------------ pooling: torchmetrics' sync hooks
    def _copy_state_dict(self) -> dict[str, Any]:
        """The states themselves, not copies: what torchmetrics keeps before a sync, to restore them after it.

        torchmetrics clones every state there, in case the sync changed them in place. No sync of an EMA metric does:
        the pooled states are fresh tensors set in their place, and ``reset`` and ``load_sync_state`` set fresh tensors
        too, so the local states can be kept as they are. That saves a copy of every state (and, for large ones, an
        allocation) per synced ``compute``.
        """
        return {attr: getattr(self, attr) for attr in self._defaults}

    def _wrap_compute(self, compute: Callable[..., Any]) -> Callable[..., Any]:
        """The ``compute`` wrapper of torchmetrics (the cached value, the sync and its undoing), with fewer copies.

        torchmetrics 1.9 clones the value inside the sync (1.4 did not), so that an in-place update of the states
        cannot change it later. A tensor of the value that lives in the pooled states is not copied: they are fresh
        tensors of this sync, dropped when it is undone (for an 8 MB confusion matrix, an 8 MB copy per synced
        ``compute``). Every other tensor is cloned, with every supported torchmetrics: a rank-local value never shares
        the live states.
        """

        @functools.wraps(compute)
        def wrapped_func(*args: Any, **kwargs: Any) -> Any:
            if not self.update_called:
                rank_zero_warn(
                    f"The ``compute`` method of metric {self.__class__.__name__}"
                    " was called before the ``update`` method which may lead to errors,"
                    " as metric states have not yet been updated.",
                    UserWarning,
                )
            if self._computed is not None:
                return self._computed
            with self.sync_context(
                dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync
            ):
                value = _squeeze_if_scalar(compute(*args, **kwargs))
                pooled = self._pooled_storages()
                value = apply_to_collection(value, Tensor, lambda x: x if _storage(x) in pooled else x.clone())
            if self.compute_with_cache:
                self._computed = value
            return value

        return wrapped_func

    def _pooled_storages(self) -> set[int]:
        """Where the pooled states live while a sync is in place that ``compute`` undoes (else nowhere).

        The local states (which the undoing restores) are left out, should a pooled state ever share their memory.
        """
        cache = self._cache
        if not (self._is_synced and self._should_unsync and cache):
            return set()
        local = {_storage(t) for t in cache.values() if isinstance(t, Tensor)}
        return {_storage(getattr(self, name)) for name in self._state_names()} - local

    def _sync_dist(
        self, dist_sync_fn: Callable[..., Any] = gather_all_tensors, process_group: Any | None = None
    ) -> None:
        """Pool the states of all ranks (see :mod:`ema_metrics._sync`: one collective for small states).

        The checks run before any state is touched: a failed sync leaves the local states as they were (torchmetrics
        only restores them on ``unsync``, which does not run when the sync raises).
        """
        (pooled,) = _sync.pool([self], process_group or self.process_group, gather=dist_sync_fn)
        for name, value in pooled.states.items():
            setattr(self, name, value)
        setattr(self, _SCALE, pooled.scale)
        self._synced_counters = pooled.counters
        self._synced_known = pooled

    def unsync(self, should_unsync: bool = True) -> None:
        """Restore the local states after a sync (see :meth:`torchmetrics.Metric.unsync`)."""
        super().unsync(should_unsync)
        if should_unsync:
            self._synced_counters = None
            self._synced_known = None

    def _counters_for_compute(self) -> dict[str, int]:
        synced = self.__dict__.get("_synced_counters")
        return synced if synced is not None and self._is_synced else self._extra_counters()

    def _known_for_compute(self) -> _sync.Pooled | None:
        """What the sync of ``compute`` read on the host, while the states are the synced ones."""
        return self.__dict__.get("_synced_known") if self._is_synced else None

    def _should_sync_forward(self) -> bool:
        flag = self.sync_on_forward
        if flag is None:
            flag = self.dist_sync_on_step
        return bool(flag) and self.distributed_available_fn()

    def _value_of(self, pooled: _sync.Pooled) -> Any:
        """The value of a pooled state, after the checks ``compute`` makes."""
        return self._value_from_states(pooled.states, counters=pooled.counters, check=True, known=pooled)

    def _synced_forward_value(self) -> Any:
        (pooled,) = _sync.pool([self], self.process_group)
        return self._value_of(pooled)

    # ------------------------------------------------------------------ pooling: merge_state
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
        mine, theirs = self.sync_state(), self._merge_source(incoming_state).sync_state()
        rows = torch.stack([_sync.flat(mine), _sync.flat(theirs)])
        scales = torch.stack([mine.effective_scale(), theirs.effective_scale()]).tolist()  # the one read-back
        pooled = _sync.pool_rows(mine, rows, scales, replica=False)
        pooled.ticks = mine.ticks
        pooled.counters = {k: v + theirs.counters[k] for k, v in mine.counters.items()}
        self.load_sync_state(pooled, replica=False)

    def _merge_source(self, incoming: Any) -> DecayedSumMetric:
        """The metric to merge from: ``incoming`` itself, or a copy of this metric loaded with the incoming state."""
        name = type(self).__name__
        if isinstance(incoming, dict):
            other = self.clone()
            other.reset()
            if EXTRA_STATE_KEY not in incoming:
                incoming = {**incoming, EXTRA_STATE_KEY: {"ticks": self.ticks}}
            missing = [n for n in self._state_names() if n not in incoming]
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
        if _sync.fingerprint(incoming) != _sync.fingerprint(self):
            raise ValueError(
                f"{name}.merge_state: the incoming {type(incoming).__name__} differs in class, configuration"
                f" ({incoming._sync_config()} vs {self._sync_config()}) or state layout; only identical EMAs pool"
            )
        if incoming.ticks != self.ticks or incoming.in_tick or self.in_tick:
            raise ValueError(
                f"{name}.merge_state: the two metrics ticked {self.ticks} and {incoming.ticks} times (or one has an"
                " open tick); only states of the same tick can be pooled"
            )
        return incoming
