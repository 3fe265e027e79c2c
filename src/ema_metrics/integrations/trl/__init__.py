"""The TRL integration (import it from :mod:`ema_metrics.trl`).

- :mod:`~ema_metrics.integrations.trl.callback`: ``EMATRLCallback`` and ``attach``.
- :mod:`~ema_metrics.integrations.trl.internals`: every TRL internal it reads or wraps.
"""
