"""Every use of a Lightning (or torchmetrics) private by the callback, in one place.

Each function says what it reads or changes, why no public API serves, and which releases have it. :func:`check`
runs at ``setup``: if one of them is missing in the installed Lightning, training does not start and the message
names the attribute and the tested range, instead of an ``AttributeError`` in the middle of a fit.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from torch import Tensor

#: Lightning releases the callback is tested with (both ``lightning`` and ``pytorch_lightning``).
TESTED_RANGE = "2.4 to 2.6"


def check(trainer: Any, pl: ModuleType) -> None:
    """Fail with a clear message if the installed Lightning lacks one of the internals used below."""
    connector = getattr(trainer, "_logger_connector", None)
    needed: list[tuple[str, bool]] = [
        ("Trainer._logger_connector", connector is not None),
        (
            "Trainer._logger_connector.should_update_logs",
            connector is not None and hasattr(type(connector), "should_update_logs"),
        ),
        (
            "Trainer._logger_connector.update_train_step_metrics",
            connector is not None and callable(getattr(connector, "update_train_step_metrics", None)),
        ),
        ("utilities.data.extract_batch_size", _extract_batch_size(pl) is not None),
    ]
    missing = [name for name, present in needed if not present]
    if missing:
        version = getattr(pl, "__version__", "unknown")
        raise RuntimeError(
            f"EMAMetricsCallback needs Lightning internals that {pl.__name__} {version} does not have: {missing}."
            f" The callback is tested with Lightning {TESTED_RANGE}; install a release in that range."
        )


def logs_this_batch(trainer: Any, step_done: bool, automatic: bool) -> bool:
    """Whether Lightning writes this batch's step metrics to the loggers (the predicate of its own logging).

    ``_LoggerConnector.should_update_logs`` (2.0+) is what ``update_train_step_metrics`` asks; in automatic
    optimization nothing is logged on accumulating micro-batches.
    """
    if automatic and not step_done:
        return False
    return bool(trainer._logger_connector.should_update_logs or trainer.fast_dev_run)


def run_before_step_logging(trainer: Any, fn: Callable[[], None]) -> Callable[[], None]:
    """Run ``fn`` inside ``_LoggerConnector.update_train_step_metrics`` (2.0+), right before the loggers are written.

    This is the last moment before Lightning logs a step, after every ``on_train_batch_end`` hook: a hook that sets
    ``should_stop`` late (the module's own, or the ``max_time`` timer) makes Lightning log a step no hook could
    foresee. Returns the function that removes the wrapper.
    """
    connector = trainer._logger_connector
    original = connector.update_train_step_metrics

    def update_train_step_metrics() -> None:
        fn()
        original()

    connector.update_train_step_metrics = update_train_step_metrics

    def remove() -> None:
        connector.__dict__.pop("update_train_step_metrics", None)

    return remove


def write_logged_value(metric: Any, value: Any) -> None:
    """Put ``value`` where Lightning reads a logged Metric object: its ``_forward_cache`` (torchmetrics private).

    ``self.log(name, metric, on_step=True)`` makes Lightning (2.0+) keep a reference to ``metric._forward_cache`` at
    the time of the call and read that tensor for the progress bar, ``callback_metrics`` and the loggers. Writing in
    place reaches all of them; a tensor of another shape or dtype replaces the attribute for later ``log`` calls.
    """
    cache = metric.__dict__.get("_forward_cache")
    if (
        isinstance(cache, Tensor)
        and isinstance(value, Tensor)
        and (cache.shape, cache.dtype, cache.device) == (value.shape, value.dtype, value.device)
    ):
        cache.copy_(value)
        return
    metric.__dict__["_forward_cache"] = value.clone() if isinstance(value, Tensor) else value


def has_logged_value(metric: Any) -> bool:
    """Whether the metric already holds a tensor that Lightning would read when it is logged."""
    return isinstance(metric.__dict__.get("_forward_cache"), Tensor)


def extract_batch_size(pl: ModuleType) -> Callable[[Any], int]:
    """Lightning's own batch-size inference (``utilities.data.extract_batch_size``, 2.0+), used by ``self.log``."""
    fn = _extract_batch_size(pl)
    assert fn is not None  # checked by `check`
    return fn


def _extract_batch_size(pl: ModuleType) -> Callable[[Any], int] | None:
    data = getattr(getattr(pl, "utilities", None), "data", None)
    return getattr(data, "extract_batch_size", None)
