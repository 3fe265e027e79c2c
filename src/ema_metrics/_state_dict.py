"""Checks of a state dict before an EMA metric loads it, reported the way ``torch.nn.Module.load_state_dict`` does.

torch reports a tensor of the wrong shape, or an entry that is not a tensor, by appending a message to
``error_msgs``; ``load_state_dict`` then raises one ``RuntimeError`` listing them all (with ``strict=False`` too).
The metric's states are only touched when every check passed, so a refused state dict leaves the metric as it was.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from numbers import Integral
from typing import Any

from torch import Tensor
from torch.nn.modules.module import _EXTRA_STATE_KEY_SUFFIX

__all__ = ["EXTRA_STATE_KEY", "extra_state_errors", "load_checked", "state_errors"]

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
