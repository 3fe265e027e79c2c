"""Pure helpers of the metrics: decay arithmetic, parametrisation, input checks, non-finite handling, state checks.

They take tensors and numbers, never a metric, and import nothing else of ``ema_metrics``. Internal: import the
public names from :mod:`ema_metrics`.
"""
