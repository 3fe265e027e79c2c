"""Validation shared by the metrics: arguments, inputs and the float64 range of the decayed sums."""

from __future__ import annotations

import math
import reprlib
import sys
from numbers import Real
from typing import Any, Union

import torch
from torch import Tensor

__all__ = [
    "NAN_STRATEGIES",
    "VALUE_DTYPES",
    "as_float",
    "as_tensor",
    "check_nan_strategy",
    "check_overflow",
    "check_tensor",
    "check_update_tensors",
    "shown",
]

NAN_STRATEGIES = ("error", "warn", "ignore", "disable")
_REPR = reprlib.Repr()
_REPR.maxlong = 24
_REPR.maxother = 120
_REPR.maxstring = 60
#: The dtypes a value or weight may have: real floating point (float8 excluded: torch cannot promote it) and integers.
VALUE_DTYPES = frozenset(
    {
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
    }
)
_INT_DTYPES = frozenset(d for d in VALUE_DTYPES if not d.is_floating_point)
# float8 and float4 dtypes (those this torch has): storage formats torch cannot promote or compute with
_LOW_BIT_FLOATS = frozenset(
    dtype
    for name in dir(torch)
    if name.startswith(("float8_", "float4_")) and isinstance(dtype := getattr(torch, name), torch.dtype)
)


def shown(value: Any) -> str:
    """``repr(value)`` for an error message, shortened for huge Python ints (``10**400`` has 401 digits)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        digits = str(abs(value))
        return f"{'-' if value < 0 else ''}{digits[:6]}...({len(digits)} digits)"
    if isinstance(value, (list, tuple)):
        return _REPR.repr(value)  # shortens long lists and the huge ints inside
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def as_float(value: Any, name: str) -> float:
    """A real Python number as a float.

    Args:
        value: the number (``bool`` is refused).
        name: the argument's name, for the message.

    Returns:
        ``float(value)``.

    Raises:
        TypeError: If ``value`` is not a real number.
        ValueError: If it is an int too large for a float64.

    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"Expected argument `{name}` to be a real number, but got {shown(value)}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(
            f"Expected argument `{name}` to be a number that fits in a float64, but got {shown(value)}"
        ) from None


def check_tensor(x: Tensor, name: str) -> None:
    """Raise unless ``x`` is a dense tensor of a real dtype that the metric accumulates (see ``VALUE_DTYPES``).

    Args:
        x: the tensor.
        name: the argument's name, for the message.

    Raises:
        TypeError: If ``x`` is sparse (or another non-strided layout), complex, boolean, float8 or quantized.

    """
    if x.layout is not torch.strided:
        raise TypeError(
            f"Expected argument `{name}` to be a dense tensor, but got a tensor with layout {x.layout}; convert it"
            " with `.to_dense()`"
        )
    if x.dtype not in VALUE_DTYPES:
        raise TypeError(
            f"Expected argument `{name}` to be a real-valued tensor (float64, float32, float16, bfloat16 or an"
            f" integer dtype), but got dtype {x.dtype}"
        )


def check_update_tensors(args: tuple[Any, ...], kwargs: dict[str, Any], names: list[str]) -> None:
    """Raise for a sparse or float8 tensor among the arguments of a wrapped metric's ``update``.

    The wrapped metric would fail deep inside, or silently compute in another format; any other check is its own.

    Args:
        args: positional arguments.
        kwargs: keyword arguments.
        names: the names of the wrapped ``update``'s parameters, to name positional arguments.

    Raises:
        TypeError: If a tensor argument is not dense, or has a float8/float4 dtype.

    """
    for i, value in enumerate(args):
        if isinstance(value, Tensor):
            _check_dense(value, names[i] if i < len(names) else f"#{i}")
    for name, value in kwargs.items():
        if isinstance(value, Tensor):
            _check_dense(value, name)


def _check_dense(x: Tensor, name: str) -> None:
    if x.layout is not torch.strided or x.dtype in _LOW_BIT_FLOATS:
        check_tensor(x, name)


def as_tensor(value: Any, name: str) -> Tensor:
    """A number, list, tuple or array as a tensor; Python numbers and lists of them become float64 (never rounded).

    Args:
        value: the input.
        name: the argument's name, for the message.

    Returns:
        The tensor.

    Raises:
        TypeError: If ``value`` is not numeric (``None``, a string, booleans, complex numbers).
        ValueError: If it holds an int too large for a float64.

    """
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise TypeError(f"Expected argument `{name}` to be a number or a tensor, but got {shown(value)}")
    if isinstance(value, Real):
        return torch.tensor(as_float(value, name), dtype=torch.float64)
    try:
        out = torch.as_tensor(value)
        if isinstance(value, (list, tuple)) and (out.is_floating_point() or out.dtype in _INT_DTYPES):
            out = torch.as_tensor(value, dtype=torch.float64)  # Python floats are float64: do not round to float32
    except OverflowError:
        raise ValueError(
            f"Expected argument `{name}` to hold numbers that fit in a float64, but got {shown(value)}"
        ) from None
    except (TypeError, ValueError, RuntimeError) as err:
        if "Overflow" in str(err):
            raise ValueError(
                f"Expected argument `{name}` to hold numbers that fit in a float64, but got {shown(value)}"
            ) from None
        raise TypeError(f"Expected argument `{name}` to be a number or a tensor, but got {shown(value)}") from err
    if out.dtype not in VALUE_DTYPES:
        raise TypeError(f"Expected argument `{name}` to be a number or a tensor, but got {shown(value)}")
    return out


def check_nan_strategy(nan_strategy: Any) -> Union[str, float]:
    """Validate a ``nan_strategy`` argument: one of :data:`NAN_STRATEGIES`, or a finite float to impute.

    Args:
        nan_strategy: the argument.

    Returns:
        The strategy, a float when imputing.

    Raises:
        TypeError: If it is neither a string nor a real number.
        ValueError: If it is an unknown string, or a non-finite number.

    """
    if isinstance(nan_strategy, str):
        if nan_strategy not in NAN_STRATEGIES:
            raise ValueError(
                f"Expected argument `nan_strategy` to be one of {list(NAN_STRATEGIES)} or a float, but got"
                f" {nan_strategy!r}"
            )
        return nan_strategy
    if isinstance(nan_strategy, bool) or not isinstance(nan_strategy, Real):
        raise TypeError(f"Expected argument `nan_strategy` to be a string or a float, but got {shown(nan_strategy)}")
    value = as_float(nan_strategy, "nan_strategy")
    if not math.isfinite(value):
        raise ValueError(
            f"Expected argument `nan_strategy` to be a finite float when imputing, but got {nan_strategy!r}"
        )
    return value


def check_overflow(cls: str, *sums: float) -> None:
    """Raise unless every decayed sum is finite.

    Non-finite *inputs* are dropped before they reach a sum (or, with ``nan_strategy="disable"``, meant to poison
    it), so a non-finite sum is an overflow: a product ``weight * value``, a tick's sums, their decayed sum, or the
    ``1 / alpha`` seeding of ``adjust=False`` went past the largest float64. It is reported, never turned into a
    number.

    Args:
        cls: the metric's class name, for the message.
        sums: the decayed sums read back from the state.

    Raises:
        OverflowError: If a sum is infinite or NaN.

    """
    if all(math.isfinite(v) for v in sums):
        return
    raise OverflowError(
        f"{cls}: the decayed sums overflowed float64 ({', '.join(repr(v) for v in sums)}): a value times its weight,"
        f" the sums of a tick or their decayed total went past {sys.float_info.max:.4g}, so the average cannot be"
        " represented. Rescale the values or weights (for example, log a loss in other units), then reset the metric."
    )
