"""Zero-code mode of the Lightning callback: smooth entries of the ``training_step`` output and log them.

``keys={"loss": "train_loss_ema"}`` feeds each micro-batch's ``training_step`` output, exactly as returned (before
Lightning divides the loss by ``accumulate_grad_batches``), to metrics the callback owns, weighted by the batch size
or by the output entry ``weight_key``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

from ema_metrics.ema import EMAMetric
from ema_metrics.integrations.lightning import internals
from ema_metrics.integrations.lightning.options import CallbackOptions

__all__ = ["ZeroCode", "wrap_training_step"]


class ZeroCode:
    """The observation of the ``training_step`` output, owned by ``EMAMetricsCallback`` for one fit.

    Args:
        own: the zero-code metrics, by output key.
        options: the callback's options (``keys``, ``weight_key``, ``weight_by_batch_size``, ``prog_bar``).
        pl: the Lightning package (for its batch-size inference).

    """

    def __init__(self, own: dict[str, EMAMetric], options: CallbackOptions, pl: ModuleType) -> None:
        self._own = own
        self.keys = options.keys
        self.weight_key = options.weight_key
        self.weight_by_batch_size = options.weight_by_batch_size
        self.prog_bar = options.prog_bar
        self._pl = pl

    def observe(self, pl_module: Any, output: Any, batch: Any) -> None:
        """Zero-code mode: feed one micro-batch's ``training_step`` output to the metrics, and log them."""
        if output is not None:
            outputs = output if isinstance(output, Mapping) else {"loss": output}
            weight = self._weight(outputs, batch)
            for key, m in self._own.items():
                if key not in outputs:
                    raise KeyError(
                        f"EMAMetricsCallback: key {key!r} of argument `keys` is not in the training_step output;"
                        f" available: {sorted(outputs)}"
                    )
                m(outputs[key], weight=weight)
        for key, m in self._own.items():
            if m.update_called:  # logged as the Metric object: Lightning reads its value when it logs
                pl_module.log(
                    self.keys[key],
                    m,
                    on_step=True,
                    on_epoch=False,
                    prog_bar=self.prog_bar,
                    metric_attribute=f"EMAMetricsCallback[{self.keys[key]}]",
                )

    def _weight(self, outputs: Mapping[str, Any], batch: Any) -> Any:
        if self.weight_key is not None:
            if self.weight_key not in outputs:
                raise KeyError(
                    f"EMAMetricsCallback: argument `weight_key` {self.weight_key!r} is not in the training_step"
                    f" output; available: {sorted(outputs)}"
                )
            return outputs[self.weight_key]
        if not self.weight_by_batch_size:
            return 1.0
        try:
            return float(internals.extract_batch_size(self._pl)(batch))
        except Exception as err:
            raise ValueError(
                "EMAMetricsCallback could not infer the batch size to weight the zero-code metrics; pass"
                " `weight_key` or weight_by_batch_size=False"
            ) from err


def wrap_training_step(pl_module: Any, observe: Any) -> Any:
    """See each ``training_step`` output as returned (Lightning divides the loss by the accumulation factor later)."""
    original = pl_module.training_step

    def training_step(*args: Any, **kwargs: Any) -> Any:
        output = original(*args, **kwargs)
        observe(pl_module, output, args[0] if args else kwargs.get("batch"))
        return output

    pl_module.__dict__["training_step"] = training_step

    def remove() -> None:
        if pl_module.__dict__.get("training_step") is training_step:
            del pl_module.__dict__["training_step"]

    return remove
