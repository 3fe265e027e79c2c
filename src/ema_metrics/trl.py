"""The TRL integration: exact EMAs of the numbers TRL's trainers log (``pip install 'ema_metrics[trl]'``)."""

from __future__ import annotations

try:
    import transformers  # noqa: F401
    import trl  # noqa: F401
except ModuleNotFoundError as err:  # pragma: no cover - exercised by the packaging test
    raise ModuleNotFoundError(
        "ema_metrics.trl needs TRL and Hugging Face transformers: install them with `pip install 'ema_metrics[trl]'`"
    ) from err

from ema_metrics.integrations.trl.callback import EMATRLCallback, attach

__all__ = ["EMATRLCallback", "attach"]
