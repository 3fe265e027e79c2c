"""The one mechanism behind every metric here: decayed sums, ticked, packed for a single collective.

A tick is "multiply every decayed state by ``beta``, then add this tick's sums". Summing such states across
ranks is exact, so a distributed sync is one ``all_gather`` of all states packed into one vector, followed by
a per-state ``dist_reduce_fx`` (:func:`sum_ranks` for every decayed sum).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Callable

import torch
import torch.distributed as dist
from lightning_utilities import apply_to_collection
from torch import Tensor
from torch.nn.modules import module as _nn_module
from torchmetrics import Metric
from torchmetrics.utilities.distributed import gather_all_tensors

from ema_metrics._inputs import shown
from ema_metrics._params import resolve_alpha
from ema_metrics._state_dict import EXTRA_STATE_KEY, load_checked

__all__ = ["DecayedSumMetric", "sum_ranks", "synced_values", "tick"]

_STATE_DTYPE = torch.float64
_EXTRA_STATE_FORMAT = 1
_GROUP_TAG = "instance_tag"


def sum_ranks(stacked: Tensor) -> Tensor:
    """Reduce a state gathered from all ranks, of shape ``(world_size, ...)``, by an exact float64 sum.

    This is the ``dist_reduce_fx`` of every decayed sum. The sum runs in float64 whatever the state's dtype, so
    the reduced value does not depend on the order of the ranks beyond float64 rounding.

    Example:
        >>> import torch
        >>> from ema_metrics import sum_ranks
        >>> sum_ranks(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        tensor([4., 6.])

    """
    return stacked.sum(dim=0, dtype=_STATE_DTYPE).to(stacked.dtype)


def _follow_device(x: Tensor, device: torch.device) -> Tensor:
    return x.to(device=device)


def _distributed_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather_packed(packed: Tensor, group: Any | None) -> Tensor:
    """Gather one 1-D tensor from every rank with a single collective; returns ``(world_size, n)``."""
    world = dist.get_world_size(group)
    out = packed.new_empty((world, packed.numel()))
    dist.all_gather(list(out.unbind(0)), packed, group=group)
    return out


def _gather(packed: Tensor, group: Any | None, dist_sync_fn: Callable[..., Any] | None) -> Tensor:
    if dist_sync_fn is None or dist_sync_fn is gather_all_tensors:
        return _all_gather_packed(packed, group)
    return torch.stack(list(dist_sync_fn(packed, group=group)))


class DecayedSumMetric(Metric):
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
        self._decay_masks: dict[str, Tensor] = {}
        self._never_decayed: set[str] = set()
        self._factor_cache: dict[tuple[str, float], Tensor] = {}
        self._add_group_tag()

    # ------------------------------------------------------------------ call overhead
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call :meth:`forward`, skipping ``nn.Module``'s hook machinery when no hook is registered.

        ``forward`` runs on every training micro-batch, and the generic ``nn.Module.__call__`` costs about as much
        as the whole update. With any hook, or a compiled module, the generic path runs.
        """
        if (
            self._forward_hooks
            or self._forward_pre_hooks
            or self._backward_hooks
            or self._backward_pre_hooks
            or self._compiled_call_impl is not None
            or _nn_module._global_forward_hooks
            or _nn_module._global_forward_pre_hooks
            or _nn_module._global_backward_hooks
            or _nn_module._global_backward_pre_hooks
        ):
            return super().__call__(*args, **kwargs)
        return self.forward(*args, **kwargs)

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """Move the metric (see :meth:`torch.nn.Module.to`); a move to its own device with no dtype is free.

        Lightning calls ``metric.to(device)`` on every ``self.log(name, metric)``, that is on every micro-batch.
        """
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is None and device is not None and device == self.device:
            return self
        return super().to(*args, **kwargs)

    def _wrap_update(self, update: Callable[..., Any]) -> Callable[..., Any]:
        """Count updates and clear the cached value; no grad context, since every input is detached."""

        @functools.wraps(update)
        def wrapped_func(*args: Any, **kwargs: Any) -> None:
            try:
                update(*args, **kwargs)
            except RuntimeError as err:
                raise self._clear_device_error(err) from err
            d = self.__dict__
            d["_computed"] = None
            d["_update_count"] += 1

        return wrapped_func

    def _clear_device_error(self, err: RuntimeError) -> RuntimeError:
        """A device mismatch raised by an update, reworded to say what to do (the state is unchanged)."""
        if "Expected all tensors to be on" not in str(err) and "device" not in str(err):
            return err
        return RuntimeError(
            f"{type(self).__name__}: the input is on another device than the metric ({self.device}). Move the"
            f" metric with `.to(device)`, or pass the input on {self.device}. The state is unchanged. ({err})"
        )

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

    # ------------------------------------------------------------------ states
    def _add_decayed_state(self, name: str, default: Tensor, decay_mask: Tensor | None = None) -> None:
        """Register a float64 state that is decayed every tick (``decay_mask`` picks the decayed entries)."""
        self.add_state(name, default.to(_STATE_DTYPE), dist_reduce_fx=sum_ranks, persistent=True)
        mask = torch.ones_like(default, dtype=torch.bool) if decay_mask is None else decay_mask.to(torch.bool)
        self._decay_masks[name] = mask
        if not bool(mask.any()):  # a counter: synced, saved and packed with the states, but never scaled
            self._never_decayed.add(name)

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

    def _scale_decayed_(self, factor: float) -> None:
        for name in self._decay_masks:
            if name not in self._never_decayed:
                getattr(self, name).mul_(self._factor(name, factor))

    # ------------------------------------------------------------------ compute groups
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

    def _apply(self, fn: Any, exclude_state: Any = "") -> torch.nn.Module:
        """Apply ``fn`` as torchmetrics does, but keep the cached values' dtype and the group tag's NaN.

        torchmetrics converts the cached ``compute``/``forward`` values with ``fn``: a move to half precision would make
        ``compute`` return a rounded cache. They only follow the device here, like the float64 states.
        """
        excluded = (exclude_state,) if isinstance(exclude_state, str) else tuple(exclude_state)
        cached = {key: self.__dict__.get(key) for key in ("_computed", "_forward_cache")}
        this = super()._apply(fn, (*excluded, _GROUP_TAG))
        if isinstance(this, DecayedSumMetric):
            for key, value in cached.items():
                if value is not None:
                    setattr(this, key, apply_to_collection(value, Tensor, _follow_device, this.device))
            if _GROUP_TAG not in excluded:
                tag = torch.tensor(math.nan, dtype=_STATE_DTYPE, device=this.device)
                setattr(this, _GROUP_TAG, tag)
                this._defaults[_GROUP_TAG] = tag.clone()
        return this

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

    def begin_tick(self) -> None:
        """Open a tick: every update until :meth:`end_tick` pools into this one tick.

        Raises:
            RuntimeError: If a tick is already open.

        """
        if self._in_tick:
            raise RuntimeError(f"{type(self).__name__}.begin_tick() was called while a tick is already open")
        self._in_tick = True
        self._tick_decayed = False

    def end_tick(self) -> None:
        """Close the open tick. A tick that received no update still decays, so all ranks stay in step.

        Raises:
            RuntimeError: If no tick is open.

        """
        if not self._in_tick:
            raise RuntimeError(f"{type(self).__name__}.end_tick() was called without an open tick")
        if not self._tick_decayed and self._ticks > 0:
            self._scale_decayed_(self.beta)
        self._in_tick = False
        self._tick_decayed = False
        self._close_tick()
        self._computed = None

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

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the per-device caches (they are rebuilt on first use)."""
        state = super().__getstate__()
        state.pop("_hot", None)
        state["_factor_cache"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle with private copies of the states.

        ``torch.multiprocessing`` (``ddp_spawn``, ``mp.spawn``) unpickles tensors into memory *shared* with the
        parent and the sibling processes. The states are updated in place, so each process must own its copy.
        """
        super().__setstate__(state)
        self.__dict__.setdefault("_hot", None)
        for name, default in self._defaults.items():
            if isinstance(default, Tensor):
                self._defaults[name] = default.clone()
                setattr(self, name, getattr(self, name).clone())

    # ------------------------------------------------------------------ reset / persistence
    def reset(self) -> None:
        """Reset the states, the tick count and the deferred checks to their initial values."""
        super().reset()
        self._ticks = 0
        self._tick_decayed = False
        self._reset_counters()

    def _reset_counters(self) -> None:
        """Reset Python-side counters of subclasses (hook)."""

    def _extra_counters(self) -> dict[str, int]:
        """Python-side counters saved with the state and summed across ranks (hook)."""
        return {}

    def _set_extra_counters(self, counters: dict[str, int]) -> None:
        """Restore the counters of :meth:`_extra_counters` (hook)."""

    def get_extra_state(self) -> dict[str, Any]:
        """Tick count and counters, saved in ``state_dict`` next to the tensor states."""
        # While synced (inside `sync_context`) the states are the pooled ones: save the pooled counters with them.
        counters = self._counters_for_compute()
        return {"format": _EXTRA_STATE_FORMAT, "ticks": self._ticks, "alpha": self._alpha, **counters}

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
        self._ticks = int(state.get("ticks", 0))
        self._update_count = max(self._update_count, self._ticks)
        self._set_extra_counters({k: int(v) for k, v in state.items() if k not in ("format", "ticks", "alpha")})

    def _optional_states(self) -> tuple[str, ...]:
        """States that a state dict may lack (added in a later version); they keep their value (hook)."""
        return ()

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
        # The compute-group tag is never loaded (a state dict from `persistent(True)` may hold one).
        state_dict.pop(prefix + _GROUP_TAG, None)

        def load() -> None:
            super(DecayedSumMetric, self)._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )

        load_checked(self, state_dict, prefix, load, missing_keys, error_msgs)
        self._computed = None

    # ------------------------------------------------------------------ distributed
    def _state_names(self) -> list[str]:
        """The states that are synced, packed and restored: the decayed ones."""
        return list(self._decay_masks)

    def _pack(self) -> Tensor:
        """All states and counters of this rank as one float64 vector."""
        parts = [getattr(self, name).reshape(-1).to(_STATE_DTYPE) for name in self._state_names()]
        counters = [float(self._ticks), *map(float, self._extra_counters().values())]
        parts.append(torch.tensor(counters, dtype=_STATE_DTYPE, device=parts[0].device))
        return torch.cat(parts)

    def _packed_size(self) -> int:
        return sum(int(getattr(self, n).numel()) for n in self._state_names()) + 1 + len(self._extra_counters())

    def _ticks_index(self) -> int:
        """Position of the tick count in :meth:`_pack`'s vector."""
        return sum(int(getattr(self, n).numel()) for n in self._state_names())

    def _load_packed(self, row: Tensor) -> None:
        """Set this rank's states and counters from one vector laid out as :meth:`_pack` makes it."""
        offset = 0
        for name in self._state_names():
            local = getattr(self, name)
            size = local.numel()
            value = row[offset : offset + size].reshape(local.shape).to(device=local.device, dtype=local.dtype)
            setattr(self, name, value.clone())
            offset += size
        rest = row[offset:].tolist()
        self._ticks = int(rest[0])
        self._set_extra_counters({n: int(v) for n, v in zip(self._extra_counters(), rest[1:], strict=True)})
        self._update_count = max(self._update_count, self._ticks)
        self._computed = None

    def _unpack_reduced(self, gathered: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        """Split ``(world_size, n)`` gathered vectors into reduced states and the per-rank counters."""
        out: dict[str, Tensor] = {}
        offset = 0
        for name in self._state_names():
            local = getattr(self, name)
            size = local.numel()
            stacked = gathered[:, offset : offset + size].reshape(gathered.shape[0], *local.shape).to(local.dtype)
            reduce_fx = self._reductions[name]
            out[name] = reduce_fx(stacked) if callable(reduce_fx) else stacked
            offset += size
        return out, gathered[:, offset:]

    def _apply_counters(self, counters: Tensor) -> None:
        """Check that every rank ticked the same number of times and keep the summed counters for compute."""
        ticks = counters[:, 0].tolist()
        if len(set(ticks)) > 1:
            raise RuntimeError(
                f"{type(self).__name__}: ranks ticked different numbers of times ({[int(t) for t in ticks]}); the"
                " decayed sums of the ranks cannot be added. Every rank must call update/forward (or"
                " begin_tick/end_tick) the same number of times; pass weight=0 on a rank without data."
            )
        names = list(self._extra_counters())
        summed = counters[:, 1:].sum(dim=0).tolist()
        self._synced_counters: dict[str, int] | None = {name: int(v) for name, v in zip(names, summed, strict=True)}

    def _sync_dist(
        self, dist_sync_fn: Callable[..., Any] = gather_all_tensors, process_group: Any | None = None
    ) -> None:
        """Sync all states with **one** collective: pack, gather, reduce each state with its ``dist_reduce_fx``."""
        group = process_group or self.process_group
        gathered = _gather(self._pack(), group, dist_sync_fn)
        reduced, counters = self._unpack_reduced(gathered)
        # Check the tick counts before touching the states: a failed sync must leave the local states as they were
        # (torchmetrics only restores them on `unsync`, which does not run when the sync raises).
        self._apply_counters(counters)
        for name, value in reduced.items():
            setattr(self, name, value)

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

    def _value_from_states(self, states: dict[str, Tensor]) -> Tensor:
        """The metric value computed from (reduced) states, without touching the local states (hook)."""
        raise NotImplementedError

    def _synced_forward_value(self) -> Tensor:
        return synced_values([self], self.process_group)[0]


def synced_values(metrics: Sequence[DecayedSumMetric], process_group: Any | None = None) -> list[Tensor]:
    """Values of several metrics synced across ranks with **one** collective for all of them.

    Every rank must call this with the same metrics in the same order. The local states are left untouched. Without
    an initialised process group (or with a world of one) no collective is issued and the local values come back.

    Args:
        metrics: the metrics to sync.
        process_group: the group to sync over (default: the whole world).

    Returns:
        The synced value of each metric, in order.

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
    _check_metric_sequence(metrics)
    if not metrics:
        return []
    if not _distributed_ready():
        return [m._value_from_states({n: getattr(m, n) for n in m._state_names()}) for m in metrics]
    packed = torch.cat([m._pack() for m in metrics])
    gathered = _gather(packed, process_group, metrics[0].dist_sync_fn)
    values = []
    offset = 0
    for m in metrics:
        size = m._packed_size()
        reduced, _ = m._unpack_reduced(gathered[:, offset : offset + size])
        values.append(m._value_from_states(reduced))
        offset += size
    return values


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


@contextmanager
def tick(*metrics: DecayedSumMetric | torch.nn.Module) -> Iterator[list[DecayedSumMetric]]:
    """Group the updates of several metrics (or of every EMA metric inside modules) into one tick each.

    Args:
        metrics: metrics, or modules whose EMA metrics (nested submodules included) should tick together.

    Raises:
        TypeError: If an argument is neither an EMA metric nor a module (a plain torchmetrics metric included).
        RuntimeError: If the tick of one of the metrics is already open; then no tick is opened.

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
    opened: list[DecayedSumMetric] = []
    try:
        for m in found:
            m.begin_tick()
            opened.append(m)
        yield found
    finally:
        for m in opened:
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
