"""Exact, debiased, weighted exponential moving averages as torchmetrics metrics.

The package by layer (see ``docs/architecture.md``): the metric core (:mod:`ema_metrics._base`,
:mod:`ema_metrics.ema`, :mod:`ema_metrics.wrapper`, :mod:`ema_metrics._functions`), the sync protocol
(:mod:`ema_metrics._sync`), pure helpers (:mod:`ema_metrics.utilities`) and one subpackage per framework
(:mod:`ema_metrics.integrations`), whose public faces are :mod:`ema_metrics.lightning`,
:mod:`ema_metrics.pytorch_lightning` and :mod:`ema_metrics.transformers`.
"""

from ema_metrics._base import DecayedSumMetric
from ema_metrics._functions import (
    RankValues,
    find_ema_metrics,
    sum_ranks,
    synced_values,
    synced_values_by_rank,
    tick,
)
from ema_metrics.ema import EMAMetric
from ema_metrics.utilities.params import resolve_alpha
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
