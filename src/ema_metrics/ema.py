"""``EMAMetric``: an exact, debiased, weighted exponential moving average that syncs across ranks.

The hot path's helpers come first: the sums one update adds to the states, and the per-device constants forming
them. ``EMAMetric._accumulate`` calls these module-level functions directly, so they add no call layer to ``update``
and ``forward``.
"""

from __future__ import annotations

import math
import sys
import warnings
from numbers import Real
from typing import Any, NamedTuple, Union

import torch
from torch import Tensor
from torchmetrics.utilities.exceptions import TorchMetricsUserError

from ema_metrics import _sync
from ema_metrics._base import DecayedSumMetric, capturing
from ema_metrics.utilities.inputs import (
    VALUE_DTYPES,
    as_float,
    as_tensor,
    check_nan_strategy,
    check_overflow,
    check_tensor,
)

__all__ = ["EMAMetric"]

_F64 = torch.float64
_INF = math.inf
_STRIDED = torch.strided
_TINY_NORMAL = sys.float_info.min  # 2 ** -1022: below it a float64 loses precision (subnormal), then becomes 0


class _Coef(NamedTuple):
    """Constant vectors that turn a value into the tick's sums with one ``addcmul``: ``c0 + value * c1``."""

    c0: Tensor  # [0, w, 1, 0]
    c1: Tensor  # [w, 0, 0, 0]
    c0_col: Tensor  # the same, as (4, 1) columns for values with several elements
    c1_col: Tensor
    may_overflow: bool  # w > 1: a product w*x of a finite x can overflow
    may_underflow: bool  # 0 < w < 1: a product w*x of a normal x can fall below the float64 normal range
    w: float


class _Hot(NamedTuple):
    """The hot path's per-device constants, and views of the current state.

    Every constant is made on the device by fill kernels from Python scalars: building them copies no host data, so
    neither the first update on a device nor the first after ``.to(device)`` waits for a copy. The views are rebuilt
    (for free) when the state tensor is replaced (``reset()``, ``compute()``'s restore, ``load_state_dict()``).
    """

    sums: Tensor
    num: Tensor  # view of sums[0]
    den: Tensor  # view of sums[1]
    device: torch.device
    cpu: bool  # the state is on the CPU (a CPU input is then no host copy)
    decay: Tensor  # [beta, beta, 1, 1]
    keep: Tensor  # [1, 1, 1, 1]
    one: Tensor
    zero: Tensor
    reject: Tensor  # [0, 0, 0, 1]: the sums of an update whose tensor weight was invalid
    base: Tensor  # [0, 0, 1, 0]: c0 without the weight
    e_w: Tensor  # [0, 1, 0, 0]: where the weight goes in c0
    e_x: Tensor  # [1, 0, 0, 0]: where the weight goes in c1
    inc: Tensor  # scratch for the sums of a 0-d update, [w*x, w, 1 + 0*x, 0*x]
    finite: Tensor  # view of inc[2]: 1 for a finite x, NaN otherwise
    buf: Tensor  # scratch: inc * finite, cleaned
    coef: dict[float, _Coef]


def _filled(values: list[float], device: torch.device) -> Tensor:
    """A float64 vector of ``values`` made on ``device`` by fill kernels (Python scalars as kernel arguments)."""
    out = torch.zeros(len(values), dtype=_F64, device=device)
    for i, v in enumerate(values):
        if v != 0.0:
            out[i].fill_(v)
    return out


def _build_hot(metric: EMAMetric) -> _Hot:
    """The hot path's constants for ``metric``'s state, kept in its ``_hot``; only views are rebuilt on the device."""
    sums = metric.sums
    dev = sums.device
    old: _Hot | None = metric.__dict__.get("_hot")
    if old is not None and old.device == dev:
        hot = old._replace(sums=sums, num=sums[0], den=sums[1])
    else:
        inc = torch.zeros(4, dtype=_F64, device=dev)
        hot = _Hot(
            sums=sums,
            num=sums[0],
            den=sums[1],
            device=dev,
            cpu=dev.type == "cpu",
            decay=_filled([metric._decay, metric._decay, 1.0, 1.0], dev),
            keep=torch.ones(4, dtype=_F64, device=dev),
            one=torch.ones((), dtype=_F64, device=dev),
            zero=torch.zeros((), dtype=_F64, device=dev),
            reject=_filled([0.0, 0.0, 0.0, 1.0], dev),
            base=_filled([0.0, 0.0, 1.0, 0.0], dev),
            e_w=_filled([0.0, 1.0, 0.0, 0.0], dev),
            e_x=_filled([1.0, 0.0, 0.0, 0.0], dev),
            inc=inc,
            finite=inc[2],
            buf=torch.zeros(4, dtype=_F64, device=dev),
            coef={},
        )
    metric.__dict__["_hot"] = hot
    return hot


def _coef(hot: _Hot, weight: float) -> _Coef:
    """The coefficients of a Python ``weight`` (cached in ``hot``; raises if it is not finite and non-negative).

    They are made on the device from the weight as a kernel argument (two kernels, no copy of host data); the 64 most
    recent new weights are kept, so a constant weight (a batch size) costs nothing after its first update.
    """
    w = as_float(weight, "weight")
    if not (w >= 0.0 and math.isfinite(w)):
        raise ValueError(f"Expected argument `weight` to be a finite non-negative number, but got {weight!r}")
    c0 = torch.add(hot.base, hot.e_w, alpha=w)  # [0, w, 1, 0], exactly
    c1 = torch.mul(hot.e_x, w)  # [w, 0, 0, 0]
    coef = _Coef(c0, c1, c0.unsqueeze(1), c1.unsqueeze(1), w > 1.0, 0.0 < w < 1.0, w)
    if len(hot.coef) >= 64:
        hot.coef.pop(next(iter(hot.coef)))
    hot.coef[w] = coef
    return coef


def _scalar_sums(hot: _Hot, coef: _Coef, x: Tensor | float) -> Tensor:
    """The sums [w*x, w, 1, 0] of a 0-d value, zero if it is not finite; an overflowing w*x stays inf.

    They come from one kernel, ``c0 + x * c1`` (an ``addcmul`` for a tensor ``x``, an ``add`` with ``alpha=x`` for a
    Python number: the same products, and no tensor made from host data). A non-finite x makes the last three NaN and
    the first ±inf (NaN for w = 0): with ``w <= 1`` no finite x can overflow the product, so cleaning every NaN and
    inf to 0 drops exactly the non-finite values (4 kernels a forward). With ``w > 1`` the product may overflow:
    multiplying by the third entry, ``1 + 0*x`` (1, or NaN for a non-finite x), makes every sum of a non-finite x
    NaN, and only NaN is cleaned, so an overflow stays inf for compute to report (one more kernel, about 1 us).
    """
    if not coef.may_overflow:
        return torch.nan_to_num_(_sums_of(coef, x), 0.0, 0.0, 0.0)  # inlined in _accumulate
    _sums_of(coef, x, out=hot.inc)
    return torch.nan_to_num_(torch.mul(hot.inc, hot.finite, out=hot.buf), 0.0, _INF, -_INF)


def _sums_of(coef: _Coef, x: Tensor | float, out: Tensor | None = None) -> Tensor:
    """``c0 + x * c1``: the unclean sums [w*x, w, 1 + 0*x, 0*x] of one value, a device tensor or a Python number."""
    if isinstance(x, Tensor):
        return torch.addcmul(coef.c0, x, coef.c1, out=out)  # type: ignore[arg-type]
    return torch.add(coef.c0, coef.c1, alpha=x, out=out)  # type: ignore[arg-type]


def _vector_sums(coef: _Coef, x: Tensor, clean: bool) -> Tensor:
    """The sums [w*x, w, 1, 0] of the values of ``x``, summed; as :func:`_scalar_sums` per column."""
    cols = torch.addcmul(coef.c0_col, x.reshape(1, -1), coef.c1_col)
    if not clean:
        return cols.sum(1)
    if not coef.may_overflow:
        return torch.nan_to_num_(cols, 0.0, 0.0, 0.0).sum(1)
    return torch.nansum(cols * cols[2:3], 1)


def _check_product(value: float, weight: float) -> None:
    """Refuse a Python ``value`` whose product with a Python ``weight`` underflows (no tensor, no device work)."""
    product = value * weight
    if weight != 0.0 and abs(product) < _TINY_NORMAL and abs(product) < abs(value):
        raise ValueError(
            f"Expected the product of argument `weight` ({weight!r}) and argument `value` ({value!r}) to be at least"
            f" {_TINY_NORMAL!r} in magnitude (the float64 normal range), but it is {product!r}: the weighted sum would"
            " underflow and the average would be wrong. Rescale the values or the weights; the state is unchanged."
        )


def _underflows(x: Tensor, w: Tensor | float) -> Tensor:
    """0-d bool, on the device: a weighted product ``w * x`` lost precision to underflow that ``x`` did not have.

    That is ``w != 0`` and ``|w x|`` below the float64 normal range and below ``|x|``; a weight of at least 1 never
    underflows a product (only a value already below the normal range can be that small). NaN and inf are not flagged
    (``nan_strategy`` handles them).
    """
    xe = x.to(_F64)
    product = torch.mul(xe, w).abs_()
    lost = torch.logical_and(product < _TINY_NORMAL, product < xe.abs())
    if isinstance(w, Tensor):
        lost = torch.logical_and(lost, w != 0)
    return lost.any()


def _tensor_weight_sums(metric: EMAMetric, hot: _Hot, x: Tensor, weight: Any) -> tuple[Tensor, Tensor]:
    """The sums of an update whose weight is not a Python float or int, and the decay to apply before adding them."""
    if isinstance(weight, bool):
        raise TypeError(f"Expected argument `weight` to be a number or a tensor, but got {weight!r}")
    if isinstance(weight, Real):
        coef = _coef(hot, as_float(weight, "weight"))
        inc = _vector_sums(coef, x, metric._clean)
        decay = hot.decay if metric._tick_decay() else hot.keep
        if not coef.may_underflow:
            return inc, decay
        lost = _underflows(x, coef.w)
        return torch.where(lost, hot.reject, inc), torch.where(lost, hot.keep, decay)
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
    invalid = torch.logical_or(torch.logical_or(w < 0, ~torch.isfinite(w)).any(), _underflows(xe, we))
    # An invalid weight (or a weighted product that underflows) rejects the whole update on the device: the state
    # is left as it was (no decay either), a counter records it, and ``compute`` raises. Reading it here would need
    # a host sync.
    decay = hot.decay if metric._tick_decay() else hot.keep
    return torch.where(invalid, hot.reject, inc), torch.where(invalid, hot.keep, decay)


def _host_number(t: Tensor, name: str, hot: _Hot) -> float:
    """A CPU 0-d tensor given to a metric on an accelerator, as the host number it holds (a read of host memory).

    Raises:
        RuntimeError: If ``t`` has dims, or lives on another accelerator: the state is unchanged.

    """
    if t.device.type == "cpu" and t.dim() == 0:
        return float(t)  # host memory: no device is read or waited for
    raise RuntimeError(
        f"Expected argument `{name}` to be on the metric's device ({hot.device}), a CPU 0-d tensor or a Python"
        f" number, but got a tensor of shape {tuple(t.shape)} on {t.device}. Move it with `.to({str(hot.device)!r})`"
        " (or move the metric with `.to(device)`); the state is unchanged."
    )


class EMAMetric(DecayedSumMetric):
    r"""Exponential moving average of a stream of values, debiased, weighted and exact across ranks.

    ``update`` and ``forward`` accept:

    - ``value`` (:class:`~torch.Tensor` of any shape, or a Python number): the observations of one tick. All
      elements are pooled with their weights into a weighted sum and a summed weight.
    - ``weight`` (Python number, or tensor broadcastable to ``value``; default 1): non-negative weight of each
      observation, for example the batch size when ``value`` is a batch-mean loss.

    One ``update`` is one *tick*. Use :meth:`tick` (or :func:`ema_metrics.tick`) to pool several updates, such as
    the micro-batches of one optimizer step, into one tick.

    With ``adjust=True`` (default) the value after tick :math:`t` is

    .. math:: \bar x_t = \frac{\sum_{i\le t} \beta^{t-i} \sum_j w_{ij} x_{ij}}{\sum_{i\le t} \beta^{t-i} \sum_j w_{ij}}

    which, for scalars with unit weights, is ``pandas.Series.ewm(alpha=alpha, adjust=True).mean()`` (and fastai's
    ``AvgSmoothLoss``, and TensorBoard's smoothing). ``adjust=False`` is pandas ``adjust=False``: the first tick
    seeds the average as if it had been observed forever (its sums count ``1 / alpha`` times), which is also
    ignite's ``RunningAverage``. If the first tick carries no weight there is nothing to seed with, and the
    average starts debiased.

    The states are two decayed sums (float64), so adding them across ranks gives *exactly* the average of the
    pooled data of all ranks, provided every rank ticks the same number of times (a rank without data passes
    ``weight=0``). ``compute`` syncs them with a single collective. ``forward`` returns the local value unless
    :attr:`sync_on_forward` (default: the torchmetrics ``dist_sync_on_step`` argument) asks for a sync.

    ``update`` and ``forward`` never read a tensor back to the host. Checks that need a value, which are non-finite
    values and invalid tensor weights, are deferred to ``compute``.

    Args:
        alpha: smoothing factor in ``(0, 1]``; pass exactly one of ``alpha``, ``half_life``, ``span``, ``com``.
        half_life: ticks after which an observation's weight halves: ``1 - alpha = 0.5 ** (1 / half_life)``.
        span: pandas span, ``alpha = 2 / (span + 1)``, ``span >= 1``.
        com: centre of mass, ``alpha = 1 / (1 + com)``, ``com >= 0``.
        adjust: debiased average (``True``) or pandas ``adjust=False`` (``False``).
        nan_strategy: what to do with NaN and infinite values (torchmetrics' names):

            - ``"warn"`` (default): drop them from the tick (weight 0); ``compute`` warns once for each new
              batch of dropped values.
            - ``"ignore"``: drop them silently.
            - ``"error"``: drop them from the tick and raise ``RuntimeError`` at ``compute`` (the check cannot run in
              ``update`` without a host sync); the state holds only the finite observations.
            - ``"disable"``: no check; a non-finite value poisons the average.
            - a float: replace each non-finite value by this number (imputation), with its weight.

            A finite value is never dropped: if its product with its weight, the sums of a tick or the decayed sums
            overflow float64, ``compute`` raises ``OverflowError`` (``forward`` returns the non-finite ratio, as it
            reads nothing back to check); with ``"disable"`` the overflow propagates like any non-finite value.
        kwargs: torchmetrics ``Metric`` arguments (``dist_sync_on_step``, ``process_group``, ``dist_sync_fn``, ...).

    Raises:
        TypeError: If a parametrisation argument, ``adjust`` or ``nan_strategy`` has the wrong type.
        ValueError: If not exactly one parametrisation is given, or a value is out of range.

    Example:
        >>> from ema_metrics import EMAMetric
        >>> ema = EMAMetric(alpha=0.5)
        >>> for step, loss in enumerate([4.0, 2.0, 1.0, 1.0]):
        ...     value = ema(loss)
        ...     print(f"{step=} {value=:.4f}")
        step=0 value=4.0000
        step=1 value=2.6667
        step=2 value=1.7143
        step=3 value=1.3333

        Weights pool the observations of one tick, ``adjust=False`` seeds with the first tick:

        >>> ema = EMAMetric(half_life=1, adjust=False)
        >>> for step, (loss, n) in enumerate([(4.0, 32), (2.0, 32), (1.0, 8)]):
        ...     value = ema(loss, weight=n)
        ...     print(f"{step=} {value=:.4f}")
        step=0 value=4.0000
        step=1 value=3.0000
        step=2 value=2.6000

    """

    higher_is_better: bool | None = None
    sums: Tensor

    def __init__(
        self,
        alpha: float | None = None,
        *,
        half_life: float | None = None,
        span: float | None = None,
        com: float | None = None,
        adjust: bool = True,
        nan_strategy: Union[str, float] = "warn",
        **kwargs: Any,
    ) -> None:
        super().__init__(alpha, half_life=half_life, span=span, com=com, adjust=adjust, **kwargs)
        self.nan_strategy = check_nan_strategy(nan_strategy)
        self._clean = self.nan_strategy in ("error", "warn", "ignore")
        self._impute: float | None = None if isinstance(self.nan_strategy, str) else float(self.nan_strategy)
        # [decayed sum of w*x, decayed sum of w, count of finite values, count of rejected updates]
        self._add_decayed_state("sums", torch.zeros(4), decay_mask=torch.tensor([True, True, False, False]))
        self._numel = 0
        self._warned_nonfinite = 0
        self._hot: _Hot | None = None

    # ------------------------------------------------------------------ hot path (the sums: the functions above)
    def _accumulate(self, value: Union[Tensor, float], weight: Union[Tensor, float]) -> _Hot:
        """Add one update to the states. Validates everything before touching any state; no host sync.

        A value or weight given on the host (a Python number, or a CPU 0-d tensor for a metric on an accelerator)
        reaches the kernels as a scalar argument: no tensor is made from it, so nothing is copied or waited for.
        """
        d = self.__dict__
        hot: _Hot | None = d["_hot"]
        if hot is None or hot.sums is not d["sums"]:
            hot = _build_hot(self)
        if not hot.cpu and capturing(hot.device):
            raise RuntimeError(
                f"{type(self).__name__}.update cannot be captured in a CUDA graph: its tick count and value counter"
                " are Python numbers, which a replay would not advance. Call it outside the captured region."
            )
        # the value: a tensor on the metric's device, or a number on the host
        x: Tensor | float
        if isinstance(value, Tensor):
            x = value.detach() if value.requires_grad else value
            if x.dtype not in VALUE_DTYPES or x.layout is not _STRIDED:
                check_tensor(x, "value")
            if x.device != hot.device:
                x = _host_number(x, "value", hot)
        elif type(value) is float:
            x = value
        elif type(value) is int:
            x = as_float(value, "value")
        else:
            x = as_tensor(value, "value")  # a list, an array, another number type: host data
            if not hot.cpu:
                x = _host_number(x, "value", hot) if x.dim() == 0 else x.to(hot.device)
        impute = d["_impute"]
        if impute is not None:
            if isinstance(x, Tensor):
                x = torch.nan_to_num(x, impute, impute, impute)
            elif not math.isfinite(x):
                x = impute
        # the weight: a number on the host, or a tensor on the metric's device
        w: float | int | None = None
        if type(weight) is float or type(weight) is int:
            w = weight
        elif isinstance(weight, Tensor) and weight.device != hot.device:
            check_tensor(weight, "weight")
            w = _host_number(weight.detach(), "weight", hot)
        if w is not None:
            coef = hot.coef.get(w) or _coef(hot, w)
            lost = None
            if coef.may_underflow:  # 0 < weight < 1: checked on the host for a host value, else on the device
                if isinstance(x, Tensor):
                    lost = _underflows(x, coef.w)
                else:
                    _check_product(x, coef.w)
            if not isinstance(x, Tensor):
                numel = 1
                if math.isfinite(x) or not d["_clean"]:
                    inc = torch.add(coef.c0, coef.c1, alpha=x)  # a finite number needs no cleaning
                else:
                    inc = _scalar_sums(hot, coef, x)
            elif x.dim() == 0:
                numel = 1
                if not d["_clean"]:
                    inc = torch.addcmul(coef.c0, x, coef.c1)
                elif coef.may_overflow:
                    inc = _scalar_sums(hot, coef, x)
                else:  # the common case, inlined (see _scalar_sums)
                    inc = torch.nan_to_num_(torch.addcmul(coef.c0, x, coef.c1), 0.0, 0.0, 0.0)
            else:
                numel = x.numel()
                inc = _vector_sums(coef, x, d["_clean"])
            if d["_in_tick"]:
                in_tick = True
                decay = hot.decay if self._tick_decay() else hot.keep
            else:
                in_tick = False
                decay = hot.decay
            if lost is not None:
                inc, decay = torch.where(lost, hot.reject, inc), torch.where(lost, hot.keep, decay)
        else:
            if not isinstance(x, Tensor):
                x = torch.full((), x, dtype=_F64, device=hot.device)  # a fill kernel: no host data is copied
            numel = x.numel()
            inc, decay = _tensor_weight_sums(self, hot, x, weight)
            in_tick = d["_in_tick"]
        if d["_replica"]:  # everything is validated: the first update on a pooled replica keeps it on rank 0 only
            self._dereplicate()
        torch.addcmul(inc, hot.sums, decay, out=hot.sums)
        d["_numel"] += numel
        if not in_tick:
            if (d["_ticks"] or d["adjust"]) and d["_ticks"] + 1 < d["_renorm_at"]:
                d["_ticks"] += 1
            else:
                self._close_tick()
        return hot

    def update(self, value: Union[Tensor, float], weight: Union[Tensor, float] = 1.0) -> None:
        """Add one tick (or, inside :meth:`tick`, one part of the open tick).

        Args:
            value: observations of this tick; a number or a tensor of any shape.
            weight: non-negative weight, a number or a tensor broadcastable to ``value``.

        Raises:
            TypeError: If ``value`` or ``weight`` is not numeric.
            ValueError: If ``weight`` is a negative or non-finite number, or its shape does not broadcast to
                ``value``. An invalid *tensor* weight is detected on the device and reported by ``compute``.

        """
        self._accumulate(value, weight)

    def forward(self, value: Union[Tensor, float], weight: Union[Tensor, float] = 1.0) -> Tensor:
        """Update, then return the current smoothed value (rank-local unless :attr:`sync_on_forward`)."""
        d = self.__dict__
        if d["_is_synced"]:
            raise TorchMetricsUserError(
                "The Metric shouldn't be synced when performing ``forward``. HINT: Did you forget to call ``unsync`` ?."
            )
        try:
            hot = self._accumulate(value, weight)
        except RuntimeError as err:
            raise self._clear_device_error(err) from err
        d["_update_count"] += 1
        d["_computed"] = None
        if (d["sync_on_forward"] is not None or d["dist_sync_on_step"]) and self._should_sync_forward():
            out: Tensor = self._synced_forward_value()
        else:
            out = torch.div(hot.num, hot.den)
        d["_forward_cache"] = out
        return out

    # ------------------------------------------------------------------ compute
    def compute(self) -> Tensor:
        """The smoothed value: NaN before any observation; synced across ranks when distributed.

        Raises:
            ValueError: If an update was rejected for a negative or non-finite tensor ``weight``.
            OverflowError: If a product ``weight * value``, a tick's sums or the decayed sums overflowed float64 (not
                with ``nan_strategy="disable"``, where a non-finite value poisons the average by design).
            RuntimeError: If ``nan_strategy="error"`` and non-finite values were seen.

        """
        counters = self._counters_for_compute()
        return self._value_from_states({"sums": self.sums}, counters, check=True, known=self._known_for_compute())

    def _value_from_states(
        self,
        states: dict[str, Tensor],
        counters: dict[str, int] | None = None,
        check: bool = False,
        known: _sync.Pooled | None = None,
    ) -> Tensor:
        sums = states["sums"]
        if check:
            if known is not None and known.values is not None:  # the sync read the pooled sums already
                num, den, finite, rejected = known.values
            elif known is not None and known.finite and known.counts is not None:  # finite, and its counts
                (num, den), (finite, rejected) = (0.0, 0.0), known.counts
            else:
                num, den, finite, rejected = sums.tolist()  # the one read-back of compute
            if rejected > 0:
                raise ValueError(
                    f"{type(self).__name__}: {int(rejected)} update(s) were rejected because argument `weight` held"
                    " a negative or non-finite value, or a product of `weight` and `value` fell below the float64"
                    f" normal range ({_TINY_NORMAL!r}); those updates were left out of the state. Reset the metric"
                    " after fixing the weights (or rescaling the values)."
                )
            if self.nan_strategy != "disable":  # with "disable" a non-finite value poisons the sums by design
                check_overflow(type(self).__name__, num, den)
            if self.nan_strategy in ("error", "warn"):
                # only these strategies count dropped values; with "disable" a NaN value makes the counts NaN too
                numel = (counters or self._extra_counters())["numel"]
                self._report_nonfinite(numel - int(finite))
        return sums[0] / sums[1]

    def _check_states(self, states: dict[str, Tensor]) -> str | None:
        _, den, finite, rejected = states["sums"].tolist()
        if den < 0 or finite < 0 or rejected < 0:
            return (
                f"{type(self).__name__}: the summed weight and counts must not be negative, but the state holds"
                f" weight={den!r}, finite count={finite!r}, rejected count={rejected!r}"
            )
        return None

    def _report_nonfinite(self, dropped: int) -> None:
        if dropped <= 0 or self.nan_strategy not in ("error", "warn"):
            return
        if self.nan_strategy == "error":
            raise RuntimeError(
                f"{type(self).__name__}: {dropped} non-finite value(s) (NaN or inf) were passed as `value` with"
                " nan_strategy='error'; they were left out of the average."
            )
        if dropped > self._warned_nonfinite:
            warnings.warn(
                f"{type(self).__name__}: {dropped} non-finite value(s) (NaN or inf) were passed as `value` and left"
                " out of the average (nan_strategy='warn').",
                UserWarning,
                stacklevel=3,
            )
            self._warned_nonfinite = dropped

    # ------------------------------------------------------------------ counters and devices
    def _extra_counters(self) -> dict[str, int]:
        return {"numel": self._numel}

    def _set_extra_counters(self, counters: dict[str, int]) -> None:
        self._numel = counters.get("numel", 0)

    def _reset_counters(self) -> None:
        self._numel = 0
        self._warned_nonfinite = 0

    def __getstate__(self) -> dict[str, Any]:
        """Pickle without the hot-path constants (rebuilt on first use, on the device the states are on)."""
        state = super().__getstate__()
        state.pop("_hot", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Unpickle; the hot-path constants are rebuilt at the next update."""
        super().__setstate__(state)
        self.__dict__.setdefault("_hot", None)

    def _sync_config(self) -> tuple[Any, ...]:
        return (*super()._sync_config(), repr(self.nan_strategy))

    def extra_repr(self) -> str:
        """Short description for ``print(metric)``."""
        return f"alpha={self.alpha:.6g}, adjust={self.adjust}, nan_strategy={self.nan_strategy!r}"
