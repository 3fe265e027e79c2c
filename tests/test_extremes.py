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
from hypothesis import given, settings
from hypothesis import strategies as st
from torchmetrics.aggregation import SumMetric

from ema_metrics import EMAMetric, EMAWrapper, resolve_alpha
from tests.test_ema_reference import ATOL, RTOL

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
        EMAWrapper(SumMetric(nan_strategy="disable"), **kwargs)


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
