"""The Hugging Face Trainer integration (import the callback from :mod:`ema_metrics.transformers`).

- :mod:`~ema_metrics.integrations.transformers.callback`: ``EMALossCallback``.
- :mod:`~ema_metrics.integrations.transformers.state`: every rank's state as JSON in ``trainer_state.json``.
- :mod:`~ema_metrics.integrations.transformers.internals`: every ``transformers`` internal it uses.
"""
