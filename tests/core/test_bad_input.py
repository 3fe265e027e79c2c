"""Bad input at every public entry point: a clear error naming the argument and the value, and the state unchanged.

After each refusal the metric continues, and its value is checked against the float64 loop of
``tests.test_ema_reference`` (or a float64 MSE), so a refusal that changed anything would show.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pytest
import torch
from torchmetrics.aggregation import MeanMetric
from torchmetrics.regression import MeanSquaredError

from ema_metrics import EMAMetric, EMAWrapper, synced_values, tick
from tests.core.test_ema_reference import ATOL, RTOL, ema_oracle

HUGE = 10**400  # a Python int beyond the float64 range
HUGE_SHOWN = re.escape("100000...(401 digits)")
SPARSE = torch.tensor([1.0, 0.0, 2.0]).to_sparse()
FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2]

# ----------------------------------------------------------------------------------------------- constructors


@pytest.mark.parametrize("cls", ["EMAMetric", "EMAWrapper"])
@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"alpha": HUGE}, ValueError, rf"`alpha`.*{HUGE_SHOWN}"),
        ({"alpha": -HUGE}, ValueError, rf"`alpha`.*-{HUGE_SHOWN}"),
        ({"half_life": HUGE}, ValueError, rf"`half_life`.*{HUGE_SHOWN}"),
        ({"span": HUGE}, ValueError, rf"`span`.*{HUGE_SHOWN}"),
        ({"com": HUGE}, ValueError, rf"`com`.*{HUGE_SHOWN}"),
        ({"alpha": None, "com": None}, ValueError, r"exactly one.*none"),
        ({"alpha": "0.5"}, TypeError, r"`alpha`.*'0\.5'"),
        ({"alpha": [0.5]}, TypeError, r"`alpha`.*\[0\.5\]"),
        ({"alpha": 0.5, "adjust": None}, TypeError, r"`adjust`.*None"),
        ({"alpha": 0.5, "adjust": "False"}, TypeError, r"`adjust`.*'False'"),
    ],
)
def test_constructor_arguments(cls: str, kwargs: dict[str, Any], exc: type[Exception], pattern: str) -> None:
    make = EMAMetric if cls == "EMAMetric" else lambda **kw: EMAWrapper(MeanSquaredError(), **kw)
    with pytest.raises(exc, match=pattern):
        make(**kwargs)


@pytest.mark.parametrize(
    ("nan_strategy", "exc", "pattern"),
    [
        (HUGE, ValueError, rf"`nan_strategy`.*{HUGE_SHOWN}"),
        (None, TypeError, r"`nan_strategy`.*None"),
        ("drop", ValueError, r"`nan_strategy`.*'drop'"),
        (math.inf, ValueError, r"`nan_strategy`.*inf"),
    ],
)
def test_nan_strategy_argument(nan_strategy: Any, exc: type[Exception], pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        EMAMetric(alpha=0.5, nan_strategy=nan_strategy)


@pytest.mark.parametrize(
    ("metric", "exc", "pattern"),
    [
        (None, TypeError, r"`metric`.*None"),
        ("MeanMetric", TypeError, r"`metric`.*'MeanMetric'"),
        (MeanMetric, TypeError, r"`metric`.*MeanMetric"),
    ],
)
def test_wrapper_metric_argument(metric: Any, exc: type[Exception], pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        EMAWrapper(metric, alpha=0.5)


# ----------------------------------------------------------------------------------------------- EMAMetric inputs

BAD_UPDATES = [
    pytest.param(HUGE, 1.0, ValueError, rf"`value`.*fits? in a float64.*{HUGE_SHOWN}", id="huge-int-value"),
    pytest.param(1.0, HUGE, ValueError, rf"`weight`.*fits? in a float64.*{HUGE_SHOWN}", id="huge-int-weight"),
    pytest.param([1.0, HUGE], 1.0, ValueError, r"`value`.*fits? in a float64", id="huge-int-in-list"),
    pytest.param(torch.ones(2), [1.0, HUGE], ValueError, r"`weight`.*fits? in a float64", id="huge-int-weight-list"),
    pytest.param(SPARSE, 1.0, TypeError, r"`value`.*dense.*sparse_coo", id="sparse-value"),
    pytest.param(torch.ones(3), SPARSE, TypeError, r"`weight`.*dense.*sparse_coo", id="sparse-weight"),
    pytest.param(torch.eye(2).to_sparse_csr(), 1.0, TypeError, r"`value`.*dense.*sparse_csr", id="sparse-csr-value"),
    *[
        pytest.param(torch.ones(2).to(d), 1.0, TypeError, rf"`value`.*real-valued.*{d}", id=f"{d}-value")
        for d in FLOAT8
    ],
    *[
        pytest.param(torch.ones(2), torch.ones(2).to(d), TypeError, rf"`weight`.*real-valued.*{d}", id=f"{d}-weight")
        for d in FLOAT8
    ],
    pytest.param(None, 1.0, TypeError, r"`value`.*None", id="none-value"),
    pytest.param(1.0, None, TypeError, r"`weight`.*None", id="none-weight"),
    pytest.param("3", 1.0, TypeError, r"`value`.*'3'", id="str-value"),
    pytest.param(1.0, "3", TypeError, r"`weight`.*'3'", id="str-weight"),
    pytest.param([True, False], 1.0, TypeError, r"`value`.*\[True, False\]", id="bool-list"),
    pytest.param([1.0, None], 1.0, TypeError, r"`value`.*\[1\.0, None\]", id="list-with-none"),
    pytest.param([[1.0], [2.0, 3.0]], 1.0, TypeError, r"`value`", id="ragged-list"),
]


@pytest.mark.parametrize("in_tick", [False, True])
@pytest.mark.parametrize("via", ["update", "forward"])
@pytest.mark.parametrize(("value", "weight", "exc", "pattern"), BAD_UPDATES)
def test_bad_update_leaves_state_unchanged(
    value: Any, weight: Any, exc: type[Exception], pattern: str, via: str, in_tick: bool
) -> None:
    metric = EMAMetric(alpha=0.5)
    metric.update(torch.tensor([1.0, 3.0]))
    if in_tick:
        metric.begin_tick()
    metric.update(5.0, weight=2.0)
    sums, ticks, numel = metric.sums.clone(), metric.ticks, metric._numel
    with pytest.raises(exc, match=pattern):
        getattr(metric, via)(value, weight=weight)
    assert torch.equal(metric.sums, sums)
    assert (metric.ticks, metric._numel) == (ticks, numel)
    if in_tick:
        metric.end_tick()
    metric.update(7.0)
    tick_list = [[([1.0, 3.0], 1.0)], [(5.0, 2.0)], [(7.0, 1.0)]]
    np.testing.assert_allclose(float(metric.compute()), ema_oracle(tick_list, 0.5)[-1], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("via", ["update", "forward"])
def test_lists_are_kept_in_float64(via: str) -> None:
    # 0.1, 0.2 and 0.3 are not float32 numbers: rounding them would show at 1e-9
    values, weights = [0.1, 0.2, 0.3], [0.7, 1.3, 2.9]
    metric = EMAMetric(alpha=0.25)
    getattr(metric, via)(values, weight=weights)
    getattr(metric, via)([[1e-3, 2e-3]], weight=0.1)
    expected = ema_oracle([[(values, weights)], [([1e-3, 2e-3], 0.1)]], 0.25)[-1]
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-15)
    assert float(metric.sums[0]) == pytest.approx(0.75 * (0.07 + 0.26 + 0.87) + 0.1 * 3e-3, rel=1e-15)


# ----------------------------------------------------------------------------------------------- EMAWrapper inputs


@pytest.mark.parametrize(
    ("args", "kwargs", "pattern"),
    [
        ((SPARSE, torch.ones(3)), {}, r"`preds`.*dense.*sparse_coo"),
        ((torch.ones(3), SPARSE), {}, r"`target`.*dense.*sparse_coo"),
        ((torch.ones(2).to(torch.float8_e4m3fn), torch.ones(2)), {}, r"`preds`.*float8_e4m3fn"),
        ((torch.ones(2),), {"target": torch.ones(2).to(torch.float8_e5m2)}, r"`target`.*float8_e5m2"),
    ],
)
def test_wrapper_refuses_sparse_and_float8_inputs(args: Any, kwargs: dict[str, Any], pattern: str) -> None:
    wrapper = EMAWrapper(MeanSquaredError(), alpha=0.5)
    wrapper.update(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))
    before = {n: getattr(wrapper, n).clone() for n in wrapper._state_names()}
    with pytest.raises(TypeError, match=pattern):
        wrapper.update(*args, **kwargs)
    assert all(torch.equal(getattr(wrapper, n), v) for n, v in before.items())
    assert wrapper.ticks == 1
    wrapper.update(torch.tensor([3.0]), torch.tensor([1.0]))
    expected = (0.5 * (1.0 + 4.0) + 4.0) / (0.5 * 2 + 1)
    assert float(wrapper.compute()) == pytest.approx(expected, rel=1e-15)


# ----------------------------------------------------------------------------------------------- tick, synced_values


def test_tick_refuses_plain_torchmetrics_metrics() -> None:
    ema, mean = EMAMetric(alpha=0.5), MeanMetric()
    with pytest.raises(TypeError, match=r"MeanMetric.*not an exponential moving average.*EMAWrapper"), tick(ema, mean):
        pass
    assert not ema.in_tick
    assert ema.ticks == 0


@pytest.mark.parametrize("bad", [None, "loss", 3, [EMAMetric(alpha=0.5)]])
def test_tick_refuses_non_modules(bad: Any) -> None:
    ema = EMAMetric(alpha=0.5)
    with pytest.raises(TypeError, match=re.escape(repr(bad)[:20])), tick(ema, bad):
        pass
    assert not ema.in_tick


@pytest.mark.parametrize("open_index", [0, 1, 2])
def test_tick_is_all_or_nothing_when_one_is_open(open_index: int) -> None:
    metrics = [EMAMetric(alpha=0.5) for _ in range(3)]
    for m in metrics:
        m.update(2.0)
    metrics[open_index].begin_tick()
    sums = [m.sums.clone() for m in metrics]
    pattern = r"1 metric\(s\) whose tick is already open.*EMAMetric.*no tick"
    with pytest.raises(RuntimeError, match=pattern), tick(*metrics):
        pass
    # nothing was opened, decayed or closed; the open tick is still open
    for i, m in enumerate(metrics):
        assert torch.equal(m.sums, sums[i])
        assert m.in_tick == (i == open_index)
        assert m.ticks == 1
    metrics[open_index].end_tick()
    for m in metrics:
        m.update(4.0)
    for i, m in enumerate(metrics):
        ticks = [[(2.0, 1.0)], [], [(4.0, 1.0)]] if i == open_index else [[(2.0, 1.0)], [(4.0, 1.0)]]
        np.testing.assert_allclose(float(m.compute()), ema_oracle(ticks, 0.5)[-1], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    ("metrics", "pattern"),
    [
        (None, r"`metrics`.*list or tuple.*None"),
        ("loss", r"`metrics`.*list or tuple.*'loss'"),
        (EMAMetric(alpha=0.5), r"`metrics`.*list or tuple.*EMAMetric"),
        ([EMAMetric(alpha=0.5), MeanMetric()], r"`metrics`.*item 1.*MeanMetric"),
        ([None], r"`metrics`.*item 0 is None"),
    ],
)
def test_synced_values_refuses_what_is_not_a_list_of_ema_metrics(metrics: Any, pattern: str) -> None:
    with pytest.raises(TypeError, match=pattern):
        synced_values(metrics)
