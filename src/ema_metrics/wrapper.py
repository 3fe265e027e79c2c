"""``EMAWrapper``: an exponential moving average of any torchmetrics metric whose states are sums.

:func:`_check_decayable` accepts only metrics whose every state is a real tensor that starts from zero and is summed
across ranks. The wrapper runs the wrapped metric's ``update`` on zeroed scratch states and its ``compute`` on the
decayed states, keeps it computing in float64 and shows its properties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from lightning_utilities import apply_to_collection
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat, dim_zero_max, dim_zero_mean, dim_zero_min, dim_zero_sum
from torchmetrics.utilities.exceptions import TorchMetricsUserError

from ema_metrics import _sync
from ema_metrics._base import DecayedSumMetric
from ema_metrics.utilities import decay
from ema_metrics.utilities.inputs import NAN_STRATEGIES, check_nan_strategy, check_update_tensors, shown
from ema_metrics.utilities.nonfinite import (
    all_finite,
    any_nonfinite,
    check_states_finite,
    keep_or_zero_,
    report_dropped,
)

__all__ = ["EMAWrapper"]

_F64 = torch.float64
_PREFIX = "decayed_"
_DROPPED = "nonfinite_updates"
_REDUCTION_NAMES: dict[Callable[..., Any], str] = {
    dim_zero_mean: "`mean`",
    dim_zero_max: "`max`",
    dim_zero_min: "`min`",
    dim_zero_cat: "`cat`",
}


class EMAWrapper(DecayedSumMetric):
    r"""Exponential moving average of a torchmetrics metric whose states are sums, such as accuracy, F1 or MSE.

    Each ``update`` (or ``forward``) is one *tick*: every state of the wrapped metric is multiplied by
    :math:`\beta = 1 - \alpha`, then this tick's sums, computed by the wrapped metric's own ``update``, are added.
    ``compute`` is the wrapped metric's own ``compute`` applied to the decayed states. After tick :math:`t`, a state
    holds

    .. math:: S_t = \sum_{i \le t} \beta^{t-i} s_i

    where :math:`s_i` is what tick :math:`i` added to it (for accuracy: the counts of true/false positives/negatives;
    for MSE: the sum of squared errors and the number of observations). So the value is the metric computed on all
    the data seen so far, the data of tick :math:`i` weighted by :math:`\beta^{t-i}`.

    ``adjust`` acts on the states, and what it means depends on the metric's formula:

    - ``adjust=True`` (default): the states are the plain discounted sums above. The debiasing normaliser
      :math:`\sum_{i \le t} \beta^{t-i}` of a debiased average multiplies numerator and denominator alike, so it
      cancels in every metric that is a ratio of its states: accuracy (correct / total), precision, recall, F1,
      MSE and MAE (sum of errors / count), :class:`~torchmetrics.aggregation.MeanMetric` (weighted sum / summed
      weight, identical to :class:`~ema_metrics.EMAMetric` fed the same values and weights), and their macro
      averages (a class counts in a macro average while its decayed counts are not exactly zero). For a metric
      that is not a ratio, such as :class:`~torchmetrics.aggregation.SumMetric`, the value is the discounted sum
      :math:`\sum_{i \le t} \beta^{t-i} s_i` itself: a tick contributing ``c`` every time gives
      :math:`c (1 - \beta^t) / \alpha`. Multiply by ``alpha`` for a per-tick average.
    - ``adjust=False``: pandas ``adjust=False``. The first tick is seeded as if it had been observed forever: when
      it closes, its sums are multiplied by :math:`1 / \alpha = \sum_{k \ge 0} \beta^k`. For a ratio
      :math:`N_t / D_t` of states, tick :math:`t` enters with weight :math:`d_t / D_t` (its share of the decayed
      denominator): :math:`v_t = (1 - d_t / D_t) v_{t-1} + (d_t / D_t) m_t`, with :math:`m_t` the metric of tick
      :math:`t` alone. With the same denominator every tick (a constant batch size) that weight is :math:`\alpha`
      from the first tick on, which is pandas' recursion; with ``adjust=True`` it is the debiased
      :math:`\alpha / (1 - \beta^t)`. For ``SumMetric`` with ``c`` every tick the value is ``c / alpha`` from the
      first tick on. Macro averages apply this per class.

    Use :meth:`tick` (or :func:`ema_metrics.tick`) to pool several updates, such as the micro-batches of one
    optimizer step, into one tick. A tick with no update still decays, so every rank keeps the same tick count.

    The decayed states are float64 (integer counts become fractional once decayed) and are the ones saved in
    ``state_dict``. The wrapped metric is switched to float64 too, so that aggregators do not round their inputs to
    float32; its own syncing and persistence are turned off: ``compute`` syncs the wrapper's states across ranks with
    a single collective, and :func:`ema_metrics.synced_values` syncs it together with other EMA metrics. The wrapped
    metric's ``update`` runs on zeroed scratch states (float64, and int64 for the states that count in integers, as
    they do in the plain metric), and its result is added to the decayed states only once it returned, so an update
    that raises (for example on badly shaped input) leaves the state as it was.

    The wrapper's own work in ``update`` and ``forward`` (its scratch states, the finiteness check, the decay) reads no
    tensor back to the host and copies no host data to the device; the wrapped metric's ``update`` may. Pass
    ``validate_args=False`` to classification metrics, and ``nan_strategy="disable"`` (torchmetrics 1.7 and later) to
    ``SumMetric`` and to an unweighted ``MeanMetric``, to make their updates free of host syncs too. (torchmetrics 1.9
    ignores ``MeanMetric``'s ``weight`` with ``nan_strategy="disable"``; for a weighted mean without host syncs use
    :class:`~ema_metrics.EMAMetric`, which gives the same value.) Multiclass and multilabel stat scores (accuracy,
    precision, recall, F1 with ``top_k=1``) and confusion matrices count with ``torch.bincount``, which on a CUDA device
    reads the largest class back to size its output: one sync per update whatever the wrapper does, unless
    ``torch.use_deterministic_algorithms(True)`` makes torchmetrics count without it. Binary metrics and regression
    metrics such as ``MeanSquaredError`` do not sync.

    Only metrics whose every state is a tensor reduced with ``"sum"`` across ranks and starting from zero can be
    decayed exactly; any other metric is rejected at construction.

    Args:
        metric: the torchmetrics metric to smooth; a freshly constructed (or reset) instance, used by the wrapper
            from now on (do not update it directly).
        alpha: smoothing factor in ``(0, 1]``; pass exactly one of ``alpha``, ``half_life``, ``span``, ``com``.
        half_life: ticks after which a tick's weight halves: ``1 - alpha = 0.5 ** (1 / half_life)``.
        span: pandas span, ``alpha = 2 / (span + 1)``, ``span >= 1``.
        com: centre of mass, ``alpha = 1 / (1 + com)``, ``com >= 0``.
        adjust: plain discounted sums (``True``) or pandas ``adjust=False`` seeding (``False``), see above.
        nan_strategy: what to do with an update whose sums hold a NaN or an inf (from the inputs, or an overflow):

            - ``"warn"`` (default): drop the whole update (its tick still passes, as an empty tick does);
              ``compute`` warns once for each new batch of dropped updates.
            - ``"ignore"``: drop it silently.
            - ``"error"``: drop it, and raise ``RuntimeError`` at ``compute`` (the check cannot run in ``update``
              without a host sync).
            - ``"disable"``: no check; a non-finite sum poisons the average for good.

            The wrapped metric's own ``nan_strategy`` (aggregators have one) applies first, to single values.
        kwargs: torchmetrics ``Metric`` arguments of the wrapper (``dist_sync_on_step``, ``process_group``,
            ``dist_sync_fn``, ...).

    Raises:
        TypeError: If ``metric`` is not a torchmetrics ``Metric``, or is already an EMA metric, or ``nan_strategy``
            is not a string.
        ValueError: If a state of ``metric`` cannot be decayed exactly (a list state, a reduction other than
            ``"sum"``, a non-zero default), if ``metric`` holds other metrics or no state, or was already updated;
            or if the parametrisation is invalid.

    Example:
        The smoothed accuracy follows a drift in the data: first every prediction is right, then every one is wrong.

        >>> import torch
        >>> from torchmetrics.classification import BinaryAccuracy
        >>> from ema_metrics import EMAWrapper
        >>> acc = EMAWrapper(BinaryAccuracy(), half_life=2)
        >>> target = torch.tensor([0, 1, 1, 0])
        >>> for step in range(8):
        ...     preds = target if step < 4 else 1 - target
        ...     value = acc(preds, target)
        ...     print(f"{step=} acc={value:.4f}")
        step=0 acc=1.0000
        step=1 acc=1.0000
        step=2 acc=1.0000
        step=3 acc=1.0000
        step=4 acc=0.6442
        step=5 acc=0.4286
        step=6 acc=0.2909
        step=7 acc=0.2000

        Micro-batches pooled into one tick each, and a sum that is discounted, not averaged:

        >>> from torchmetrics.aggregation import SumMetric
        >>> total = EMAWrapper(SumMetric(), alpha=0.5)
        >>> for step, micro_batches in enumerate([[1.0, 3.0], [2.0, 2.0], [4.0]]):
        ...     with total.tick():
        ...         for x in micro_batches:
        ...             total.update(x)
        ...     print(f"{step=} total={total.compute():.4f} ticks={total.ticks}")
        step=0 total=4.0000 ticks=1
        step=1 total=6.0000 ticks=2
        step=2 total=7.0000 ticks=3

    """

    full_state_update: bool = False
    is_differentiable: bool = False

    def __init__(
        self,
        metric: Metric,
        alpha: float | None = None,
        *,
        half_life: float | None = None,
        span: float | None = None,
        com: float | None = None,
        adjust: bool = True,
        nan_strategy: str = "warn",
        **kwargs: Any,
    ) -> None:
        _check_decayable(metric)
        if not isinstance(nan_strategy, str):
            raise TypeError(
                f"Expected argument `nan_strategy` to be one of {list(NAN_STRATEGIES)} (EMAWrapper smooths sums, it"
                f" cannot impute a value), but got {shown(nan_strategy)}"
            )
        self.nan_strategy = str(check_nan_strategy(nan_strategy))
        super().__init__(alpha, half_life=half_life, span=span, com=com, adjust=adjust, **kwargs)
        # The wrapped metric computes in float64 and never syncs or saves its states itself: they are the
        # wrapper's, pushed into it for each update and compute.
        metric._dtype = _F64
        metric.sync_on_compute = False
        metric._to_sync = False
        metric.dist_sync_on_step = False
        names: dict[str, str] = {}
        integers: set[str] = set()
        for name, default in metric._defaults.items():
            assert isinstance(default, Tensor)  # checked by _check_decayable
            if not default.is_floating_point() and default.dtype != torch.bool:
                integers.add(name)
            zero = torch.zeros_like(default, dtype=_F64)
            self._add_decayed_state(_PREFIX + name, zero)
            metric._defaults[name] = zero.clone()
            metric._persistent[name] = False
            setattr(metric, name, zero.clone())
            names[name] = _PREFIX + name
        # updates dropped for a non-finite sum: synced, saved and reset with the states, never decayed
        self._add_decayed_state(_DROPPED, torch.zeros(()), decay_mask=torch.zeros((), dtype=torch.bool))
        self._drop_nonfinite = self.nan_strategy != "disable"
        self._warned_nonfinite = 0
        self.base_metric = metric
        self._names = names
        self._integer_states = frozenset(integers)  # counted in int64 by the wrapped update (see _Scratch)
        self._scratch: _Scratch | None = None
        self._update_signature = metric._update_signature  # MetricCollection filters kwargs with it
        self._update_names = list(metric._update_signature.parameters)
        if metric.device != self.device:
            self.to(metric.device)

    # ------------------------------------------------------------------ update / forward / compute
    def update(self, *args: Any, **kwargs: Any) -> None:
        """Add one tick (or, inside :meth:`tick`, one part of the open tick).

        If the wrapped metric's ``update`` raises, the states and the tick count are left unchanged.

        Args:
            args: positional arguments of the wrapped metric's ``update``.
            kwargs: keyword arguments of the wrapped metric's ``update``.

        """
        d = self.__dict__
        check_update_tensors(args, kwargs, d.get("_update_names", []))
        self._refuse_capture("update")
        if d["_replica"]:
            self._dereplicate()
        scratch = d["_scratch"]
        if scratch is None:
            scratch = self._build_scratch()
        base = d["_modules"]["base_metric"]
        bd = base.__dict__
        scratch.zero_()
        bd.update(scratch.states)
        base.update(*args, **kwargs)
        # The update succeeded: decay (once per tick) and add this update's sums, one fused operation per state;
        # unless one of them is not finite: then the whole update is dropped, on the device (the tick still passes,
        # as for an empty one), and counted.
        decay = self._tick_decay()
        drop, names = d["_drop_nonfinite"], d["_names"]
        replaced = [(bd[name], buf) for name, buf in scratch.states.items() if bd[name] is not buf]
        keep: Tensor | None = None
        if not drop and replaced:
            sums = {name: bd[name] for name in names}
        elif all(_fits(new, buf) for new, buf in replaced):
            # Sums the wrapped update put in new tensors go back into the flat buffers, to be checked at once.
            for new, buf in replaced:
                buf.copy_(new)
            keep = scratch.sums_(drop)
            sums = scratch.sums
        else:  # a sum of another shape, or a float one for an integer state: checked one by one
            keep = any_nonfinite(bd[name] for name in names).logical_not_().to(_F64)
            sums = {name: keep_or_zero_(bd[name].to(_F64, copy=True), keep) for name in names}
        for name, target in names.items():
            self._decay_add_(target, sums[name], decay)
        if keep is not None:
            self._decay_add_(_DROPPED, 1.0 - keep, decay)
        self._tick_done()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Update, then return the current smoothed value (rank-local unless :attr:`sync_on_forward`).

        Args:
            args: positional arguments of the wrapped metric's ``update``.
            kwargs: keyword arguments of the wrapped metric's ``update``.

        Returns:
            The wrapped metric's ``compute`` on the decayed states.

        Raises:
            TorchMetricsUserError: If the metric is synced (call ``unsync`` first).

        """
        d = self.__dict__
        if d["_is_synced"]:
            raise TorchMetricsUserError(
                "The Metric shouldn't be synced when performing ``forward``. HINT: Did you forget to call ``unsync`` ?."
            )
        self.update(*args, **kwargs)
        if (d["sync_on_forward"] is not None or d["dist_sync_on_step"]) and self._should_sync_forward():
            out = self._synced_forward_value()
        else:
            out = self._value_from_states(self._local_states())
        d["_forward_cache"] = out
        return out

    def compute(self) -> Any:
        """The wrapped metric's ``compute`` on the decayed states, synced across ranks when distributed.

        Raises:
            RuntimeError: If ``nan_strategy="error"`` and an update had non-finite sums.
            OverflowError: If a decayed state overflowed float64 (not with ``nan_strategy="disable"``).

        """
        states = self._local_states()
        if self._drop_nonfinite:
            self._check_nonfinite(states, getattr(self, _DROPPED), self._known_for_compute())
        return self._base_compute(states)

    def _check_nonfinite(self, states: dict[str, Tensor], dropped_state: Tensor, known: _sync.Pooled | None) -> None:
        """Report the dropped updates and refuse overflowed states: from what a sync read, or with one read-back."""
        if known is not None and known.values is not None:
            dropped, finite = known.values[self._count_positions[0]], all(math.isfinite(v) for v in known.values)
        elif known is not None and known.finite is not None and known.counts is not None:
            dropped, finite = known.counts[0], known.finite
        else:
            flags = torch.stack([all_finite(t) for t in states.values()]).to(_F64)
            probe = torch.cat([dropped_state.reshape(1).to(_F64), flags]).tolist()  # the one read-back
            dropped, finite = probe[0], all(probe[1:])
        self._warned_nonfinite = report_dropped(
            type(self).__name__, int(dropped), self.nan_strategy, self._warned_nonfinite
        )
        if not finite:
            check_states_finite(type(self).__name__, states)  # raises, naming the state

    def _reset_counters(self) -> None:
        self._warned_nonfinite = 0

    def _optional_states(self) -> tuple[str, ...]:
        return (_DROPPED,)  # state dicts saved before it existed still load

    def _sync_config(self) -> tuple[Any, ...]:
        return (*super()._sync_config(), type(self.base_metric).__qualname__)

    def extra_repr(self) -> str:
        """Short description for ``print(metric)``."""
        return f"alpha={self.alpha:.6g}, adjust={self.adjust}, nan_strategy={self.nan_strategy!r}"

    # ------------------------------------------------------------------ the wrapped metric's properties
    @property
    def higher_is_better(self) -> bool | None:  # type: ignore[override]
        """Whether a higher value is better, as for the wrapped metric."""
        return self.base_metric.higher_is_better

    @property
    def plot_lower_bound(self) -> float | None:  # type: ignore[override]
        """The wrapped metric's lower bound for :meth:`plot`."""
        return self.base_metric.plot_lower_bound

    @property
    def plot_upper_bound(self) -> float | None:  # type: ignore[override]
        """The wrapped metric's upper bound for :meth:`plot`."""
        return self.base_metric.plot_upper_bound

    @property
    def plot_legend_name(self) -> str | None:  # type: ignore[override]
        """The wrapped metric's legend name for :meth:`plot`."""
        return self.base_metric.plot_legend_name

    # ------------------------------------------------------------------ helpers
    def _local_states(self) -> dict[str, Tensor]:
        d = self.__dict__
        return {target: d[target] for target in d["_names"].values()}

    def _base_compute(self, states: dict[str, Tensor]) -> Any:
        """Run the wrapped metric's own (unwrapped) ``compute`` on ``states``, keyed by the wrapper's state names."""
        if self.beta == 0.0:  # alpha = 1: only the last tick with data counts (see decay.without_past)
            masks = dict(zip(self._state_names(), self._masks(), strict=True))
            targets = list(self._names.values())
            states = decay.without_past({n: states[n] for n in targets}, [masks[n] for n in targets])
        base = self.base_metric
        bd = base.__dict__
        for name, target in self._names.items():
            bd[name] = states[target]
        return type(base).compute(base)

    def _value_from_states(
        self,
        states: dict[str, Tensor],
        counters: dict[str, int] | None = None,
        check: bool = False,
        known: _sync.Pooled | None = None,
    ) -> Any:
        """The value from (reduced) states, squeezed and cloned like ``compute``'s; the states are left as they are.

        With ``check``, the checks of ``compute`` run first (dropped updates, overflowed states).
        """
        if check and self._drop_nonfinite:
            wrapped = {target: states[target] for target in self._names.values()}
            self._check_nonfinite(wrapped, states[_DROPPED], known)
        return apply_to_collection(self._base_compute(states), Tensor, _squeeze_clone)

    def _build_scratch(self) -> _Scratch:
        """The wrapped update's states, on the metric's device (see :class:`_Scratch`)."""
        shapes = {name: getattr(self, target).shape for name, target in self._names.items()}
        integers = self.__dict__.get("_integer_states", frozenset())  # none in a wrapper pickled before them
        scratch = _Scratch.build(shapes, integers, self.device)
        self.__dict__["_scratch"] = scratch
        return scratch

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the scratch states: ``torch.multiprocessing`` would share them between processes."""
        state = super().__getstate__()
        state["_scratch"] = None
        return state

    def reset(self) -> None:
        """Reset the decayed states, the tick count, the count of dropped updates and the wrapped metric."""
        super().reset()
        self.base_metric.reset()

    def _apply(self, fn: Any, exclude_state: Any = "") -> torch.nn.Module:
        # The decayed sums (and the count of dropped updates) stay float64 and only follow the device (see the base).
        this = super()._apply(fn, exclude_state)
        if isinstance(this, EMAWrapper):
            # The wrapped metric's states are scratch space (their values do not matter); it keeps computing in
            # float64.
            base = this.base_metric
            for name in this._names:
                state = getattr(base, name)
                setattr(base, name, state.to(_F64))
                base._defaults[name] = torch.zeros_like(state, dtype=_F64)
            base._dtype = _F64
            this.__dict__["_scratch"] = None
        return this


@dataclass
class _Scratch:
    """The states the wrapped update adds one update's sums to: flat buffers, zeroed, checked and converted at once.

    A state whose default is a float is a float64 view of ``floats``: the wrapped metric sums in float64, so that
    aggregators do not round their inputs. A state whose default is an integer (a count) is an int64 view of ``ints``,
    as in the plain metric: the wrapped update adds integers to integers (into a float64 state, torch would first copy
    every integer increment into a fresh float64 tensor), and its sums are never checked, since integers are finite.
    They are converted into ``converted`` for the decay-add, a float64 buffer kept from update to update.

    Attributes:
        states: the wrapped metric's states during its update, by name.
        sums: the float64 sums of an update, by name: views of ``floats`` and of ``converted``.
        floats: the float64 states, flat (``None`` if there is none).
        ints: the integer states, flat (``None`` if there is none).
        converted: the integer states' sums in float64, flat (``None`` if there is none).

    """

    states: dict[str, Tensor]
    sums: dict[str, Tensor]
    floats: Tensor | None
    ints: Tensor | None
    converted: Tensor | None

    @staticmethod
    def build(shapes: dict[str, torch.Size], integers: frozenset[str], device: torch.device) -> _Scratch:
        """Zeroed buffers for states of these shapes; those named in ``integers`` count in int64."""
        floats, float_views = _flat_views({n: s for n, s in shapes.items() if n not in integers}, _F64, device)
        counts = {n: s for n, s in shapes.items() if n in integers}
        ints, int_views = _flat_views(counts, torch.int64, device)
        converted, converted_views = _flat_views(counts, _F64, device)
        states = {n: int_views[n] if n in integers else float_views[n] for n in shapes}
        sums = {n: converted_views[n] if n in integers else float_views[n] for n in shapes}
        return _Scratch(states, sums, floats, ints, converted)

    def zero_(self) -> None:
        """Zero the states before an update (one pass per buffer)."""
        for flat in (self.floats, self.ints):
            if flat is not None:
                flat.zero_()

    def sums_(self, drop: bool) -> Tensor | None:
        """Fill :attr:`sums` from the states after an update; with ``drop``, check the float ones and drop them all.

        Returns:
            With ``drop`` and float states: a 0-d float64 tensor, 1 if every float sum is finite (the update is kept),
            else 0 (every sum, integer ones included, is then zero). Else ``None``: nothing can be dropped.

        """
        keep = None
        if drop and self.floats is not None:
            keep = all_finite(self.floats).to(_F64)
            keep_or_zero_(self.floats, keep)
        if self.ints is not None and self.converted is not None:
            self.converted.copy_(self.ints)  # one conversion kernel, into a kept buffer
            if keep is not None:
                self.converted.mul_(keep)  # integers are finite: the product drops them exactly
        return keep


def _flat_views(
    shapes: dict[str, torch.Size], dtype: torch.dtype, device: torch.device
) -> tuple[Tensor | None, dict[str, Tensor]]:
    """A zeroed flat buffer for states of these shapes (``None`` if there is none), and a view of it for each."""
    if not shapes:
        return None, {}
    sizes = [math.prod(shape) for shape in shapes.values()]
    flat = torch.zeros(sum(sizes), dtype=dtype, device=device)
    views = flat.split(sizes)  # type: ignore[no-untyped-call]
    return flat, {name: view.view(shape) for (name, shape), view in zip(shapes.items(), views, strict=True)}


def _fits(new: Tensor, buf: Tensor) -> bool:
    """Whether a sum the wrapped update put in a new tensor can go back into its buffer as it is."""
    return new.shape == buf.shape and (buf.is_floating_point() or not (new.is_floating_point() or new.is_complex()))


def _squeeze_clone(x: Tensor) -> Tensor:
    return (x.squeeze() if x.numel() == 1 else x).clone()


def _reduction_name(fx: Any) -> str:
    if fx is None:
        return "`None` (the ranks' states are stacked, not reduced)"
    known = _REDUCTION_NAMES.get(fx)
    if known is not None:
        return known
    return f"the custom function `{getattr(fx, '__qualname__', repr(fx))}`"


def _check_decayable(metric: Any) -> None:
    """Raise unless every state of ``metric`` is a real tensor, reduced with ``"sum"``, whose default is zero."""
    if not isinstance(metric, Metric):
        raise TypeError(
            f"Expected argument `metric` to be a torchmetrics `Metric`, but got {metric!r} of type"
            f" {type(metric).__name__}"
        )
    cls = type(metric).__name__
    if isinstance(metric, DecayedSumMetric):
        raise TypeError(
            f"EMAWrapper cannot wrap {cls}: it is already an exponential moving average; use it directly, or wrap"
            " the plain torchmetrics metric"
        )
    for name, default in metric._defaults.items():
        fx = metric._reductions[name]
        if isinstance(default, list):
            raise ValueError(
                f"EMAWrapper cannot decay state `{name}` of {cls}: it is a list state reduced with"
                f" {_reduction_name(fx)}; only tensor states reduced with `sum` can be decayed exactly"
            )
        if fx is not dim_zero_sum:
            raise ValueError(
                f"EMAWrapper cannot decay state `{name}` of {cls}: it reduces with {_reduction_name(fx)}; only states"
                " reduced with `sum` can be decayed exactly"
            )
        if default.is_complex():
            raise ValueError(
                f"EMAWrapper cannot decay state `{name}` of {cls}: it is complex ({default.dtype}); only real states"
                " can be decayed"
            )
        if bool(torch.count_nonzero(default) > 0):
            raise ValueError(
                f"EMAWrapper cannot decay state `{name}` of {cls}: its default is {default!r}, not zero; a decayed"
                " sum must start from zero"
            )
    for child_name, child in metric.named_modules():
        if child is not metric and isinstance(child, Metric):
            raise ValueError(
                f"EMAWrapper cannot wrap {cls}: it holds the metric `{child_name}` ({type(child).__name__}), whose"
                " states the wrapper cannot decay; wrap the inner metric instead"
            )
    if not metric._defaults:
        raise ValueError(f"EMAWrapper cannot wrap {cls}: it has no state to decay")
    if metric.update_called:
        raise ValueError(
            f"EMAWrapper needs a fresh metric, but {cls} was already updated {metric.update_count} time(s); call"
            " `reset()` on it first"
        )
