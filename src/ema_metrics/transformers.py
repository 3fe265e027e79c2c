"""The Hugging Face ``Trainer`` callback (install with ``pip install 'ema_metrics[transformers]'``)."""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ModuleNotFoundError as err:  # pragma: no cover - exercised by the packaging test
    raise ModuleNotFoundError(
        "ema_metrics.transformers needs Hugging Face transformers: install it with"
        " `pip install 'ema_metrics[transformers]'`"
    ) from err

from ema_metrics.integrations.transformers.callback import EMALossCallback

__all__ = ["EMALossCallback"]
