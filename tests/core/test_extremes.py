"""Extreme parametrisations and magnitudes: tiny smoothing factors and overflowing products.

References: pandas ``ewm``, a high-precision ``decimal`` evaluation of the pandas formulas, and the float64 loop of
``tests.test_ema_reference``.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, localcontext
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.aggregation import SumMetric

from ema_metrics import EMAMetric, EMAWrapper, resolve_alpha
from tests.core.test_ema_reference import ATOL, RTOL

# ----------------------------------------------------------------------------------------------- tiny alphas


def decimal_half_life_alpha(half_life: float) -> float:
    """``1 - 0.5 ** (1 / half_life)`` evaluated with 60 significant digits, then rounded to float64."""
    with localcontext() as ctx:
        ctx.prec = 60
        return float(1 - Decimal("0.5") ** (1 / Decimal(half_life)))


@pytest.mark.parametrize("half_life", [1e3, 1e8, 1e12, 1e15, 6.2e15])
def test_long_half_life_does_not_cancel(half_life: float) -> None:
    alpha = resolve_alpha(half_life=half_life)
    assert alpha == pytest.approx(decimal_half_life_alpha(half_life), rel=1e-14, abs=0)
    assert 1.0 - alpha < 1.0


@pytest.mark.parametrize(
    ("kwargs", "name", "shown"),
    [
        ({"alpha": 1e-17}, "alpha", "1e-17"),
        ({"alpha": 2.0**-54}, "alpha", repr(2.0**-54)),
        ({"alpha": 5e-324}, "alpha", "5e-324"),
        ({"half_life": 1e17}, "half_life", "1e+17"),
        ({"half_life": 1e300}, "half_life", "1e+300"),
        ({"span": 1e17}, "span", "1e+17"),
        ({"com": 1e16}, "com", "1e+16"),
    ],
)
def test_alpha_too_small_for_float64_is_refused(kwargs: dict[str, Any], name: str, shown: str) -> None:
    # the message names the argument, the value and the usable bound
    with pytest.raises(ValueError, match=rf"`{name}`.*2\*\*-53.*{re.escape(shown)}"):
        EMAMetric(**kwargs)
    with pytest.raises(ValueError, match=rf"`{name}`.*{re.escape(shown)}"):
        EMAWrapper(SumMetric(), **kwargs)


@pytest.mark.parametrize(("name", "largest"), [("half_life", 6.2e15), ("span", 1.8e16), ("com", 9.0e15)])
def test_largest_usable_parametrisation_resolves(name: str, largest: float) -> None:
    alpha = resolve_alpha(**{name: largest})
    assert alpha >= 2.0**-53
    assert 1.0 - alpha < 1.0


tiny_alpha = st.floats(2.0**-53, 1e-3, allow_nan=False, allow_infinity=False)
value_stream = st.lists(st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False), min_size=1, max_size=40)


@settings(max_examples=120, deadline=None)
@given(alpha=tiny_alpha, values=value_stream, adjust=st.booleans())
def test_tiny_valid_alpha_matches_pandas(alpha: float, values: list[float], adjust: bool) -> None:
    metric = EMAMetric(alpha=alpha, adjust=adjust)
    got = np.array([float(metric(v)) for v in values])
    expected = pd.Series(values, dtype="float64").ewm(alpha=alpha, adjust=adjust).mean().to_numpy()
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=1e-9)


@pytest.mark.parametrize("adjust", [True, False])
def test_smallest_alpha_with_adjust_false_stays_finite(adjust: bool) -> None:
    metric = EMAMetric(alpha=2.0**-53, adjust=adjust)
    values = [1e6, -3e5, 2.5e6, 7.0]
    got = [float(metric(v)) for v in values]
    expected = pd.Series(values).ewm(alpha=2.0**-53, adjust=adjust).mean().to_numpy()
    assert all(math.isfinite(v) for v in got)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------------------------- overflow


def _oracle_sums(ticks: list[list[tuple[Any, Any]]], alpha: float, adjust: bool = True) -> tuple[float, float]:
    """The two decayed sums of a float64 loop over the finite observations (overflowing as float64 does)."""
    beta = 1.0 - alpha
    num = den = np.float64(0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        for t, tick in enumerate(ticks):
            num, den = num * beta, den * beta
            for values, weights in tick:
                x, w = np.broadcast_arrays(np.asarray(values, np.float64), np.asarray(weights, np.float64))
                for xi, wi in zip(x.ravel(), w.ravel(), strict=True):
                    if np.isfinite(xi):
                        num, den = num + wi * xi, den + wi
            if t == 0 and not adjust:
                num, den = num / alpha, den / alpha
    return float(num), float(den)


OVERFLOWS = {
    # a single product w * x past the float64 range (it used to be cleaned to 0 while its weight was kept)
    "product": ([[(1e308, 2.0)]], 0.5, True),
    "product-tensor-value": ([[(torch.tensor(1e308, dtype=torch.float64), 2.0)]], 0.5, True),
    "product-tensor-weight": ([[(1e308, torch.tensor(2.0))]], 0.5, True),
    "product-in-vector": ([[(torch.tensor([1.0, -1e308, 3.0], dtype=torch.float64), 4.0)]], 0.5, True),
    "product-after-data": ([[(1.0, 1.0)], [(2.0, 1.0)], [(1e308, 2.0)], [(1.0, 1.0)]], 0.5, True),
    "product-next-to-inf": ([[(torch.tensor([math.inf, 1e308], dtype=torch.float64), 2.0)]], 0.5, True),
    # the sums of one tick: two finite products whose sum overflows, or inf - inf
    "tick-sum": ([[(torch.tensor([1e308, 1e308], dtype=torch.float64), 1.0)]], 0.5, True),
    "tick-sum-grouped": ([[(1e308, 1.0), (1e308, 1.0)]], 0.5, True),
    "tick-sum-small-weight": ([[(torch.tensor([1.5e308, 1.5e308], dtype=torch.float64), 0.75)]], 0.5, True),
    "tick-sum-small-weight-grouped": ([[(1.5e308, 0.9), (-1e308, 0.5), (1.5e308, 0.9)]], 0.5, True),
    "tick-inf-minus-inf": ([[(torch.tensor([1e308, -1e308], dtype=torch.float64), 2.0)]], 0.5, True),
    # the decayed state
    "state": ([[(1.5e308, 1.0)], [(1.5e308, 1.0)]], 0.2, True),
    "adjust-false-seeding": ([[(1e306, 1.0)]], 1e-3, False),
    "weight-sum": ([[(1.0, 1.5e308)], [(1.0, 1.5e308)]], 0.2, True),
}


def _feed(metric: EMAMetric, ticks: list[list[tuple[Any, Any]]], via: str) -> list[float]:
    out = []
    for tick in ticks:
        with metric.tick():
            for value, weight in tick:
                if via == "forward":
                    out.append(float(metric(value, weight=weight)))
                else:
                    metric.update(value, weight=weight)
    return out


@pytest.mark.parametrize("via", ["update", "forward"])
@pytest.mark.parametrize("nan_strategy", ["warn", "ignore", "error", 0.0])
@pytest.mark.parametrize("case", list(OVERFLOWS.values()), ids=list(OVERFLOWS))
def test_overflow_is_reported_never_a_number(case: Any, nan_strategy: str | float, via: str) -> None:
    ticks, alpha, adjust = case
    # the independent float64 loop overflows as well
    assert not all(math.isfinite(v) for v in _oracle_sums(ticks, alpha, adjust))
    metric = EMAMetric(alpha=alpha, adjust=adjust, nan_strategy=nan_strategy)
    outputs = _feed(metric, ticks, via)
    with pytest.raises(OverflowError, match=r"EMAMetric: the decayed sums overflowed float64"):
        metric.compute()
    if via == "forward" and adjust:  # forward returns the raw ratio (no host sync): never a finite number made up
        # (with adjust=False the overflow comes from the seeding when the first tick closes, after forward)
        assert not math.isfinite(outputs[-1])
    # reset recovers
    metric.reset()
    metric.update(2.0)
    assert float(metric.compute()) == 2.0


def test_overflow_with_nan_strategy_disable_is_left_to_propagate() -> None:
    metric = EMAMetric(alpha=0.5, nan_strategy="disable")
    metric.update(1e308, weight=2.0)
    assert float(metric.compute()) == math.inf


@pytest.mark.parametrize("weight", [2.0, 1.0, 0.5, torch.tensor([2.0, 2.0, 2.0]), torch.tensor(0.5)])
def test_non_finite_inputs_are_still_dropped_with_their_weight(weight: Any) -> None:
    # next to values near the top of the range that do not overflow
    metric = EMAMetric(alpha=0.5)
    ticks = [
        [(torch.tensor([math.inf, 4e307, 1.0], dtype=torch.float64), weight)],
        [(torch.tensor([-math.inf, math.nan, 2e307], dtype=torch.float64), weight)],
    ]
    got = _feed(metric, ticks, "forward")
    num, den = _oracle_sums(ticks, 0.5)
    assert math.isfinite(num)
    np.testing.assert_allclose(got[-1], num / den, rtol=RTOL, atol=ATOL)
    with pytest.warns(UserWarning, match="3 non-finite"):
        np.testing.assert_allclose(float(metric.compute()), num / den, rtol=RTOL, atol=ATOL)


def test_overflow_paths_make_no_host_sync() -> None:
    from tests.core.test_ema_behaviour import forbid_host_sync

    metrics = [EMAMetric(alpha=0.5), EMAMetric(alpha=0.5, nan_strategy=1.0), EMAMetric(alpha=0.5, adjust=False)]
    big = torch.tensor([1e308, math.inf, 1.0], dtype=torch.float64)
    with forbid_host_sync():
        for m in metrics:
            m(big[1], weight=0.5)
            m(big, weight=0.5)
            m(big[0], weight=2.0)
            m(big, weight=2.0)
            m(big, weight=torch.tensor(2.0))
            m.update(big[1])
    for m in metrics:
        with pytest.raises(OverflowError):
            m.compute()


@pytest.mark.parametrize(("name", "too_large"), [("half_life", 1e17), ("span", 1e17), ("com", 9.0072e15)])
def test_the_printed_largest_parametrisation_is_accepted(name: str, too_large: float) -> None:
    # the limit in the message is exact: passing it back gives the smallest smoothing factor, the next float is refused
    with pytest.raises(ValueError, match=rf"`{name}` to be at most (\S+), which") as info:
        EMAMetric(**{name: too_large})
    match = re.search(r"at most (\S+), which", str(info.value))
    assert match is not None
    printed = float(match.group(1))
    assert EMAMetric(**{name: printed}).alpha == 2.0**-53
    with pytest.raises(ValueError, match=rf"`{name}` to be at most {re.escape(match.group(1))},"):
        EMAMetric(**{name: math.nextafter(printed, math.inf)})


# ----------------------------------------------------------------------------------------------- underflowing products
TINY = 2.0**-1022  # the smallest normal float64


@pytest.mark.parametrize(("value", "weight"), [(1e-300, 1e-300), (-1e-300, 1e-20), (3e-308, 0.5), (1e-200, 1e-150)])
def test_a_python_product_that_underflows_is_refused_at_update(value: float, weight: float) -> None:
    # EMAMetric(alpha=0.5)(1e-300, weight=1e-300) returned 0.0 (true mean 1e-300): the product w*x underflowed silently
    metric = EMAMetric(alpha=0.5)
    metric(2.0, weight=0.5)
    before = metric.sums.clone()
    for call in (metric, metric.update):
        with pytest.raises(ValueError, match=rf"`weight` \({re.escape(repr(weight))}\) and argument `value`"):
            call(value, weight=weight)
    assert torch.equal(metric.sums, before)
    assert metric.ticks == 1
    assert float(metric.compute()) == 2.0


@pytest.mark.parametrize("via", ["python-weight", "tensor-weight", "vector"])
def test_a_device_product_that_underflows_is_reported_by_compute(via: str) -> None:
    # on the device nothing is read back: the update is rejected there and compute raises, naming the cause
    metric = EMAMetric(alpha=0.5)
    metric(4.0)
    value = torch.tensor(1e-300, dtype=torch.float64)
    if via == "python-weight":
        out = metric(value, weight=1e-300)
    elif via == "tensor-weight":
        out = metric(value, weight=torch.tensor(1e-300, dtype=torch.float64))
    else:
        out = metric(torch.tensor([1.0, 1e-300], dtype=torch.float64), weight=1e-300)
    assert float(out) == 4.0  # the rejected update left the sums as they were
    with pytest.raises(ValueError, match=r"1 update\(s\) were rejected .* fell below the float64 normal range"):
        metric.compute()


@pytest.mark.parametrize(
    ("value", "weight"),
    [(1e-300, 1.0), (TINY, 1.0), (1e-300, 3.0), (0.0, 1e-300), (1.0, 1e-300), (5e-324, 1.0), (1e-300, 0.0)],
)
def test_products_that_do_not_underflow_are_kept(value: float, weight: float) -> None:
    # a weight of at least 1 never makes a product smaller than the value; a zero value or weight loses nothing
    for v, w in ((value, weight), (torch.tensor(value, dtype=torch.float64), weight)):
        metric = EMAMetric(alpha=0.5)
        metric(2.0)
        metric(v, weight=w)
        num, den = 0.5 * 2.0 + weight * value, 0.5 + weight
        assert float(metric.compute()) == num / den


def test_a_state_resumed_just_before_a_renormalization_keeps_its_value() -> None:
    # Renormalization ticks are multiples of an interval (256 at alpha 0.5). A state loaded at tick 1023 (last
    # renormalized at 768) used to schedule its next one at 1023 + 256, so its sums decayed below the float64 range
    # and the value became 0 / 0 at tick 1279, where the run that never stopped kept its last value.
    def run(load_at: int | None) -> float:
        metric = EMAMetric(alpha=0.5)
        metric(1.5)
        for t in range(1, 1400):
            if t == load_at:
                state = metric.state_dict()
                metric = EMAMetric(alpha=0.5)
                metric.load_state_dict(state)
            with metric.tick():
                pass
        return float(metric.compute())

    assert run(None) == 1.5
    assert run(1023) == 1.5
    assert run(600) == 1.5
