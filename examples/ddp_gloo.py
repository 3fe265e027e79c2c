"""DistributedDataParallel on CPU (gloo) with gradient accumulation: one EMA tick per optimizer step.

Every rank trains on its own shard with its own micro-batch size, and ``loss_ema.compute()`` returns the same
smoothed loss on every rank: the EMA, over optimizer steps, of the per-sample mean loss pooled over all ranks and all
micro-batches of each step. Rank 0 logs it.

Run: python examples/ddp_gloo.py --world-size 2
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import TypedDict

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from ema_metrics import EMAMetric

W_TRUE = torch.tensor([1.0, -2.0, 0.5, 3.0])


class RankResult(TypedDict):
    """What one rank recorded."""

    rank: int
    losses: list[list[float]]  # per optimizer step: the per-sample losses of all its micro-batches
    smoothed: list[float]  # per optimizer step: loss_ema.compute(), synced over all ranks
    params: list[float]  # final model parameters (identical on every rank under DDP)


def worker(
    rank: int,
    world_size: int,
    out_dir: str,
    steps: int,
    accumulate: int,
    micro_batch: int,
    half_life: float,
    log_every: int,
    seed: int,
) -> None:
    """Entry point of one process: join the group, train, write the :class:`RankResult` to ``out_dir``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world_size)
    try:
        result = train(rank, steps, accumulate, micro_batch, half_life, log_every, seed)
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        # DDP sits in a reference cycle: free it while its process group exists, or gloo may abort at exit
        gc.collect()
        dist.destroy_process_group()


def train(
    rank: int, steps: int, accumulate: int, micro_batch: int, half_life: float, log_every: int, seed: int
) -> RankResult:
    """Train on this rank of the initialised process group; returns what it recorded."""
    torch.manual_seed(seed)  # DDP broadcasts rank 0's parameters anyway
    model = DistributedDataParallel(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(seed + 1 + rank)  # this rank's shard of the synthetic data
    size = micro_batch + rank  # uneven batch sizes: the pooled mean weights every sample equally
    loss_ema = EMAMetric(half_life=half_life)
    result = RankResult(rank=rank, losses=[], smoothed=[], params=[])
    for step in range(steps):
        step_losses: list[float] = []
        with loss_ema.tick():  # all micro-batches of this optimizer step are one tick
            for micro in range(accumulate):
                xb = torch.randn(size, 4, generator=gen)
                yb = xb @ W_TRUE + 0.3 * torch.randn(size, generator=gen)
                last = micro == accumulate - 1
                with nullcontext() if last else model.no_sync():  # all-reduce gradients once per step
                    per_sample = (model(xb).squeeze(-1) - yb) ** 2
                    loss = per_sample.mean()
                    (loss / accumulate).backward()
                loss_ema.update(loss, weight=len(xb))
                step_losses.extend(per_sample.detach().tolist())
        opt.step()
        opt.zero_grad()
        smoothed = float(loss_ema.compute())  # a collective: every rank calls it, the value is global
        result["losses"].append(step_losses)
        result["smoothed"].append(smoothed)
        if rank == 0 and log_every > 0 and (step % log_every == 0 or step == steps - 1):
            print(f"step={step:3d} raw(rank 0)={float(loss.detach()):.4f} smoothed(all ranks)={smoothed:.4f}")
    result["params"] = [float(v) for p in model.parameters() for v in p.detach().reshape(-1)]
    return result


def run(
    world_size: int = 2,
    steps: int = 30,
    accumulate: int = 3,
    micro_batch: int = 4,
    half_life: float = 5.0,
    log_every: int = 5,
    seed: int = 0,
) -> list[RankResult]:
    """Spawn ``world_size`` CPU processes, train, and return each rank's :class:`RankResult`, by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        args = (world_size, out_dir, steps, accumulate, micro_batch, half_life, log_every, seed)
        mp.spawn(worker, args=args, nprocs=world_size, join=True)
        return [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(world_size)]


def main(argv: list[str] | None = None) -> list[RankResult]:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--accumulate", type=int, default=3)
    args = parser.parse_args(argv)
    return run(world_size=args.world_size, steps=args.steps, accumulate=args.accumulate)


if __name__ == "__main__":
    main()
