"""The companion callback for the ``pytorch_lightning`` package (``pip install pytorch-lightning``)."""

from __future__ import annotations

try:
    import pytorch_lightning as _pl
    from pytorch_lightning import Callback
except ModuleNotFoundError as err:  # pragma: no cover - exercised by the packaging test
    raise ModuleNotFoundError(
        "ema_metrics.pytorch_lightning needs the `pytorch_lightning` package: `pip install pytorch-lightning`"
        " (or install `ema_metrics[lightning]` and use ema_metrics.lightning)"
    ) from err

from ema_metrics.integrations.lightning.callback import EMAMetricsCallbackBase

__all__ = ["EMAMetricsCallback"]


class EMAMetricsCallback(EMAMetricsCallbackBase, Callback):  # type: ignore[misc]  # noqa: D101
    __doc__ = EMAMetricsCallbackBase.__doc__
    _pl = _pl
