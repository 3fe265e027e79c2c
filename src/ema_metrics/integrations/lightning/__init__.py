"""The Lightning integration (both ``lightning.pytorch`` and ``pytorch_lightning``); it imports neither package.

- :mod:`~ema_metrics.integrations.lightning.callback`: ``EMAMetricsCallbackBase``, the whole callback.
- :mod:`~ema_metrics.integrations.lightning.options`: its validated arguments and the Trainer checks.
- :mod:`~ema_metrics.integrations.lightning.zero_code`: the observer of the ``training_step`` output.
- :mod:`~ema_metrics.integrations.lightning.checkpoint`: per-rank rows, checkpoint entries, epoch snapshots.
- :mod:`~ema_metrics.integrations.lightning.internals`: every Lightning (and torchmetrics) private it uses.
"""
