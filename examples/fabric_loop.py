"""Lightning Fabric on CPU with gradient accumulation: one EMA tick per optimizer step.

``fabric.no_backward_sync`` skips the gradient all-reduce on all but the last micro-batch of a step, and
``loss_ema.tick()`` pools those micro-batches into one tick. With several processes (``ddp_spawn``),
``loss_ema.compute()`` is the smoothed per-sample mean loss over all processes. Rank 0 logs it.

Run: python examples/fabric_loop.py --devices 2
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path
from typing import TypedDict

import torch
from lightning.fabric import Fabric

from ema_metrics import EMAMetric

W_TRUE = torch.tensor([1.0, -2.0, 0.5, 3.0])


class RankResult(TypedDict):
    """What one process recorded."""

    rank: int
    losses: list[list[float]]  # per optimizer step: the per-sample losses of all its micro-batches
    smoothed: list[float]  # per optimizer step: loss_ema.compute(), synced over all processes
    params: list[float]  # final model parameters (identical on every process)


def train(
    fabric: Fabric,
    out_dir: str,
    steps: int,
    accumulate: int,
    micro_batch: int,
    half_life: float,
    log_every: int,
    seed: int,
) -> None:
    """Train on one process and write its :class:`RankResult` to ``out_dir/rank{rank}.json``."""
    result = fit(fabric, steps, accumulate, micro_batch, half_life, log_every, seed)
    (Path(out_dir) / f"rank{fabric.global_rank}.json").write_text(json.dumps(result))
    # DDP sits in a reference cycle: free it while its process group exists, or gloo may abort at exit
    gc.collect()


def fit(
    fabric: Fabric, steps: int, accumulate: int, micro_batch: int, half_life: float, log_every: int, seed: int
) -> RankResult:
    """The training loop; returns what this process recorded."""
    rank = fabric.global_rank
    torch.manual_seed(seed)
    model, opt = fabric.setup(*_model_and_optimizer())
    loss_ema = fabric.to_device(EMAMetric(half_life=half_life))
    gen = torch.Generator().manual_seed(seed + 1 + rank)  # this process's shard of the synthetic data
    size = micro_batch + rank  # uneven batch sizes: the pooled mean weights every sample equally
    result = RankResult(rank=rank, losses=[], smoothed=[], params=[])
    for step in range(steps):
        step_losses: list[float] = []
        with loss_ema.tick():  # all micro-batches of this optimizer step are one tick
            for micro in range(accumulate):
                xb, yb = fabric.to_device(_batch(size, gen))
                accumulating = micro < accumulate - 1
                with fabric.no_backward_sync(model, enabled=accumulating):
                    per_sample = (model(xb).squeeze(-1) - yb) ** 2
                    loss = per_sample.mean()
                    fabric.backward(loss / accumulate)
                loss_ema.update(loss, weight=len(xb))
                step_losses.extend(per_sample.detach().tolist())
        opt.step()
        opt.zero_grad()
        smoothed = float(loss_ema.compute())  # a collective under DDP: every process calls it
        result["losses"].append(step_losses)
        result["smoothed"].append(smoothed)
        if log_every > 0 and (step % log_every == 0 or step == steps - 1):
            fabric.print(f"step={step:3d} raw(rank 0)={float(loss.detach()):.4f} smoothed={smoothed:.4f}")
    result["params"] = [float(v) for p in model.parameters() for v in p.detach().reshape(-1)]
    return result


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(4, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def _batch(size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(size, 4, generator=gen)
    return x, x @ W_TRUE + 0.3 * torch.randn(size, generator=gen)


def run(
    devices: int = 2,
    steps: int = 30,
    accumulate: int = 3,
    micro_batch: int = 4,
    half_life: float = 5.0,
    log_every: int = 5,
    seed: int = 0,
) -> list[RankResult]:
    """Train on ``devices`` CPU processes and return each process's :class:`RankResult`, by rank."""
    # One process needs no launcher; several are spawned (plain "ddp" would re-run this script per process).
    strategy = "ddp_spawn" if devices > 1 else "auto"
    fabric = Fabric(accelerator="cpu", devices=devices, strategy=strategy)
    with tempfile.TemporaryDirectory() as out_dir:
        fabric.launch(train, out_dir, steps, accumulate, micro_batch, half_life, log_every, seed)
        return [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(devices)]


def main(argv: list[str] | None = None) -> list[RankResult]:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--accumulate", type=int, default=3)
    args = parser.parse_args(argv)
    return run(devices=args.devices, steps=args.steps, accumulate=args.accumulate)


if __name__ == "__main__":
    main()
