"""Plain PyTorch training loop with gradient accumulation: one EMA tick per optimizer step.

Run: python examples/plain_loop.py
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ema_metrics import EMAMetric


class StepLog(NamedTuple):
    """What one optimizer step logged."""

    step: int
    raw: float  # loss of the last micro-batch
    smoothed: float  # loss_ema.compute() after the step
    micro_losses: tuple[float, ...]  # mean loss of each micro-batch of the step
    micro_sizes: tuple[int, ...]  # number of samples of each micro-batch


def train(
    steps: int = 60, accumulate: int = 4, micro_batch: int = 8, half_life: float = 10, seed: int = 0
) -> list[StepLog]:
    """Fit a linear model on synthetic data; returns one :class:`StepLog` per optimizer step."""
    torch.manual_seed(seed)
    x = torch.randn(steps * accumulate * micro_batch, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.3 * torch.randn(x.shape[0])
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_ema = EMAMetric(half_life=half_life)
    history = []
    batches = zip(x.split(micro_batch), y.split(micro_batch), strict=True)
    for step in range(steps):
        losses, sizes = [], []
        with loss_ema.tick():  # all micro-batches of this optimizer step are one tick
            for _ in range(accumulate):
                xb, yb = next(batches)
                loss = torch.nn.functional.mse_loss(model(xb).squeeze(-1), yb)
                (loss / accumulate).backward()
                loss_ema.update(loss, weight=len(xb))  # detached inside: no graph is kept
                losses.append(float(loss.detach()))
                sizes.append(len(xb))
        opt.step()
        opt.zero_grad()
        history.append(StepLog(step, losses[-1], float(loss_ema.compute()), tuple(losses), tuple(sizes)))
    return history


if __name__ == "__main__":
    for log in train()[::10]:
        print(f"step={log.step:3d} raw={log.raw:.4f} smoothed={log.smoothed:.4f}")
