"""State dicts of EMA metrics: what is saved next to the states, and the checks before loading them.

:class:`Persistence`, mixed into :class:`~ema_metrics._base.DecayedSumMetric`, saves the tick count, the replica
flag and the counters as the module's extra state, and loads a state dict only once :func:`load_checked` accepted it.

The checks report what they refuse the way ``torch.nn.Module.load_state_dict`` does. torch reports a tensor of the
wrong shape, or an entry that is not a tensor, by appending a message to ``error_msgs``; ``load_state_dict`` then
raises one ``RuntimeError`` listing them all (with ``strict=False`` too). The metric's states are only touched when
every check passed, so a refused state dict leaves the metric as it was.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from numbers import Integral
from typing import Any

from torch import Tensor
from torch.nn.modules.module import _EXTRA_STATE_KEY_SUFFIX
from torchmetrics import Metric

from ema_metrics._contract import _GROUP_TAG

__all__ = ["EXTRA_STATE_KEY", "Persistence", "extra_state_errors", "load_checked", "state_errors"]

_EXTRA_STATE_FORMAT = 2

#: The key, below the metric's prefix, of what ``get_extra_state`` saves (torch's name).
EXTRA_STATE_KEY = _EXTRA_STATE_KEY_SUFFIX


def state_errors(
    state_dict: Mapping[str, Any], prefix: str, current: Mapping[str, Tensor], names: Iterable[str]
) -> list[str]:
    """The messages torch gives for the entries of ``names`` that are not tensors or do not have the state's shape.

    Args:
        state_dict: the state dict being loaded.
        prefix: the metric's prefix in it.
        current: the metric's states by name.
        names: the states to check (those present in ``state_dict`` are checked).

    Returns:
        One message per bad entry, worded as torch words them.

    """
    errors = []
    for name in names:
        key = prefix + name
        if key not in state_dict:
            continue
        value = state_dict[key]
        if not isinstance(value, Tensor):
            errors.append(
                f'While copying the parameter named "{key}", expected torch.Tensor or Tensor-like object from'
                f" checkpoint but received {type(value)}"
            )
        elif value.shape != current[name].shape:
            errors.append(
                f"size mismatch for {key}: copying a param with shape {value.shape} from checkpoint, the shape in"
                f" current model is {current[name].shape}."
            )
        elif value.is_complex():
            errors.append(
                f'While copying the parameter named "{key}", expected a real tensor from checkpoint but received'
                f" dtype {value.dtype}"
            )
    return errors


def extra_state_errors(state_dict: Mapping[str, Any], prefix: str, cls: str, counters: Iterable[str]) -> list[str]:
    """Messages for a saved tick count or counter that is not a non-negative integer.

    Args:
        state_dict: the state dict being loaded.
        prefix: the metric's prefix in it.
        cls: the metric's class name, for the message.
        counters: the names of the metric's counters (besides ``ticks``).

    Returns:
        One message per bad entry (none when the extra state is absent).

    """
    key = prefix + EXTRA_STATE_KEY
    if key not in state_dict:
        return []
    extra = state_dict[key]
    if not isinstance(extra, Mapping):
        return [f"While loading {key!r} of {cls}: expected a dict, but got {extra!r}"]
    errors = []
    for name in ("ticks", *counters):
        value = extra.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
            errors.append(
                f"While loading {key!r} of {cls}: expected `{name}` to be a non-negative integer, but got {value!r}"
            )
    return errors


def load_checked(
    metric: Any,
    state_dict: dict[str, Any],
    prefix: str,
    load: Callable[[], None],
    missing_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Check the metric's entries of ``state_dict``, then ``load`` them (torchmetrics' and torch's loading).

    Refused entries are reported in ``error_msgs`` and nothing is loaded. Missing states are reported in
    ``missing_keys`` (torchmetrics does not), except the metric's optional ones; the tick count and counters are
    neither loaded nor reported missing without the states they count (a ``persistent(False)`` metric saves none).

    Args:
        metric: the ``DecayedSumMetric`` being loaded.
        state_dict: the state dict (its entries for this metric are converted to the states' device and dtype).
        prefix: the metric's prefix in it.
        load: runs the base classes' ``_load_from_state_dict``.
        missing_keys: torch's list of missing keys.
        error_msgs: torch's list of error messages.

    """
    names = metric._state_names()
    current = {name: getattr(metric, name) for name in names}
    errors = state_errors(state_dict, prefix, current, names)
    errors += extra_state_errors(state_dict, prefix, type(metric).__name__, metric._extra_counters())
    if errors:  # torch's way: load_state_dict raises one RuntimeError listing them; the metric is unchanged
        error_msgs.extend(errors)
        return
    present = [name for name in names if prefix + name in state_dict]
    optional = metric._optional_states()
    counted = [name for name in present if name not in optional]
    if not counted:  # counters without the states they count (an older `persistent(False)` state dict)
        state_dict.pop(prefix + EXTRA_STATE_KEY, None)
    # A checkpoint is usually loaded on the CPU: keep each state on the metric's device and dtype.
    for key in metric._defaults:
        name = prefix + key
        if name in state_dict and isinstance(state_dict[name], Tensor):
            value = getattr(metric, key)
            state_dict[name] = state_dict[name].to(device=value.device, dtype=value.dtype).clone()
    n_missing = len(missing_keys)
    load()
    # torchmetrics does not report missing states; torch does (load_state_dict raises under strict=True)
    missing = [prefix + n for n in names if metric._persistent[n] and n not in present and n not in optional]
    if not counted:  # the states are reported missing, or are not saved at all: not their counters as well
        missing_keys[n_missing:] = [k for k in missing_keys[n_missing:] if k != prefix + EXTRA_STATE_KEY]
    missing_keys.extend(missing)


class Persistence(Metric):
    """The extra state of a ``DecayedSumMetric`` (tick count, replica flag, counters) and the loading of its states."""

    # set by DecayedSumMetric
    _alpha: float
    _ticks: int
    _replica: bool
    _renorm_every: int
    _renorm_at: int
    _state_names: Callable[[], list[str]]
    _counters_for_compute: Callable[[], dict[str, int]]

    def _reset_counters(self) -> None:
        """Reset Python-side counters of subclasses (hook)."""

    def _extra_counters(self) -> dict[str, int]:
        """Python-side counters saved with the state and summed across ranks (hook)."""
        return {}

    def _set_extra_counters(self, counters: dict[str, int]) -> None:
        """Restore the counters of :meth:`_extra_counters` (hook)."""

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
        self._ticks = int(state.get("ticks", 0))
        self._replica = bool(state.get("replica", False))
        self._renorm_at = self._ticks + self._renorm_every
        self._update_count = max(self._update_count, self._ticks)
        self._set_extra_counters(
            {k: int(v) for k, v in state.items() if k not in ("format", "ticks", "alpha", "replica")}
        )

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
            super(Persistence, self)._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )

        load_checked(self, state_dict, prefix, load, missing_keys, error_msgs)
        self._computed = None
