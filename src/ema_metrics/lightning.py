"""The companion callback for ``lightning.pytorch`` (install with ``pip install 'ema_metrics[lightning]'``)."""

from __future__ import annotations

try:
    import lightning.pytorch as _pl
    from lightning.pytorch import Callback
except ModuleNotFoundError as err:  # pragma: no cover - exercised by the packaging test
    raise ModuleNotFoundError(
        "ema_metrics.lightning needs Lightning: install it with `pip install 'ema_metrics[lightning]'`"
        " (or use ema_metrics.pytorch_lightning with the `pytorch_lightning` package)"
    ) from err

from ema_metrics.integrations.lightning.callback import EMAMetricsCallbackBase

__all__ = ["EMAMetricsCallback"]


class EMAMetricsCallback(EMAMetricsCallbackBase, Callback):  # type: ignore[misc]  # noqa: D101
    __doc__ = EMAMetricsCallbackBase.__doc__
    _pl = _pl
