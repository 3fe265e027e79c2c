"""The Hugging Face callback's forward hook on a stand-in accelerator: no read-back and no copy of host data.

The hook runs at every micro-batch. It is called here as the model calls it, on torch's ``meta`` device (see
``tests/device_utils.py``), with ``num_items_in_batch`` as the Trainer passes it: a device tensor (transformers 5),
a Python int (transformers 4.46-4.48, Unsloth) or a CPU 0-d tensor, or absent.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("transformers", reason="the Trainer tests need `ema_metrics[transformers]`")

from ema_metrics.transformers import EMALossCallback
from tests.device_utils import recording

DEV = torch.device("meta")


@pytest.mark.parametrize("num_items", [None, 9, torch.tensor(9), "device"])
def test_the_forward_hook_reads_nothing_back_and_copies_nothing(num_items: Any) -> None:
    callback = EMALossCallback(half_life=3)
    callback.metric.to(DEV)
    callback._shifts = True
    model = torch.nn.Linear(2, 2).train()
    labels = torch.ones((2, 6), dtype=torch.long, device=DEV)
    kwargs: dict[str, Any] = {"labels": labels}
    if num_items is not None:
        kwargs["num_items_in_batch"] = torch.tensor(9, device=DEV) if num_items == "device" else num_items
    output = {"loss": torch.tensor(1.5, device=DEV)}
    callback.metric.begin_tick()
    with recording() as record:
        for _ in range(3):
            callback._on_forward(model, (), kwargs, output)
    assert not record, record.summary()
    assert callback.metric.in_tick
    assert callback.metric._numel == 3
