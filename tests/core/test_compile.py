"""``torch.compile`` (inductor, with autograd) of a training step that calls the metrics, as users run it.

The metrics run their calls eagerly inside a compiled function (one deliberate graph break per call), so the step
compiles, gives the values of eager metrics fed the same numbers, and is not recompiled for every new weight. The
reference is an eager metric fed the losses the compiled step returned.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torchmetrics.classification import BinaryAccuracy

from ema_metrics import EMAMetric, EMAWrapper

pytestmark = pytest.mark.slow

dynamo = pytest.importorskip("torch._dynamo", reason="torch.compile needs dynamo")


def _frames() -> int:
    return int(dynamo.utils.counters["frames"]["total"])


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = 2 + step % 7  # the batch size, and so the weight, changes at every step
    gen = torch.Generator().manual_seed(step)
    return torch.randn(n, 3, generator=gen, dtype=torch.float64), torch.randn(n, 1, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("call", ["forward", "update", "tick"])
def test_a_compiled_step_with_changing_weights_gives_the_eager_values_without_recompiling(call: str) -> None:
    dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    metric = EMAMetric(alpha=0.3)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(model(x), y)
        if call == "forward":
            metric(loss, weight=len(y))
        elif call == "update":
            metric.update(loss.detach(), weight=float(len(y)))
        else:
            with metric.tick():
                metric.update(loss, weight=len(y))
                metric.update(loss * 2, weight=1)
        loss.backward()
        return loss.detach()

    compiled = torch.compile(step)
    losses: list[tuple[float, int]] = []
    frames = []
    for i in range(24):
        x, y = _data(i)
        losses.append((float(compiled(x, y)), len(y)))
        model.zero_grad()
        frames.append(_frames())
    # after the first few distinct weights, new weights compile nothing more
    assert frames[-1] == frames[8], frames
    reference = EMAMetric(alpha=0.3)
    for loss, n in losses:
        if call == "tick":
            with reference.tick():
                reference.update(loss, weight=n)
                reference.update(loss * 2, weight=1)
        else:
            reference.update(loss, weight=n)
    assert metric.ticks == reference.ticks == 24
    assert math.isclose(float(metric.compute()), float(reference.compute()), rel_tol=1e-15, abs_tol=0.0)


def test_a_compiled_function_with_a_wrapper_gives_the_eager_value() -> None:
    dynamo.reset()
    acc = EMAWrapper(BinaryAccuracy(validate_args=False), alpha=0.5)
    eager = EMAWrapper(BinaryAccuracy(validate_args=False), alpha=0.5)

    def step(preds: torch.Tensor, target: torch.Tensor) -> Any:
        return acc(preds.sigmoid(), target)

    compiled = torch.compile(step)
    for i in range(6):
        gen = torch.Generator().manual_seed(i)
        preds, target = torch.randn(8, generator=gen), torch.randint(0, 2, (8,), generator=gen)
        got = compiled(preds, target)
        want = eager(preds.sigmoid(), target)
        assert torch.equal(got, want)
    assert acc.ticks == eager.ticks == 6
