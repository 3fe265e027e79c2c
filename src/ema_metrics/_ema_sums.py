"""The hot path of ``EMAMetric``: the sums one update adds to its states, and the per-device constants forming them.

``EMAMetric._accumulate`` (in :mod:`ema_metrics.ema`) calls these module-level functions directly, so they add no
call layer to ``update`` and ``forward``.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from ema_metrics._inputs import as_float, as_tensor, check_tensor

if TYPE_CHECKING:
    from ema_metrics.ema import EMAMetric

_F64 = torch.float64
_INF = math.inf


class _Coef(NamedTuple):
    """Constant vectors that turn a value into the tick's sums with one ``addcmul``: ``c0 + value * c1``."""

    c0: Tensor  # [0, w, 1, 0]
    c1: Tensor  # [w, 0, 0, 0]
    c0_col: Tensor  # the same, as (4, 1) columns for values with several elements
    c1_col: Tensor
    may_overflow: bool  # w > 1: a product w*x of a finite x can overflow


class _Hot(NamedTuple):
    """Per-device constants of the hot path, rebuilt when the metric moves."""

    sums: Tensor
    num: Tensor  # view of sums[0]
    den: Tensor  # view of sums[1]
    decay: Tensor  # [beta, beta, 1, 1]
    keep: Tensor  # [1, 1, 1, 1]
    one: Tensor
    zero: Tensor
    reject: Tensor  # [0, 0, 0, 1]: the sums of an update whose tensor weight was invalid
    inc: Tensor  # scratch for the sums of a 0-d update, [w*x, w, 1 + 0*x, 0*x]
    finite: Tensor  # view of inc[2]: 1 for a finite x, NaN otherwise
    buf: Tensor  # scratch: inc * finite, cleaned
    coef: dict[float, _Coef]


def _build_hot(metric: EMAMetric) -> _Hot:
    """The per-device constants of ``metric``'s hot path, kept in its ``_hot`` until the state moves."""
    sums = metric.sums
    dev = sums.device
    inc = torch.zeros(4, dtype=_F64, device=dev)
    hot = _Hot(
        sums=sums,
        num=sums[0],
        den=sums[1],
        decay=torch.tensor([metric._decay, metric._decay, 1.0, 1.0], dtype=_F64, device=dev),
        keep=torch.ones(4, dtype=_F64, device=dev),
        one=torch.ones((), dtype=_F64, device=dev),
        zero=torch.zeros((), dtype=_F64, device=dev),
        reject=torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=_F64, device=dev),
        inc=inc,
        finite=inc[2],
        buf=torch.zeros(4, dtype=_F64, device=dev),
        coef={},
    )
    metric.__dict__["_hot"] = hot
    return hot


def _coef(hot: _Hot, weight: float) -> _Coef:
    """The coefficients of a Python ``weight`` (cached in ``hot``; raises if it is not finite and non-negative)."""
    w = as_float(weight, "weight")
    if not (w >= 0.0 and math.isfinite(w)):
        raise ValueError(f"Expected argument `weight` to be a finite non-negative number, but got {weight!r}")
    dev = hot.sums.device
    c0 = torch.tensor([0.0, w, 1.0, 0.0], dtype=_F64, device=dev)
    c1 = torch.tensor([w, 0.0, 0.0, 0.0], dtype=_F64, device=dev)
    coef = _Coef(c0, c1, c0.unsqueeze(1), c1.unsqueeze(1), w > 1.0)
    if len(hot.coef) < 64:
        hot.coef[w] = coef
    return coef


def _scalar_sums(hot: _Hot, coef: _Coef, x: Tensor) -> Tensor:
    """The sums [w*x, w, 1, 0] of a 0-d value, zero if it is not finite; an overflowing w*x stays inf.

    They come from one addcmul, ``c0 + x * c1``. A non-finite x makes the last three NaN and the first ±inf (NaN
    for w = 0): with ``w <= 1`` no finite x can overflow the product, so cleaning every NaN and inf to 0 drops
    exactly the non-finite values (4 kernels a forward). With ``w > 1`` the product may overflow: multiplying by
    the third entry, ``1 + 0*x`` (1, or NaN for a non-finite x), makes every sum of a non-finite x NaN, and only
    NaN is cleaned, so an overflow stays inf for compute to report (one more kernel, about 1 us).
    """
    if not coef.may_overflow:
        return torch.nan_to_num_(torch.addcmul(coef.c0, x, coef.c1), 0.0, 0.0, 0.0)  # inlined in _accumulate
    torch.addcmul(coef.c0, x, coef.c1, out=hot.inc)
    return torch.nan_to_num_(torch.mul(hot.inc, hot.finite, out=hot.buf), 0.0, _INF, -_INF)


def _vector_sums(coef: _Coef, x: Tensor, clean: bool) -> Tensor:
    """The sums [w*x, w, 1, 0] of the values of ``x``, summed; as :func:`_scalar_sums` per column."""
    cols = torch.addcmul(coef.c0_col, x.reshape(1, -1), coef.c1_col)
    if not clean:
        return cols.sum(1)
    if not coef.may_overflow:
        return torch.nan_to_num_(cols, 0.0, 0.0, 0.0).sum(1)
    return torch.nansum(cols * cols[2:3], 1)


def _tensor_weight_sums(metric: EMAMetric, hot: _Hot, x: Tensor, weight: Any) -> tuple[Tensor, Tensor]:
    """The sums of an update whose weight is not a Python float or int, and the decay to apply before adding them."""
    if isinstance(weight, bool):
        raise TypeError(f"Expected argument `weight` to be a number or a tensor, but got {weight!r}")
    if isinstance(weight, Real):
        inc = _vector_sums(_coef(hot, as_float(weight, "weight")), x, metric._clean)
        return inc, hot.decay if metric._tick_decay() else hot.keep
    w = weight.detach() if isinstance(weight, Tensor) else as_tensor(weight, "weight")
    check_tensor(w, "weight")
    try:
        shape = torch.broadcast_shapes(w.shape, x.shape)  # type: ignore[no-untyped-call]
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise ValueError(
            f"Expected argument `weight` to be broadcastable to the shape of `value` {tuple(x.shape)},"
            f" but got shape {tuple(w.shape)}"
        )
    # The tick's sums are formed in float64, as on the Python-weight path: a product and sum in the input's
    # dtype would round (float32) or overflow (float16) before reaching the float64 states.
    xe = x.reshape(1, -1).to(_F64)
    we = w.expand(x.shape).reshape(1, -1).to(_F64)
    finite = torch.addcmul(hot.one, xe, hot.zero)  # 1 where x is finite, NaN elsewhere
    wd = we * finite
    # x * (w * finite) is NaN for a non-finite x (dropped) and inf for a finite product that overflows (kept)
    inc = torch.cat((xe * wd, wd, finite, torch.zeros_like(finite)))
    inc = torch.nansum(inc, 1) if metric._clean else inc.sum(1)
    invalid = torch.logical_or(w < 0, ~torch.isfinite(w)).any()
    # An invalid weight rejects the whole update on the device: the state is left as it was (no decay
    # either), a counter records it, and ``compute`` raises. Reading it here would need a host sync.
    decay = hot.decay if metric._tick_decay() else hot.keep
    return torch.where(invalid, hot.reject, inc), torch.where(invalid, hot.keep, decay)
