"""Exact, debiased, weighted exponential moving averages as torchmetrics metrics."""

from ema_metrics._base import DecayedSumMetric
from ema_metrics._functions import (
    RankValues,
    find_ema_metrics,
    sum_ranks,
    synced_values,
    synced_values_by_rank,
    tick,
)
from ema_metrics._params import resolve_alpha
from ema_metrics.ema import EMAMetric
from ema_metrics.wrapper import EMAWrapper

__version__ = "0.1.0"

__all__ = [
    "DecayedSumMetric",
    "EMAMetric",
    "EMAWrapper",
    "RankValues",
    "__version__",
    "find_ema_metrics",
    "resolve_alpha",
    "sum_ranks",
    "synced_values",
    "synced_values_by_rank",
    "tick",
]
