"""EMAMetric inside torchmetrics containers behaves like on its own (independent pandas reference)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torchmetrics import MetricCollection

from ema_metrics import EMAMetric


def test_metric_collection_keeps_different_smoothings_apart() -> None:
    # MetricCollection merges metrics with equal states into compute groups; EMAs of different alpha (or the
    # same alpha, which would share tensors but not their tick count) must never be merged.
    rng = np.random.default_rng(1)
    stream = rng.normal(3.0, 1.0, size=40)
    mc = MetricCollection(
        {"fast": EMAMetric(alpha=0.5), "slow": EMAMetric(alpha=0.01), "seeded": EMAMetric(alpha=0.5, adjust=False)}
    )
    for x in stream:
        mc.update(torch.tensor(x))
    out = mc.compute()
    for name, alpha, adjust in (("fast", 0.5, True), ("slow", 0.01, True), ("seeded", 0.5, False)):
        expected = pd.Series(stream).ewm(alpha=alpha, adjust=adjust).mean().iloc[-1]
        assert abs(float(out[name]) - expected) < 1e-12
        assert mc[name].ticks == len(stream)
