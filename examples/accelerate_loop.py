"""Hugging Face Accelerate on CPU with gradient accumulation: one EMA tick per optimizer step.

The loop runs over micro-batches, as Accelerate expects: ``accelerator.accumulate(model)`` decides when the optimizer
really steps, and the EMA tick follows it (``begin_tick`` on the first micro-batch of a step, ``end_tick`` when
``accelerator.sync_gradients`` is set). With several processes ``loss_ema.compute()`` is the smoothed per-sample
mean loss over all of them. The main process logs it.

Run: python examples/accelerate_loop.py --num-processes 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import TypedDict

import torch
import torch.multiprocessing as mp
from accelerate import Accelerator

from ema_metrics import EMAMetric

W_TRUE = torch.tensor([1.0, -2.0, 0.5, 3.0])


class RankResult(TypedDict):
    """What one process recorded."""

    rank: int
    losses: list[list[float]]  # per optimizer step: the per-sample losses of all its micro-batches
    smoothed: list[float]  # per optimizer step: loss_ema.compute(), synced over all processes
    params: list[float]  # final model parameters (identical on every process)


def train(
    out_dir: str, steps: int, accumulate: int, micro_batch: int, half_life: float, log_every: int, seed: int
) -> None:
    """Train in this process (one of the launched ones) and write its :class:`RankResult` to ``out_dir``."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulate)
    result = fit(accelerator, steps, accumulate, micro_batch, half_life, log_every, seed)
    (Path(out_dir) / f"rank{accelerator.process_index}.json").write_text(json.dumps(result))
    # drop the prepared (DDP) model while its process group exists, or gloo may abort at exit
    accelerator.free_memory()
    accelerator.end_training()  # destroys the process group


def fit(
    accelerator: Accelerator,
    steps: int,
    accumulate: int,
    micro_batch: int,
    half_life: float,
    log_every: int,
    seed: int,
) -> RankResult:
    """The training loop; returns what this process recorded."""
    rank = accelerator.process_index
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model, opt = accelerator.prepare(model, opt)
    loss_ema = EMAMetric(half_life=half_life).to(accelerator.device)
    gen = torch.Generator().manual_seed(seed + 1 + rank)  # this process's shard of the synthetic data
    size = micro_batch + rank  # uneven batch sizes: the pooled mean weights every sample equally
    result = RankResult(rank=rank, losses=[], smoothed=[], params=[])
    step_losses: list[float] = []
    for _ in range(steps * accumulate):  # one iteration per micro-batch, as over a data loader
        xb = torch.randn(size, 4, generator=gen)
        yb = xb @ W_TRUE + 0.3 * torch.randn(size, generator=gen)
        xb, yb = xb.to(accelerator.device), yb.to(accelerator.device)
        if not loss_ema.in_tick:
            loss_ema.begin_tick()  # first micro-batch of an optimizer step
        with accelerator.accumulate(model):
            per_sample = (model(xb).squeeze(-1) - yb) ** 2
            loss = per_sample.mean()
            accelerator.backward(loss)  # divides by gradient_accumulation_steps
            opt.step()  # only steps when the gradients are synced
            opt.zero_grad()
        loss_ema.update(loss, weight=len(xb))
        step_losses.extend(per_sample.detach().tolist())
        if accelerator.sync_gradients:  # the optimizer stepped: close the tick
            loss_ema.end_tick()
            smoothed = float(loss_ema.compute())  # a collective when distributed: every process calls it
            step = len(result["smoothed"])
            result["losses"].append(step_losses)
            result["smoothed"].append(smoothed)
            step_losses = []
            if log_every > 0 and (step % log_every == 0 or step == steps - 1):
                accelerator.print(f"step={step:3d} raw(rank 0)={float(loss.detach()):.4f} smoothed={smoothed:.4f}")
    result["params"] = [float(v) for p in model.parameters() for v in p.detach().reshape(-1)]
    return result


def _process(rank: int, world_size: int, port: int, args: tuple[str, int, int, int, float, int, int]) -> None:
    """Entry point of one spawned process: the environment ``accelerate launch`` would set, then :func:`train`."""
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # tells Accelerate the thread count is chosen (it would warn and reset it)
    if world_size > 1:
        env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world_size, "LOCAL_WORLD_SIZE": world_size}
        os.environ.update({k: str(v) for k, v in env.items()})
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    train(*args)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(
    num_processes: int = 2,
    steps: int = 30,
    accumulate: int = 3,
    micro_batch: int = 4,
    half_life: float = 5.0,
    log_every: int = 5,
    seed: int = 0,
) -> list[RankResult]:
    """Train on ``num_processes`` fresh CPU processes; return each process's :class:`RankResult`, by rank.

    Even one process is spawned, so that the calling process keeps no Accelerate state.
    """
    with tempfile.TemporaryDirectory() as out_dir:
        args = (out_dir, steps, accumulate, micro_batch, half_life, log_every, seed)
        mp.spawn(_process, args=(num_processes, _free_port(), args), nprocs=num_processes, join=True)
        return [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(num_processes)]


def main(argv: list[str] | None = None) -> list[RankResult]:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--accumulate", type=int, default=3)
    args = parser.parse_args(argv)
    return run(num_processes=args.num_processes, steps=args.steps, accumulate=args.accumulate)


if __name__ == "__main__":
    main()
