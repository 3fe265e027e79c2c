"""The checks of a state dict before an EMA metric loads it (``DecayedSumMetric._load_from_state_dict`` runs them).

The checks report what they refuse the way ``torch.nn.Module.load_state_dict`` does. torch reports a tensor of the
wrong shape, or an entry that is not a tensor, by appending a message to ``error_msgs``; ``load_state_dict`` then
raises one ``RuntimeError`` listing them all (with ``strict=False`` too). The metric's states are only touched when
every check passed, so a refused state dict leaves the metric as it was.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from numbers import Integral
from typing import Any

from torch import Tensor
from torch.nn.modules.module import _EXTRA_STATE_KEY_SUFFIX

__all__ = ["EXTRA_STATE_KEY", "extra_state_errors", "state_errors"]

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
