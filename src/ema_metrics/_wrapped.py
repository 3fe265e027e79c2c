"""The torchmetrics metric inside ``EMAWrapper``: what can be wrapped, and how the wrapper runs it on its states.

:func:`_check_decayable` accepts only metrics whose every state is a real tensor that starts from zero and is summed
across ranks. :class:`WrappedStates`, the base class of :class:`~ema_metrics.EMAWrapper`, runs the wrapped metric's
``update`` on zeroed scratch states and its ``compute`` on the decayed states, keeps it computing in float64 and
shows its properties.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from lightning_utilities import apply_to_collection
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat, dim_zero_max, dim_zero_mean, dim_zero_min, dim_zero_sum

from ema_metrics import _decay
from ema_metrics._base import DecayedSumMetric

__all__ = ["WrappedStates"]

_F64 = torch.float64
_REDUCTION_NAMES: dict[Callable[..., Any], str] = {
    dim_zero_mean: "`mean`",
    dim_zero_max: "`max`",
    dim_zero_min: "`min`",
    dim_zero_cat: "`cat`",
}


class WrappedStates(DecayedSumMetric):
    """Decayed states that are those of a wrapped torchmetrics metric, whose ``update`` and ``compute`` run on them."""

    base_metric: Metric
    _names: dict[str, str]  # the wrapped metric's state names -> the wrapper's (set by EMAWrapper)

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
        if self.beta == 0.0:  # alpha = 1: only the last tick with data counts (see _decay.without_past)
            masks = dict(zip(self._state_names(), self._masks(), strict=True))
            targets = list(self._names.values())
            states = _decay.without_past({n: states[n] for n in targets}, [masks[n] for n in targets])
        base = self.base_metric
        bd = base.__dict__
        for name, target in self._names.items():
            bd[name] = states[target]
        return type(base).compute(base)

    def _value_from_states(
        self, states: dict[str, Tensor], counters: dict[str, int] | None = None, check: bool = False
    ) -> Any:
        """The value from (reduced) states, squeezed and cloned like ``compute``'s; the states are left as they are."""
        return apply_to_collection(self._base_compute(states), Tensor, _squeeze_clone)

    def _build_scratch(self) -> dict[str, Tensor]:
        """Zeroed float64 states for the wrapped update: views of one flat buffer, zeroed and checked at once."""
        shapes = {name: getattr(self, target).shape for name, target in self._names.items()}
        sizes = [math.prod(shape) for shape in shapes.values()]
        flat = torch.zeros(sum(sizes), dtype=_F64, device=self.device)
        views = flat.split(sizes)  # type: ignore[no-untyped-call]
        scratch = {name: view.view(shape) for (name, shape), view in zip(shapes.items(), views, strict=True)}
        self.__dict__["_scratch"] = scratch
        self.__dict__["_flat"] = flat
        return scratch

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the scratch states: ``torch.multiprocessing`` would share them between processes."""
        state = super().__getstate__()
        state["_scratch"] = None
        state["_flat"] = None
        return state

    def reset(self) -> None:
        """Reset the decayed states, the tick count, the count of dropped updates and the wrapped metric."""
        super().reset()
        self.base_metric.reset()

    def _apply(self, fn: Any, exclude_state: Any = "") -> torch.nn.Module:
        # The decayed sums (and the count of dropped updates) stay float64 and only follow the device (see the base).
        this = super()._apply(fn, exclude_state)
        if isinstance(this, WrappedStates):
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
