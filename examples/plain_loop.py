"""Plain PyTorch training loop with gradient accumulation: one EMA tick per optimizer step.

Run: python examples/plain_loop.py
"""

from __future__ import annotations

import torch

from ema_metrics import EMAMetric


def train(steps: int = 60, accumulate: int = 4, micro_batch: int = 8, seed: int = 0) -> list[tuple[int, float, float]]:
    """Fit a linear model on synthetic data; returns (step, last raw micro-batch loss, smoothed loss) per step."""
    torch.manual_seed(seed)
    x = torch.randn(steps * accumulate * micro_batch, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.3 * torch.randn(x.shape[0])
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_ema = EMAMetric(half_life=10)
    history = []
    batches = zip(x.split(micro_batch), y.split(micro_batch))
    for step in range(steps):
        with loss_ema.tick():  # all micro-batches of this optimizer step are one tick
            for _ in range(accumulate):
                xb, yb = next(batches)
                loss = torch.nn.functional.mse_loss(model(xb).squeeze(-1), yb)
                (loss / accumulate).backward()
                loss_ema.update(loss, weight=len(xb))  # detached inside: no graph is kept
        opt.step()
        opt.zero_grad()
        history.append((step, float(loss), float(loss_ema.compute())))
    return history


if __name__ == "__main__":
    for step, raw, smooth in train()[::10]:
        print(f"step={step:3d} raw={raw:.4f} smoothed={smooth:.4f}")
