"""The torchmetrics ``Metric`` contract: dtype moves, persistence, state-dict errors and plotting.

Values are checked against the float64 loop of ``tests.test_ema_reference`` and a float64 MSE written here; error
texts against what ``torch.nn.Module.load_state_dict`` itself says.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
import torch
from torchmetrics import Metric
from torchmetrics.regression import MeanSquaredError

from ema_metrics import EMAMetric, EMAWrapper
from tests.test_ema_reference import ATOL, RTOL, ema_oracle

VALUES = [1.0 / 3.0, 2.0 / 7.0, 5.0 / 11.0]


def _mse_oracle(pairs: list[tuple[float, float]], alpha: float) -> float:
    beta = 1.0 - alpha
    sse = n = 0.0
    for p, t in pairs:
        sse = beta * sse + (p - t) ** 2
        n = beta * n + 1.0
    return sse / n


def _fed_ema() -> tuple[Metric, float]:
    metric = EMAMetric(alpha=0.3)
    for v in VALUES:
        metric.update(v)
    return metric, float(ema_oracle([[(v, 1.0)] for v in VALUES], 0.3)[-1])


def _fed_wrapper() -> tuple[Metric, float]:
    metric = EMAWrapper(MeanSquaredError(), alpha=0.3)
    pairs = [(v, v * v) for v in VALUES]
    for p, t in pairs:
        metric.update(torch.tensor([p], dtype=torch.float64), torch.tensor([t], dtype=torch.float64))
    return metric, _mse_oracle(pairs, 0.3)


FED = {"EMAMetric": _fed_ema, "EMAWrapper": _fed_wrapper}
MOVES: dict[str, Callable[[Metric], Any]] = {
    "half": lambda m: m.half(),
    "to-bfloat16": lambda m: m.to(torch.bfloat16),
    "to-float16": lambda m: m.to(torch.float16),
    "set_dtype-bfloat16": lambda m: m.set_dtype(torch.bfloat16),
    "set_dtype-half": lambda m: m.set_dtype(torch.half),
    "float": lambda m: m.float(),
}


# ----------------------------------------------------------------------------------------------- dtype moves


@pytest.mark.parametrize("move", list(MOVES.values()), ids=list(MOVES))
@pytest.mark.parametrize("fed", list(FED.values()), ids=list(FED))
def test_dtype_move_never_rounds_the_cached_value(fed: Callable[[], tuple[Metric, float]], move: Any) -> None:
    metric, expected = fed()
    cached = metric.compute()  # torchmetrics keeps it in `_computed`
    assert cached.dtype == torch.float64
    move(metric)
    after = metric.compute()
    assert after.dtype == torch.float64
    assert float(after) == float(cached)
    np.testing.assert_allclose(float(after), expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("move", list(MOVES.values()), ids=list(MOVES))
def test_dtype_move_keeps_the_forward_value_unrounded(move: Any) -> None:
    metric = EMAMetric(alpha=0.3)
    out = metric(1.0 / 3.0)
    move(metric)
    assert metric._forward_cache is not None
    assert metric._forward_cache.dtype == torch.float64
    assert float(metric._forward_cache) == float(out) == 1.0 / 3.0
