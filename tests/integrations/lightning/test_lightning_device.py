"""The callback's per-micro-batch hooks on a stand-in accelerator: no read-back and no copy of host data.

Lightning runs ``on_train_batch_start``, ``training_step`` (where zero-code mode observes the output) and
``on_train_batch_end`` on every micro-batch; only the end of an optimizer step may sync. The hooks are driven here as
Lightning drives them on accumulating micro-batches, on metrics that live on torch's ``meta`` device (see
``tests/device_utils.py``), with the integer token count of ``weight_key`` a Python number.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch", reason="the Lightning tests need `ema_metrics[lightning]`")

from ema_metrics import EMAMetric  # noqa: E402
from ema_metrics.integrations.lightning.zero_code import ZeroCode  # noqa: E402
from ema_metrics.lightning import EMAMetricsCallback  # noqa: E402
from tests.device_utils import recording  # noqa: E402

DEV = torch.device("meta")


class Module(torch.nn.Module):
    automatic_optimization = True

    def __init__(self) -> None:
        super().__init__()
        self.train_loss = EMAMetric(alpha=0.5)
        self.logged: list[str] = []

    def log(self, name: str, value: Any, **kwargs: Any) -> None:  # what LightningModule.log needs of the metric
        value.to(DEV)
        self.logged.append(name)


@pytest.mark.parametrize("weight", [17, 17.5, torch.tensor(17), "device"])
def test_the_hooks_of_accumulating_micro_batches_read_nothing_back(weight: Any) -> None:
    module = Module().to(DEV)
    callback = EMAMetricsCallback(keys={"loss": "loss_ema"}, weight_key="ntokens", alpha=0.5)
    callback._driven = {"train_loss": module.train_loss}
    callback._own = {"loss": EMAMetric(alpha=0.5).to(DEV)}
    observer = ZeroCode(callback._own, callback._options, callback._pl)
    loss = torch.tensor(2.5, device=DEV)
    ntokens = torch.tensor(17, device=DEV) if weight == "device" else weight
    with recording() as record:
        for i in range(4):  # four accumulating micro-batches: no optimizer step, so no sync
            callback.on_train_batch_start(None, module, None, i)
            module.train_loss(loss, weight=8)
            observer.observe(module, {"loss": loss, "ntokens": ntokens}, None)
            callback.on_train_batch_end(None, module, {"loss": loss}, None, i)
    assert not record, record.summary()
    assert module.logged == ["loss_ema"] * 4
    assert all(m.in_tick for m in callback._all())
